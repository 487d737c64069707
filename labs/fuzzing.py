"""The fuzz targets: every parser that takes input from outside, as a function of bytes.

Used by the CI pass (``tests/test_fuzz.py``, hypothesis) and the long pass
(``bench/fuzz.py``, atheris).  Each :class:`Target` runs one parser on one input
and checks what holds beyond "no crash" where that is cheap; :func:`run`
lets only the parser's *declared* errors pass (each target names them, from
the parser's docstring) — anything else, an ``AssertionError`` from a
property included, escapes as a finding.  No target catches ``Exception``.

Seeds (small valid inputs) are in ``tests/fuzz_seeds/<target>/``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

from slim.agent import manifest as mf
from slim.agent import secrets as node_secrets
from slim.agent.plan import BootArgs, PlanError, parse_plan
from slim.agent.tree import scan
from slim.agent.unpack import ReadAhead, TreeWriter, UnsafeEntry, extract_archive, read_archive
from slim.core.build.tarimport import extract_tar
from slim.core.control.auth import bearer, parse_token
from slim.core.registry import load_registry_text
from slim.errors import ConfigError, InvalidArgument, Unauthenticated
from slim.objects.routes import parse_range
from slim.pki import identity_of_pem
from slim.relay import tftp
from slim.relay.api import events_from_body, node_ref
from slim.release import decode_manifest
from slim.vocabulary import HEX_RE, MAX_SIZE, parse_duration, parse_rate, parse_size

SEEDS = Path(__file__).resolve().parent.parent / "tests" / "fuzz_seeds"


@dataclass(frozen=True)
class Target:
    name: str
    parser: str  # what is fuzzed, for the docs and the bench's record
    check: Callable[[bytes], None]
    declared: tuple[type[Exception], ...]

    def seeds(self) -> list[bytes]:
        folder = SEEDS / self.name
        return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()]


def run(target: Target, data: bytes) -> None:
    """One input: the declared errors are expected answers; anything else escapes."""
    with contextlib.suppress(*target.declared):
        target.check(data)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


# -- TFTP (relay/tftp.py) ------------------------------------------------------------


def check_tftp_name(data: bytes) -> None:
    name = tftp.clean_name(_text(data))
    assert name and not name.startswith("/"), name
    assert len(name.encode("utf-8", "surrogateescape")) <= tftp.MAX_NAME_BYTES
    assert not any(ch in name for ch in "\0\\") and all(ord(c) >= 0x20 and ord(c) != 0x7F for c in name)
    assert all(part not in ("", ".", "..") for part in name.split("/")), name


class _Looked:
    """The stage-1 server's ``dynamic``: records the names it is asked for, answers None."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, name: str, client_ip: str) -> bytes | None:
        self.names.append(name)
        return None


_LOOKED = _Looked()
_TFTP = tftp.StageOneServer({}, _LOOKED, host="127.0.0.1", port=0)  # never started: no socket


def check_tftp_request(data: bytes) -> None:
    """The request port's whole path for one datagram (size, opcode, tftpy's RRQ parse,
    mode, options, the name policy, the lookup), without sockets: ``dynamic`` answers
    None, so no session starts.  Every datagram is answered by a rejection (which the
    server turns into an ERROR packet or silence); a name that reaches the lookup
    passed :func:`~slim.relay.tftp.clean_name` unchanged."""
    _LOOKED.names.clear()
    try:
        _TFTP._on_request(data, ("127.0.0.1", 40000), None)
    except tftp._Reject as rejected:
        kind, code, message = rejected.kind, rejected.code, rejected.message
    else:
        raise AssertionError("a request was neither refused nor served")
    assert kind in ("bad", "refused"), kind
    assert 0 <= code <= 8
    tftp.error_packet(code, message)
    for name in _LOOKED.names:
        assert tftp.clean_name(name) == name, name


# -- the relay's HTTP inputs (slim/objects/routes.py, relay/api.py) -------------------


def check_object_range(data: bytes) -> None:
    """``Range`` against an object of a size taken from the first 8 bytes."""
    size = struct.unpack("!Q", data[:8].ljust(8, b"\0"))[0] % (MAX_SIZE + 1)
    header = data[8:].decode("latin-1")  # how HTTP headers reach aiohttp
    got = parse_range(header, size)
    if got is not None and got is not False:
        start, end = got
        assert 0 <= start < end <= size, (header, size, got)


def check_relay_paths(data: bytes) -> None:
    """The object name check and a node API path's node (name or MAC), as aiohttp
    hands them over (percent-decoded UTF-8)."""
    text = data.decode("utf-8", "replace")
    if HEX_RE.fullmatch(text):
        assert re.fullmatch(r"[0-9a-f]{64}", text), text
    ref = node_ref(text)
    assert ref.WhichOneof("ref") in ("name", "mac")


def check_node_events(data: bytes) -> None:
    events = events_from_body("n1", "r1", data)
    assert 1 <= len(events) <= 1000
    for ev in events:
        assert ev.node == "n1" and ev.relay == "r1" and ev.boot_id and ev.stage
        assert ev.bytes >= 0 and ev.duration >= 0


# -- the registry (core/registry.py, core/yamlsource.py) ------------------------------


def check_registry(data: bytes) -> None:
    load_registry_text(data.decode("utf-8", "replace"), "fuzz.yaml")


# -- manifests (agent/manifest.py, slim/release.py) -----------------------------------


def check_manifest(data: bytes) -> None:
    """Decode; a decoded manifest encodes to bytes that decode to the same manifest."""
    m = mf.decode(data)
    for e in m.entries:
        assert e.sha256 == "" or re.fullmatch(r"[0-9a-f]{64}", e.sha256), e.sha256
    assert mf.decode(mf.encode(m)) == m


def check_release_manifest(data: bytes) -> None:
    """The relays' and the core's decoder: the bytes as stored (zstd) and compressed here."""
    with contextlib.suppress(InvalidArgument):
        decode_manifest(data)
    decode_manifest(zstandard.ZstdCompressor(level=1).compress(data))


# -- the agent (agent/plan.py, agent/unpack.py) ---------------------------------------


def check_plan(data: bytes) -> None:
    """A parsed plan's directories are absolute, normalised, unique, parents first."""
    plan = parse_plan(data)
    paths = [d.path for d in plan.directories]
    assert "/" in paths and len(set(paths)) == len(paths)
    for i, p in enumerate(paths):
        assert p == "/" or (os.path.normpath(p) == p and p.startswith("/") and "\0" not in p), p
        for later in paths[i + 1 :]:
            assert not (p != "/" and p.startswith(later + "/")), f"{later} after its child {p}"
    assert all(r.startswith("http://") and not r.endswith("/") for r in plan.relays)
    for d in plan.directories:  # an archive's parts: ranges of it, that add up to it
        assert not d.parts or (d.archive is not None and sum(p.size for p in d.parts) == d.archive.size)
        assert all(p.size > 0 for p in d.parts)


def check_cmdline(data: bytes) -> None:
    args = BootArgs.from_cmdline(_text(data))
    assert args.node and args.init.startswith("/") and 0 < args.deadline < float("inf")
    assert all(re.fullmatch(r"http://[^/\s]+", u) for u in args.relays)


def check_tar(data: bytes) -> None:
    """Extract into ``outer/root``; nothing may appear or change outside ``root``."""
    with tempfile.TemporaryDirectory(prefix="slim-fuzz-tar-") as tmp:
        outer = Path(tmp)
        root = outer / "root"
        root.mkdir()
        (outer / "sentinel").write_bytes(b"untouched")
        try:
            extract_tar(io.BytesIO(data), root)
        finally:
            assert sorted(p.name for p in outer.iterdir()) == ["root", "sentinel"]
            assert (outer / "sentinel").read_bytes() == b"untouched"
            assert not (outer / "sentinel").is_symlink()
            _assert_inside(root)


def check_archive(data: bytes) -> None:
    """The agent's fast reader of SLIM's own archives, through a ReadAhead as the agent
    reads zstd's pipe (a small buffer: members cross its ends): nothing outside ``root``,
    as for check_tar; and what it unpacks, tarfile's extract_tar unpacks the same."""
    with tempfile.TemporaryDirectory(prefix="slim-fuzz-archive-") as tmp:
        outer = Path(tmp)
        root, other = outer / "root", outer / "other"
        root.mkdir()
        other.mkdir()
        (outer / "sentinel").write_bytes(b"untouched")
        try:
            extract_archive(ReadAhead(io.BytesIO(data), 4096), root, fresh=True)
        finally:
            assert sorted(p.name for p in outer.iterdir()) == ["other", "root", "sentinel"]
            assert (outer / "sentinel").read_bytes() == b"untouched"
            _assert_inside(root)
        extract_tar(io.BytesIO(data), other)
        assert _tree(root) == _tree(other)


def check_archive_parts(data: bytes) -> None:
    """The agent's unpacking of an archive in parts (slim.agent.ee._extract_parts), in one
    process, one part after the other: the bytes cut in two at the 512-byte block nearest
    their middle (a member's boundary or not), each read as a part (it may end where a
    header would begin) by a shared TreeWriter of its own, then the hard links made and the
    directories' metadata set, once: nothing outside ``root``."""
    cut = len(data) // 1024 * 512
    with tempfile.TemporaryDirectory(prefix="slim-fuzz-parts-") as tmp:
        outer = Path(tmp)
        root = outer / "root"
        root.mkdir()
        (outer / "sentinel").write_bytes(b"untouched")
        writers = [TreeWriter(root, fresh=True, shared=True) for _ in range(2)]
        try:
            dirs, links = [], []
            for writer, piece in zip(writers, (data[:cut], data[cut:]), strict=True):
                for entry, member in read_archive(ReadAhead(io.BytesIO(piece), 4096), part=True):
                    writer.add(entry, member)
                more_dirs, more_links = writer.pending()
                dirs += more_dirs
                links += more_links
            last = writers[-1]
            last.adopt(dirs)
            last.later = None
            for link in links:
                last.add(link)
            last.finish()
        finally:
            for writer in writers:
                writer.close()
            assert sorted(p.name for p in outer.iterdir()) == ["root", "sentinel"]
            assert (outer / "sentinel").read_bytes() == b"untouched"
            _assert_inside(root)


def _tree(root: Path) -> list[tuple[object, ...]]:
    """Every entry and file's bytes (directories the archive does not list are made when
    unpacking: their times are not compared)."""
    return [
        (
            e if e.kind != "dir" else e.replace(mtime_ns=0),
            (root / e.path).read_bytes() if e.kind == "file" else b"",
        )
        for e in scan(root)
    ]


def _assert_inside(root: Path) -> None:
    """No hard link under ``root`` shares an inode with anything outside it (the
    sentinel is the only other file there is)."""
    outside = (root.parent / "sentinel").stat()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, n))
            assert (st.st_dev, st.st_ino) != (outside.st_dev, outside.st_ino)


def check_secrets(data: bytes) -> None:
    """A relay's secrets answer, parsed, then written under ``outer/root``: nothing may
    appear or change outside ``root``."""
    parsed = node_secrets.parse(data)
    with tempfile.TemporaryDirectory(prefix="slim-fuzz-secrets-") as tmp:
        outer = Path(tmp)
        root = outer / "root"
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nmunge:x:120:130::/:/bin/false\n")
        (root / "etc" / "group").write_text("root:x:0:\nmunge:x:130:\n")
        (outer / "sentinel").write_bytes(b"untouched")
        try:
            written = node_secrets.install(root, parsed)
        finally:
            assert sorted(p.name for p in outer.iterdir()) == ["root", "sentinel"]
            assert (outer / "sentinel").read_bytes() == b"untouched"
        for secret in parsed:
            if secret.path in written:
                assert (root / secret.path.lstrip("/")).read_bytes() in {s.content for s in parsed}


# -- credentials (core/control/auth.py, slim/pki.py) ---------------------------------


def check_credentials(data: bytes) -> None:
    """An ``authorization`` header, a token's text, a certificate a caller presents."""
    text = _text(data)
    with contextlib.suppress(Unauthenticated):
        token = bearer([("authorization", text)])
        assert token is None or token == token.strip()
    with contextlib.suppress(Unauthenticated):
        kind, token_id, secret = parse_token(text)
        assert kind in ("admin", "node") and len(token_id) == 16 and len(secret) == 43
    identity = identity_of_pem(data)
    assert identity.role in ("relay", "admin", "core") and identity.name


# -- the size/duration/rate vocabulary (slim/vocabulary.py) ---------------------------


def check_vocabulary(data: bytes) -> None:
    text = _text(data)
    for parse in (parse_size, parse_duration, parse_rate):
        try:
            value = parse(text)
        except InvalidArgument:
            continue
        assert 0 <= value <= MAX_SIZE * 8, (parse.__name__, text, value)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("tftp_name", "relay/tftp.py clean_name", check_tftp_name, (ValueError,)),
        Target(
            "tftp_request",
            "relay/tftp.py StageOneServer's request path (RRQ parse, mode, options, name)",
            check_tftp_request,
            (),
        ),
        Target("object_range", "slim/objects/routes.py parse_range", check_object_range, ()),
        Target("relay_paths", "object name check (HEX_RE), relay/api.py node_ref", check_relay_paths, ()),
        Target(
            "node_events",
            "relay/api.py events_from_body, event_from_json",
            check_node_events,
            (InvalidArgument,),
        ),
        Target("registry", "core/registry.py load_registry_text", check_registry, (ConfigError,)),
        Target("manifest", "agent/manifest.py decode", check_manifest, (ValueError,)),
        Target(
            "release_manifest", "slim/release.py decode_manifest", check_release_manifest, (InvalidArgument,)
        ),
        Target("plan", "agent/plan.py parse_plan", check_plan, (PlanError,)),
        Target("cmdline", "agent/plan.py BootArgs.from_cmdline, parse_cmdline", check_cmdline, (PlanError,)),
        Target("tar", "core/build/tarimport.py extract_tar", check_tar, (UnsafeEntry,)),
        Target("archive", "agent/unpack.py extract_archive (read_archive)", check_archive, (UnsafeEntry,)),
        Target(
            "archive_parts",
            "agent/unpack.py read_archive(part=True), TreeWriter(shared=True)",
            check_archive_parts,
            (UnsafeEntry,),
        ),
        Target(
            "vocabulary", "slim/vocabulary.py parse_size, parse_duration, parse_rate", check_vocabulary, ()
        ),
        Target("secrets", "agent/secrets.py parse, install", check_secrets, (PlanError,)),
        Target(
            "credentials",
            "core/control/auth.py bearer, parse_token; slim/pki.py identity_of_pem",
            check_credentials,
            (InvalidArgument,),
        ),
    )
}


def quiet() -> None:
    """The TFTP server logs every refused request at WARNING: not while fuzzing."""
    logging.getLogger("slim.relay.tftp").setLevel(logging.CRITICAL)


def seed_json(name: str) -> list[object]:
    """The seeds of a JSON target, decoded."""
    return [json.loads(s) for s in TARGETS[name].seeds()]
