"""slim.relay.tftp: the first-stage TFTP server, over real UDP sockets on 127.0.0.1.

Every wait is a socket read with a timeout or a download by tftpy's own client;
the server answers in order, so a reply to a later datagram means the earlier ones
were handled (and counted: the server counts before it answers).
"""

from __future__ import annotations

import gc
import logging
import os
import random
import socket
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tftpy.TftpStates
from tftpy import TftpClient
from tftpy.TftpShared import TftpException, TftpFileNotFoundError

from slim.errors import InvalidArgument, Unavailable
from slim.relay.tftp import MAX_BLKSIZE, StageOneServer, TftpStats, clean_name

HOST = "127.0.0.1"
REPLY_TIMEOUT = 5.0  # a socket timeout: the longest a test waits for one datagram
MAC_CONFIG = "pxelinux.cfg/01-52-54-00-12-34-56"
MAC_CONFIG_TEXT = b"DEFAULT slim\nLABEL slim\n  KERNEL http://10.1.0.2:8080/vmlinuz\n"


def _payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


FILES = {
    "undionly.kpxe": _payload(5000, 1),  # several 512-byte blocks, a short last one
    "exact.bin": _payload(2048, 2),  # an exact multiple of 512 (and of 1024)
    "empty.bin": b"",
    "big.bin": _payload(256 * 1024, 3),
    "efi/ipxe.efi": _payload(3000, 4),
}


# -- helpers ------------------------------------------------------------------


@dataclass
class Dynamic:
    """A ``dynamic`` callback that records its calls (made on the server thread)."""

    content: dict[str, bytes] = field(default_factory=lambda: {MAC_CONFIG: MAC_CONFIG_TEXT})
    calls: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, name: str, client_ip: str) -> bytes | None:
        self.calls.append((name, client_ip))
        if name == "boom":
            raise RuntimeError("the boot plan service is down")
        if name == "wrong-type":
            return "not bytes"  # type: ignore[return-value]
        return self.content.get(name)


def rrq(name: bytes, mode: bytes = b"octet", options: dict[bytes, bytes] | None = None) -> bytes:
    packet = b"\x00\x01" + name + b"\x00" + mode + b"\x00"
    for key, value in (options or {}).items():
        packet += key + b"\x00" + value + b"\x00"
    return packet


def ack(block: int) -> bytes:
    return struct.pack("!HH", 4, block)


class Raw:
    """A bare UDP socket talking to the server (for what tftpy's client cannot send)."""

    def __init__(self, port: int) -> None:
        self.server = (HOST, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(REPLY_TIMEOUT)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def send(self, data: bytes, to: tuple[str, int] | None = None) -> None:
        self.sock.sendto(data, to or self.server)

    def recv(self) -> tuple[bytes, tuple[str, int]]:
        data, address = self.sock.recvfrom(70000)
        return data, (str(address[0]), int(address[1]))

    def error(self) -> tuple[int, str]:
        """The next datagram, which must be an ERROR: (code, message)."""
        data, _ = self.recv()
        assert data[:2] == b"\x00\x05", f"expected an ERROR packet, got {data[:40]!r}"
        assert data.endswith(b"\x00")
        return int.from_bytes(data[2:4], "big"), data[4:-1].decode("ascii")

    def data(self, block: int) -> tuple[bytes, tuple[str, int]]:
        """The next datagram, which must be DATA ``block``: (payload, sender)."""
        packet, sender = self.recv()
        assert packet[:4] == struct.pack("!HH", 3, block), f"expected DATA {block}, got {packet[:40]!r}"
        return packet[4:], sender

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw() -> Iterator[Callable[[int], Raw]]:
    made: list[Raw] = []

    def make(port: int) -> Raw:
        made.append(Raw(port))
        return made[-1]

    yield make
    for r in made:
        r.close()


def download(port: int, name: str, dest: Path, options: dict[str, int] | None = None) -> TftpClient:
    client = TftpClient(HOST, port, options=dict(options or {}))
    client.download(name, str(dest), timeout=REPLY_TIMEOUT, retries=3)
    return client


def assert_serves(port: int, tmp_path: Path) -> None:
    """The server still answers a valid request with a real client."""
    out = tmp_path / f"check-{time.monotonic_ns()}"
    download(port, "undionly.kpxe", out)
    assert out.read_bytes() == FILES["undionly.kpxe"]


@pytest.fixture
def static(tmp_path: Path) -> dict[str, Path]:
    table = {}
    for name, content in FILES.items():
        path = tmp_path / "boot" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        table[name] = path
    return table


@pytest.fixture
def dynamic() -> Dynamic:
    return Dynamic()


@pytest.fixture
def make_server(static: dict[str, Path], dynamic: Dynamic) -> Iterator[Callable[..., StageOneServer]]:
    servers: list[StageOneServer] = []

    def make(**kwargs: Any) -> StageOneServer:
        kwargs.setdefault("host", HOST)
        kwargs.setdefault("port", 0)
        kwargs.setdefault("timeout", 2.0)
        kwargs.setdefault("retries", 3)
        server = StageOneServer(kwargs.pop("static", static), kwargs.pop("dynamic", dynamic), **kwargs)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop(grace=0)


@pytest.fixture
def server(make_server: Callable[..., StageOneServer]) -> StageOneServer:
    return make_server()


@dataclass
class Opened:
    by_server: list[str] = field(default_factory=list)  # os.open (how the server opens static files)
    by_tftpy: list[str] = field(default_factory=list)  # open() inside tftpy's states (must stay empty)


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> Opened:
    """Record every path opened while the test runs."""
    record = Opened()
    real_os_open = os.open
    real_open = open

    def os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        record.by_server.append(os.fsdecode(path))
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def tftpy_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        record.by_tftpy.append(os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(tftpy.TftpStates, "open", tftpy_open, raising=False)
    return record


# -- downloads ----------------------------------------------------------------


def test_download_static_file_of_several_blocks(server: StageOneServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    download(server.port, "undionly.kpxe", out)
    assert out.read_bytes() == FILES["undionly.kpxe"]
    server.stop()
    assert server.stats == TftpStats(sessions=1, completed=1, bytes_sent=5000)


def test_download_with_blksize_and_tsize(server: StageOneServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    client = download(server.port, "undionly.kpxe", out, {"blksize": 1428, "tsize": 0})
    assert out.read_bytes() == FILES["undionly.kpxe"]
    assert client.context.options == {"blksize": "1428", "tsize": "5000"}


@pytest.mark.parametrize("name", ["exact.bin", "empty.bin", "efi/ipxe.efi", "/efi/ipxe.efi"])
@pytest.mark.parametrize("options", [{}, {"blksize": 1024}], ids=["plain", "blksize1024"])
def test_download_edge_sizes_and_paths(
    server: StageOneServer, tmp_path: Path, name: str, options: dict[str, int]
) -> None:
    out = tmp_path / "out"
    download(server.port, name, out, options)
    assert out.read_bytes() == FILES[name.lstrip("/")]


def test_netascii_is_served_as_binary(server: StageOneServer, raw: Callable[[int], Raw]) -> None:
    client = raw(server.port)
    client.send(rrq(b"exact.bin", b"NetASCII"))
    got = b""
    for block in range(1, 6):
        data, sender = client.data(block)
        client.send(ack(block), sender)
        got += data
    assert got == FILES["exact.bin"]


def test_options_are_checked_and_clamped(server: StageOneServer, raw: Callable[[int], Raw]) -> None:
    # blksize beyond RFC 2348's maximum is lowered to it (and the file fits in one block).
    client = raw(server.port)
    client.send(rrq(b"undionly.kpxe", options={b"BLKSIZE": b"99999999", b"tsize": b"0"}))
    oack, sender = client.recv()
    assert oack[:2] == b"\x00\x06"
    fields = oack[2:].split(b"\x00")[:-1]
    assert dict(zip(fields[::2], fields[1::2], strict=True)) == {
        b"blksize": str(MAX_BLKSIZE).encode(),
        b"tsize": b"5000",
    }
    client.send(ack(0), sender)
    data, _ = client.data(1)
    assert data == FILES["undionly.kpxe"]
    client.send(ack(1), sender)

    # Unknown options are ignored: no OACK, plain 512-byte DATA.
    other = raw(server.port)
    other.send(rrq(b"undionly.kpxe", options={f"x-{i}".encode(): b"1" for i in range(60)}))
    data, _ = other.data(1)
    assert data == FILES["undionly.kpxe"][:512]


# -- dynamic files ------------------------------------------------------------


def test_dynamic_file_gets_name_and_client_ip(
    server: StageOneServer, dynamic: Dynamic, tmp_path: Path
) -> None:
    out = tmp_path / "cfg"
    download(server.port, MAC_CONFIG, out)
    assert out.read_bytes() == MAC_CONFIG_TEXT
    download(server.port, "/" + MAC_CONFIG, out)  # one leading / is stripped
    assert out.read_bytes() == MAC_CONFIG_TEXT
    assert dynamic.calls == [(MAC_CONFIG, "127.0.0.1")] * 2


def test_dynamic_none_is_file_not_found(
    server: StageOneServer, dynamic: Dynamic, tmp_path: Path, raw: Callable[[int], Raw]
) -> None:
    with pytest.raises(TftpFileNotFoundError, match="File not found"):
        download(server.port, "pxelinux.cfg/default", tmp_path / "cfg")
    client = raw(server.port)
    client.send(rrq(b"pxelinux.cfg/C0A80001"))
    code, message = client.error()
    assert (code, message) == (1, "'pxelinux.cfg/C0A80001' not found")
    assert dynamic.calls == [("pxelinux.cfg/default", "127.0.0.1"), ("pxelinux.cfg/C0A80001", "127.0.0.1")]
    assert server.stats.refused == 2
    assert server.stats.sessions == 0


@pytest.mark.parametrize("name", ["boom", "wrong-type"])
def test_dynamic_failure_costs_one_request(
    server: StageOneServer, tmp_path: Path, raw: Callable[[int], Raw], name: str
) -> None:
    with pytest.raises(TftpException, match="errorcode = 0"):
        download(server.port, name, tmp_path / "x")
    client = raw(server.port)
    client.send(rrq(name.encode()))
    assert client.error() == (0, "internal error")
    assert server.stats.failed == 2
    assert_serves(server.port, tmp_path)
    assert server.running


def test_static_file_missing_unreadable_or_special(
    make_server: Callable[..., StageOneServer], tmp_path: Path, raw: Callable[[int], Raw]
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    server = make_server(static={"gone.bin": tmp_path / "nope", "dir": tmp_path, "fifo": fifo})
    client = raw(server.port)
    client.send(rrq(b"gone.bin"))
    assert client.error() == (1, "file not found")
    client.send(rrq(b"dir"))
    assert client.error() == (0, "cannot read file")
    client.send(rrq(b"fifo"))  # would block a plain open() for reading until a writer comes
    assert client.error() == (0, "cannot read file")
    assert server.stats.failed == 3


def test_static_names_must_be_clean(static: dict[str, Path]) -> None:
    for bad in ("../x", "/undionly.kpxe", "a//b", ""):
        with pytest.raises(InvalidArgument, match="cannot be served"):
            StageOneServer({bad: static["exact.bin"]})


# -- the name policy ----------------------------------------------------------


def test_clean_name() -> None:
    assert clean_name("/pxelinux.0") == "pxelinux.0"
    assert clean_name("efi/ipxe.efi") == "efi/ipxe.efi"
    assert clean_name("x" * 255) == "x" * 255
    for bad in ("", "/", "//x", "x" * 256, "a\0b", "a\\b", "a/./b", "a/../b", "..", "a/", "a\x7fb"):
        with pytest.raises(ValueError):  # noqa: PT011 - each case has its own reason
            clean_name(bad)


TRAVERSALS = [
    b"../etc/passwd",
    b"/../../etc/passwd",
    b"a/../../x",
    b"pxelinux.cfg/../../etc/passwd",
    b"pxelinux.cfg/../undionly.kpxe",
    b"./undionly.kpxe",
    b"undionly.kpxe/.",
    b"efi//ipxe.efi",
    b"//etc/passwd",
    b"..\\..\\etc\\passwd",
    b"efi\\ipxe.efi",
    b"pxelinux.cfg/\x01x",
    b"/",
    b"",
    b"x" * 256,
]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_traversal_is_refused(
    server: StageOneServer,
    dynamic: Dynamic,
    opened: Opened,
    raw: Callable[[int], Raw],
    name: bytes,
) -> None:
    client = raw(server.port)
    client.send(rrq(name))
    code, message = client.error()
    assert code == 2
    assert "refused" in message
    assert dynamic.calls == []
    assert opened.by_server == [] and opened.by_tftpy == []
    assert server.stats.refused == 1


def test_traversal_with_real_client(server: StageOneServer, dynamic: Dynamic, tmp_path: Path) -> None:
    with pytest.raises(TftpException, match="errorcode = 2"):
        download(server.port, "../etc/passwd", tmp_path / "x")
    assert dynamic.calls == []


def test_nul_in_name_never_reaches_a_lookup(
    server: StageOneServer, dynamic: Dynamic, opened: Opened, raw: Callable[[int], Raw]
) -> None:
    client = raw(server.port)
    for packet in (
        b"\x00\x01undionly.kpxe\x00../../etc/passwd\x00octet\x00",
        b"\x00\x01../../etc/passwd\x00\x00octet\x00",
    ):
        client.send(packet)
        assert client.error()[0] == 4
    assert dynamic.calls == []
    assert opened.by_server == [] and opened.by_tftpy == []


def test_absolute_paths_outside_are_never_read(
    server: StageOneServer,
    dynamic: Dynamic,
    opened: Opened,
    raw: Callable[[int], Raw],
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"do not serve")
    root = server.root
    assert root is not None and root.is_dir() and list(root.iterdir()) == []
    client = raw(server.port)

    refused = [f"{root}/../x", f"{root}/../{secret}", f"{tmp_path}/boot/../secret.txt"]
    for name in refused:
        client.send(rrq(name.encode()))
        assert client.error()[0] == 2, name

    not_found = ["/etc/passwd", str(secret), f"{root}/undionly.kpxe", str(tmp_path / "boot" / "exact.bin")]
    for name in not_found:
        client.send(rrq(name.encode()))
        assert client.error()[0] == 1, name

    # dynamic only ever saw relative names (one leading / stripped), never "..".
    assert dynamic.calls == [(name[1:], "127.0.0.1") for name in not_found]
    assert opened.by_server == [] and opened.by_tftpy == []
    assert server.stats.refused == len(refused) + len(not_found)


# -- uploads --------------------------------------------------------------------


def test_upload_is_refused(server: StageOneServer, tmp_path: Path, raw: Callable[[int], Raw]) -> None:
    source = tmp_path / "upload.bin"
    source.write_bytes(b"x" * 1500)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(TftpException, match="errorcode = 2"):
        TftpClient(HOST, server.port).upload("evil.bin", str(source), timeout=REPLY_TIMEOUT)
    client = raw(server.port)
    client.send(b"\x00\x02../../evil.bin\x00octet\x00")
    assert client.error() == (2, "uploads are not accepted")
    client.send(b"\x00\x02")  # even a truncated one
    assert client.error() == (2, "uploads are not accepted")
    root = server.root
    assert root is not None and list(root.iterdir()) == []
    assert sorted(tmp_path.rglob("*")) == before
    assert server.stats.refused == 3
    assert server.stats.sessions == 0


# -- junk -----------------------------------------------------------------------

JUNK: list[tuple[str, bytes, int | None]] = [
    ("tftpy-listen-crash", b"\x00\x01\xff\x00octet\x00", 4),
    ("empty", b"", 4),
    ("one-byte", b"\x00", 4),
    ("opcode-only", b"\x00\x01", 4),
    ("rrq-no-nul", b"\x00\x01undionly.kpxe", 4),
    ("rrq-one-nul", b"\x00\x01undionly.kpxe\x00octet", 4),
    ("rrq-unknown-mode", rrq(b"undionly.kpxe", b"mail"), 4),
    ("rrq-empty-mode", rrq(b"undionly.kpxe", b""), 4),
    ("rrq-non-ascii-mode", rrq(b"undionly.kpxe", b"oct\xe9t"), 4),
    ("rrq-odd-options", rrq(b"undionly.kpxe") + b"blksize\x00", 4),
    ("rrq-empty-option-name", rrq(b"undionly.kpxe") + b"\x00512\x00", 4),
    ("rrq-non-ascii-option", rrq(b"undionly.kpxe", options={b"blk\xffsize": b"512"}), 4),
    ("rrq-huge-option-list", rrq(b"undionly.kpxe", options={f"o{i}".encode(): b"v" for i in range(300)}), 4),
    ("rrq-blksize-0", rrq(b"undionly.kpxe", options={b"blksize": b"0"}), 8),
    ("rrq-blksize-abc", rrq(b"undionly.kpxe", options={b"blksize": b"abc"}), 8),
    ("rrq-blksize-negative", rrq(b"undionly.kpxe", options={b"blksize": b"-512"}), 8),
    ("rrq-tsize-abc", rrq(b"undionly.kpxe", options={b"tsize": b"abc"}), 8),
    ("opcode-0", b"\x00\x00undionly.kpxe\x00octet\x00", 4),
    ("opcode-9", b"\x00\x09undionly.kpxe\x00octet\x00", 4),
    ("opcode-65535", b"\xff\xff", 4),
    ("data", b"\x00\x03\x00\x01" + b"x" * 512, 4),
    ("ack", ack(1), 4),
    ("oack", b"\x00\x06blksize\x00512\x00", 4),
    ("error", b"\x00\x05\x00\x01not found\x00", None),  # never answer an ERROR
    ("oversized", b"\x00\x01" + b"a" * 64998, 4),
]


@pytest.mark.parametrize(("data", "expected"), [(d, e) for _, d, e in JUNK], ids=[i for i, _, _ in JUNK])
def test_junk_costs_nothing(
    server: StageOneServer,
    raw: Callable[[int], Raw],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    data: bytes,
    expected: int | None,
) -> None:
    client = raw(server.port)
    with caplog.at_level(logging.WARNING, logger="slim.relay.tftp"):
        client.send(data)
        if expected is not None:
            assert client.error()[0] == expected
        assert_serves(server.port, tmp_path)
    assert server.stats.bad_packets == 1
    assert server.stats.sessions == 1  # only the check download
    assert server.running
    host, port = client.address
    lines = [r for r in caplog.records if r.levelno == logging.WARNING and f"{host}:{port}" in r.getMessage()]
    assert len(lines) == 1


def test_random_junk(server: StageOneServer, raw: Callable[[int], Raw], tmp_path: Path) -> None:
    rng = random.Random(20240611)
    junk, probe = raw(server.port), raw(server.port)
    count = 300
    for i in range(count):
        head = (i % 8).to_bytes(2, "big") if i % 2 else rng.randbytes(2)  # half with a real opcode
        junk.send(head + rng.randbytes(rng.randrange(0, 700)))
        # Sync on a reply to a second socket, so the server's buffer never overflows.
        probe.send(rrq(b"probe"))
        assert probe.error() == (1, "'probe' not found")
    stats = server.stats
    assert stats.bad_packets + stats.refused == 2 * count
    assert stats.sessions == stats.busy == 0
    assert_serves(server.port, tmp_path)
    assert server.running


# -- sessions -------------------------------------------------------------------


def test_vanished_client_ends_after_retries_alone(
    make_server: Callable[..., StageOneServer], raw: Callable[[int], Raw], tmp_path: Path
) -> None:
    server = make_server(timeout=0.25, retries=2)
    ghost = raw(server.port)
    ghost.send(rrq(b"big.bin"))
    first, transfer_port = ghost.data(1)
    started = time.monotonic()

    # Meanwhile a real download runs to the end (its traffic wakes the loop often;
    # that must not use up the ghost's retries).
    out = tmp_path / "big"
    download(server.port, "big.bin", out)
    assert out.read_bytes() == FILES["big.bin"]

    again, sender = ghost.data(1)  # one resend (retries=2: two transmissions) ...
    assert (again, sender) == (first, transfer_port)
    assert ghost.error() == (0, "timed out")  # ... then it is given up
    assert time.monotonic() - started >= 0.4  # about timeout * retries after the first DATA
    server.stop()
    assert server.stats.completed == 1
    assert server.stats.failed == 1


def test_transfer_port_only_talks_to_its_client(server: StageOneServer, raw: Callable[[int], Raw]) -> None:
    client, stranger = raw(server.port), raw(server.port)
    client.send(rrq(b"efi/ipxe.efi"))
    got, transfer = client.data(1)
    stranger.send(ack(1), transfer)
    assert stranger.error() == (5, "unknown transfer ID")
    block = 1
    while len(got) < len(FILES["efi/ipxe.efi"]) and block < 10:
        client.send(ack(block), transfer)
        block += 1
        data, _ = client.data(block)
        got += data
    client.send(ack(block), transfer)
    assert got == FILES["efi/ipxe.efi"]
    server.stop()
    assert server.stats.completed == 1
    assert server.stats.bad_packets == 1


def test_client_abort_ends_session_quietly(server: StageOneServer, raw: Callable[[int], Raw]) -> None:
    client = raw(server.port)
    client.send(rrq(b"big.bin"))
    _, transfer = client.data(1)
    client.send(b"\x00\x05\x00\x00user cancelled\x00", transfer)
    server.stop(grace=5.0)  # the abort is already queued: the drain ends with it
    assert server.stats.failed == 1
    assert server.stats.completed == 0


def test_malformed_packet_in_a_session_ends_it(server: StageOneServer, raw: Callable[[int], Raw]) -> None:
    client = raw(server.port)
    client.send(rrq(b"big.bin"))
    _, transfer = client.data(1)
    client.send(b"\x00\x01\xff\x00octet\x00", transfer)
    assert client.error()[0] == 4
    assert server.stats.failed == 1
    other = raw(server.port)
    other.send(rrq(b"exact.bin"))
    other.data(1)


def test_busy_then_stop_without_grace(
    make_server: Callable[..., StageOneServer], raw: Callable[[int], Raw]
) -> None:
    server = make_server(max_sessions=1)
    holder, late = raw(server.port), raw(server.port)
    holder.send(rrq(b"big.bin"))
    _, transfer = holder.data(1)
    holder.send(rrq(b"big.bin"))  # a repeated request of a running transfer is ignored
    late.send(rrq(b"undionly.kpxe"))
    assert late.error() == (0, "server busy")
    assert server.stats.busy == 1
    server.stop(grace=0)
    data, sender = holder.recv()
    assert sender == transfer
    assert data == b"\x00\x05\x00\x00server shutting down\x00"
    assert server.stats.failed == 1
    assert server.stats.sessions == 1


def test_stop_lets_a_running_transfer_finish(server: StageOneServer, raw: Callable[[int], Raw]) -> None:
    client = raw(server.port)
    client.send(rrq(b"undionly.kpxe", options={b"blksize": b"8192"}))
    _, transfer = client.recv()  # OACK
    client.send(ack(0), transfer)
    data, _ = client.data(1)  # the whole file, the last block
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 5.0})
    stopper.start()
    client.send(ack(1), transfer)
    stopper.join(timeout=20)
    assert not stopper.is_alive()
    assert data == FILES["undionly.kpxe"]
    assert server.stats.completed == 1
    assert server.stats.failed == 0


# -- lifecycle --------------------------------------------------------------------


def test_stop_is_idempotent_and_releases_everything(
    static: dict[str, Path], dynamic: Dynamic, tmp_path: Path
) -> None:
    server = StageOneServer(static, dynamic, host=HOST, port=0, timeout=1.0)
    server.stop()  # before start: nothing to do
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        port = server.start()
        assert server.port == port != 0
        root = server.root
        assert root is not None and root.is_dir()
        assert_serves(port, tmp_path)
        threads = [t for t in threading.enumerate() if t.name == f"tftp {HOST}:{port}"]
        assert len(threads) == 1 and threads[0].daemon
        server.stop()
        server.stop()
        assert not threads[0].is_alive()
        assert not server.running
        assert not root.exists()
        assert server.root is None
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    # The port is free again ...
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((HOST, port))
    # ... and the server can start again.
    server.start()
    try:
        assert_serves(server.port, tmp_path)
    finally:
        server.stop()


def test_start_on_a_busy_port_is_unavailable(static: dict[str, Path]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))
        port = taken.getsockname()[1]
        server = StageOneServer(static, host=HOST, port=port)
        with pytest.raises(Unavailable, match=f"{HOST}:{port}"):
            server.start()
        assert not server.running
        assert server.root is None
        server.stop()


def test_start_twice_is_an_error(server: StageOneServer) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        server.start()


def test_wildcard_address_answers_from_the_address_asked(
    make_server: Callable[..., StageOneServer], raw: Callable[[int], Raw], tmp_path: Path
) -> None:
    server = make_server(host="0.0.0.0")
    client = raw(server.port)
    client.send(rrq(b"exact.bin"))
    _, transfer = client.data(1)
    assert transfer[0] == HOST
    assert_serves(server.port, tmp_path)
