"""TFTP for the first boot stage (PXE ROMs fetch ``undionly.kpxe``, ``pxelinux.0``,
``pxelinux.cfg/01-<mac>`` ... here), on top of tftpy's per-session protocol code.

Why not ``tftpy.TftpServer.listen()``:

- It dies on a malformed request.  ``listen()`` only catches ``TftpException`` around
  a session, but parsing raises other exceptions too: the RRQ
  ``b'\\x00\\x01\\xff\\x00octet\\x00'`` raises ``UnicodeDecodeError`` and the option
  ``blksize=abc`` raises ``ValueError`` out of ``listen()``, which ends the server
  for every node.
- It serves the file system: an RRQ opens ``root/<name>`` (an ``abspath`` prefix
  check, symbolic links followed, and a name that *starts with* the root path is
  taken as is), and a WRQ writes into the root (making directories).
- It retries too eagerly: after the first timeout of a session it never restarts
  the session's clock, so every later pass of the loop (woken by any other
  session's traffic) counts as one more timeout, and a client that missed one
  packet during a busy moment is dropped in milliseconds.
- It accepts datagrams on a session's port from any address (it logs a warning and
  hands them to the session anyway).

So :class:`StageOneServer` runs its own receive loop (modelled on ``listen()``) and
uses tftpy only for what it does well: one ``TftpContextServer`` per transfer
(options ``blksize``/``tsize``, DATA/ACK stepping, ``checkTimeout``/``resendLast``).

The request port.  Every datagram is read with a buffer larger than any UDP
datagram and checked before a session exists: more than :data:`MAX_REQUEST_BYTES`,
truncated, an unknown opcode, DATA/ACK/OACK (answered with ERROR 4 "illegal
operation") or ERROR (never answered) is a *bad packet*; a WRQ is refused with
ERROR 2 ("uploads are not accepted"); an RRQ is parsed with tftpy's
``TftpPacketFactory`` inside ``try`` (anything it raises is a bad packet, ERROR 4),
its mode must be ``octet`` or ``netascii`` (both are served as binary, as tftpy
does) and its options are checked here (``blksize`` 8..65464, larger values are
lowered to 65464; ``tsize`` a number; a bad value is ERROR 8; other options are
ignored, as RFC 2347 allows).

The name policy (:func:`clean_name`).  One leading ``/`` is stripped; a name that
is empty, longer than :data:`MAX_NAME_BYTES`, contains NUL, a backslash or a
control character, or has an empty, ``.`` or ``..`` component is refused (ERROR
2).  The clean name is looked up *exactly* in the ``static`` table (served name ->
real file; opened here, regular files only), otherwise passed to
``dynamic(name, client_ip)``, which returns the content or ``None`` (ERROR 1, not
found); if ``dynamic`` raises, the client gets ERROR 0 and the server goes on.
tftpy never opens a path from a request: its root is an empty private directory
(created by :meth:`StageOneServer.start`, not writable, removed by
:meth:`StageOneServer.stop`) and each session's ``dyn_file_func`` returns the file
object opened here, which the session closes when it ends.

Sessions.  Every call into tftpy for one session (``start``, ``cycle``,
``checkTimeout``, ``resendLast``, ``end``) is wrapped: *any* exception ends that
session only -- one WARNING line naming the client and the reason, an ERROR
packet to the client unless tftpy already sent one (or the client sent one), and
its socket and file are closed.  A session's socket only takes datagrams from its
client (others get ERROR 5, "unknown transfer ID"), and is bound to the address
the request came to, so a multi-homed relay answers from the address the node
talked to.  At most ``max_sessions`` transfers run at once (more are refused with
ERROR 0, "server busy").

Threading.  One daemon thread runs the loop: ``select`` (via :mod:`selectors`)
with a timeout no longer than the next session deadline or one second, a stop
flag checked on every pass, and a socket pair that wakes it up on :meth:`stop`.
``dynamic`` is called on that thread, so it must be quick (it may block the loop
briefly, e.g. for a lookup in memory; a slow ``dynamic`` delays every transfer).
:attr:`StageOneServer.stats` is written by that thread only.

Logging.  tftpy logs at INFO for every session (and at DEBUG for every packet);
the server sets the ``tftpy`` logger to WARNING unless the application has set a
level for it already.  This module logs through ``slim.relay.tftp``: INFO for a
finished transfer and for names not found (a PXE client probes several names per
boot), WARNING for failed transfers, refused and malformed requests.

IPv4 only (PXE TFTP is; tftpy's sessions are IPv4 sockets).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import selectors
import shutil
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from tftpy.TftpContexts import TftpContextServer
from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import TftpPacketERR, TftpPacketRRQ
from tftpy.TftpShared import (
    TftpException,
    TftpTimeout,
    TftpTimeoutExpectACK,
)

from slim.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

DynamicFiles = Callable[[str, str], bytes | None]
"""``dynamic(name, client_ip)``: the content of ``name`` for that client, or None."""

# Opcodes (RFC 1350, RFC 2347).
OP_RRQ: Final = 1
OP_WRQ: Final = 2
OP_DATA: Final = 3
OP_ACK: Final = 4
OP_ERROR: Final = 5
OP_OACK: Final = 6
_OPCODE_NAMES: Final = {OP_DATA: "DATA", OP_ACK: "ACK", OP_OACK: "OACK"}

# Error codes.
ERR_NOT_DEFINED: Final = 0
ERR_NOT_FOUND: Final = 1
ERR_ACCESS: Final = 2
ERR_ILLEGAL: Final = 4
ERR_UNKNOWN_TID: Final = 5
ERR_OPTIONS: Final = 8

MAX_REQUEST_BYTES: Final = 1024
"""A longer datagram on the request port is refused (RFC 2347 keeps requests in 512
bytes; the rest is headroom for generous clients)."""
RECV_BUFFER: Final = 128 * 1024
"""Larger than any UDP datagram (and than tftpy's MAX_BLKSIZE), so nothing is truncated."""
MAX_NAME_BYTES: Final = 255
MIN_BLKSIZE: Final = 8
MAX_BLKSIZE: Final = 65464
"""RFC 2348's limit; tftpy would go to 65536, which does not fit in a UDP datagram."""
MAX_SESSIONS: Final = 256
MAX_POLL: Final = 1.0
"""Longest ``select``; deadlines of sessions and of a draining stop shorten it."""
JOIN_MARGIN: Final = 5.0
"""How much longer than ``grace`` :meth:`StageOneServer.stop` waits for the thread."""
MAX_ERROR_TEXT: Final = 120

# Python 3.11 has no socket.IP_PKTINFO; on Linux it is 8 (<linux/in.h>).
_IP_PKTINFO: Final[int | None] = getattr(
    socket, "IP_PKTINFO", 8 if sys.platform.startswith("linux") else None
)
_PKTINFO_SPACE: Final = socket.CMSG_SPACE(12)  # struct in_pktinfo
_WILDCARDS: Final = frozenset({"", "0.0.0.0"})  # noqa: S104 - compared with, not bound to

_MAIN: Final = "main"
_WAKE: Final = "wake"


@dataclass
class TftpStats:
    """Counters of one :class:`StageOneServer`, written by its thread only.

    A request is counted once: as a bad packet, a refusal, a busy refusal or a
    session; a session ends either completed or failed (``sessions == completed +
    failed + running``).
    """

    sessions: int = 0
    """Transfers started: requests that passed every check and reached their
    content (a failing ``dynamic`` or unreadable static file counts here and as failed)."""
    completed: int = 0
    """Sessions whose last DATA was acknowledged."""
    failed: int = 0
    """Sessions ended otherwise: timeout, client error, protocol error, stop."""
    bad_packets: int = 0
    """Malformed or unexpected datagrams: on the request port, or on a session's port
    from someone other than its client."""
    refused: int = 0
    """Well-formed requests refused: uploads, names against the policy, not found."""
    busy: int = 0
    """Requests refused because ``max_sessions`` transfers were running."""
    bytes_sent: int = 0
    """File bytes sent in DATA packets (retransmissions not counted)."""


class _Reject(Exception):
    """A request answered with an ERROR packet (or nothing) and no session."""

    def __init__(
        self,
        kind: str,
        code: int,
        reason: str,
        *,
        message: str | None = None,
        reply: bool = True,
        level: int = logging.WARNING,
    ) -> None:
        super().__init__(reason)
        self.kind = kind  # "bad" | "refused" | "busy" | "failed"
        self.code = code
        self.reason = reason
        self.message = reason if message is None else message
        self.reply = reply
        self.level = level


@dataclass(eq=False)
class _Session:
    client: tuple[str, int]
    name: str
    context: Any  # tftpy.TftpContexts.TftpContextServer
    fileobj: IO[bytes]
    started: float = field(default_factory=time.time)


# called on the TFTP thread when a transfer ends: client address, name, started, ended
# (time.time()), bytes sent, whether it completed (size queries are not transfers)
TransferHook = Callable[[str, str, float, float, int, bool], None]


def clean_name(raw: str) -> str:
    """The served name for a requested one, or :class:`ValueError` saying why the
    name is refused (see the module docstring for the policy)."""
    name = raw[1:] if raw.startswith("/") else raw
    if not name:
        raise ValueError("empty file name")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise ValueError(f"file name longer than {MAX_NAME_BYTES} bytes")
    if "\0" in name:
        raise ValueError("NUL in file name")
    if "\\" in name:
        raise ValueError("backslash in file name")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ValueError("control character in file name")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            shown = part or "empty"
            raise ValueError(f"{shown} component in file name")
    return name


def error_packet(code: int, message: str) -> bytes:
    """A TFTP ERROR packet (tftpy's own encoder has no message for code 0)."""
    text = message.replace("\0", " ").encode("ascii", "replace")[:MAX_ERROR_TEXT]
    return struct.pack("!HH", OP_ERROR, code) + text + b"\0"


def _describe(err: BaseException) -> str:
    text = str(err).replace("\n", " ").strip()
    name = type(err).__name__
    described = f"{name}: {text}" if text else name
    return described[:200]


def _error_code_for(err: BaseException) -> int:
    """Protocol trouble (what tftpy raises on a packet it does not like) is an
    illegal operation; anything else is the server's own problem."""
    if isinstance(err, TftpException | ValueError | struct.error | UnicodeError):
        return ERR_ILLEGAL
    return ERR_NOT_DEFINED


def _peer_error_text(data: bytes) -> str:
    if len(data) < 4:
        return "ERROR packet"
    code = int.from_bytes(data[2:4], "big")
    text = data[4:].split(b"\0", 1)[0].decode("ascii", "replace")[:MAX_ERROR_TEXT]
    return f"error {code} {text!r}"


def _parse_number(value: str) -> int | None:
    if value.isascii() and value.isdigit() and len(value) <= 12:
        return int(value)
    return None


def _negotiate(options: Mapping[str, str]) -> dict[str, str]:
    """The options handed to tftpy: only valid blksize and tsize (names are
    case-insensitive, RFC 2347)."""
    accepted: dict[str, str] = {}
    for raw_key, value in options.items():
        key = raw_key.lower()
        if key == "blksize":
            size = _parse_number(value)
            if size is None or size < MIN_BLKSIZE:
                raise _Reject("bad", ERR_OPTIONS, f"bad blksize {value[:20]!r}")
            accepted["blksize"] = str(min(size, MAX_BLKSIZE))
        elif key == "tsize":
            if _parse_number(value) is None:
                raise _Reject("bad", ERR_OPTIONS, f"bad tsize {value[:20]!r}")
            accepted["tsize"] = "0"
    return accepted


def _open_regular(path: Path) -> IO[bytes]:
    """Open a static file for reading; regular files only (O_NONBLOCK so that a
    FIFO put there by mistake cannot hang the server thread)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _pktinfo_local_address(ancdata: list[tuple[int, int, bytes]]) -> str | None:
    for level, kind, payload in ancdata:
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(payload) >= 12:
            # struct in_pktinfo {int ipi_ifindex; in_addr ipi_spec_dst; in_addr ipi_addr;}
            return socket.inet_ntoa(payload[4:8])
    return None


def _quiet_tftpy() -> None:
    tftpy_log = logging.getLogger("tftpy")
    if tftpy_log.level == logging.NOTSET:
        tftpy_log.setLevel(logging.WARNING)


class StageOneServer:
    """TFTP for the first boot stage: a fixed table of static files plus dynamic
    files (e.g. ``pxelinux.cfg/01-<mac>``).

    ``static`` maps served names (``"undionly.kpxe"``, ``"efi/ipxe.efi"``; they must
    pass :func:`clean_name` unchanged) to real files; ``dynamic(name, client_ip)``
    answers every other name with bytes or None.  ``timeout`` is the seconds to
    wait for an ACK before resending, ``retries`` the transmissions of one packet
    before the session is given up (so a vanished client costs about
    ``timeout * retries`` seconds).
    """

    def __init__(
        self,
        static: Mapping[str, Path],
        dynamic: DynamicFiles | None = None,
        host: str = "0.0.0.0",  # noqa: S104 - a relay serves every interface by default
        port: int = 69,
        timeout: float = 5.0,
        retries: int = 3,
        *,
        max_sessions: int = MAX_SESSIONS,
        on_transfer: TransferHook | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise InvalidArgument(f"TFTP port {port} is not in 0..65535")
        if timeout <= 0:
            raise InvalidArgument(f"TFTP timeout must be positive, not {timeout}")
        if retries < 1:
            raise InvalidArgument(f"TFTP retries must be at least 1, not {retries}")
        if max_sessions < 1:
            raise InvalidArgument(f"TFTP max_sessions must be at least 1, not {max_sessions}")
        self._static: dict[str, Path] = {}
        for name, path in static.items():
            try:
                if clean_name(name) != name:
                    raise ValueError("leading /")
            except ValueError as err:
                raise InvalidArgument(f"static TFTP name {name!r} cannot be served: {err}") from None
            self._static[name] = Path(path)
        self._dynamic = dynamic
        self.host = host
        self.port = port
        self._requested_port = port
        self.timeout = timeout
        self.retries = retries
        self.max_sessions = max_sessions
        self.on_transfer = on_transfer
        self.stats = TftpStats()

        self._lock = threading.Lock()  # start() and stop()
        self._stopping = threading.Event()
        self._grace = 0.0
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._bound_ip: str | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._root: Path | None = None
        self._sessions: dict[tuple[str, int], _Session] = {}
        self._factory: Any = TftpPacketFactory()
        _quiet_tftpy()

    # -- public --------------------------------------------------------------

    @property
    def root(self) -> Path | None:
        """The empty directory given to tftpy as its root while running (for
        diagnostics and tests; nothing is ever served from it)."""
        return self._root

    @property
    def running(self) -> bool:
        """Whether the server thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self) -> int:
        """Bind, start the server thread and return the bound port; raises
        :class:`~slim.errors.Unavailable` naming ``host:port`` if it cannot bind."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("StageOneServer is already running")
            where = f"{self.host}:{self._requested_port}"
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind((self.host, self._requested_port))
            except OSError as err:
                sock.close()
                reason = err.strerror or str(err) or type(err).__name__
                raise Unavailable(f"TFTP server cannot listen on {where} (UDP): {reason}") from err
            try:
                self._setup(sock)
            except BaseException:
                self._teardown()
                raise
            self._stopping.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"tftp {self.host}:{self.port}", daemon=True
            )
            self._thread.start()
        log.info(
            "TFTP serving %d static names%s on %s:%d",
            len(self._static),
            " and dynamic files" if self._dynamic else "",
            self.host,
            self.port,
        )
        return self.port

    def stop(self, grace: float = 5.0) -> None:
        """Take no new requests, give running transfers up to ``grace`` seconds,
        end the rest, join the thread and close every socket.  Idempotent; must not
        be called from ``dynamic`` (the server's own thread)."""
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            if thread is threading.current_thread():
                raise RuntimeError("StageOneServer.stop() called from the server thread")
            self._grace = max(0.0, grace)
            self._stopping.set()
            self._wake()
            thread.join(self._grace + JOIN_MARGIN)
            if thread.is_alive():
                log.error("TFTP server thread on %s:%d did not stop", self.host, self.port)
                return
            self._thread = None
            self._teardown()
        log.info("TFTP server on %s:%d stopped", self.host, self.port)

    # -- set up and tear down -----------------------------------------------

    def _setup(self, sock: socket.socket) -> None:
        self._sock = sock
        sock.setblocking(False)
        self._bound_ip, self.port = sock.getsockname()[:2]
        if self._bound_ip in _WILDCARDS and _IP_PKTINFO is not None:
            try:
                sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
            except OSError as err:  # pragma: no cover - platform without IP_PKTINFO
                log.debug("IP_PKTINFO unavailable: %s", err)
        root = Path(tempfile.mkdtemp(prefix="slim-tftp-root-"))
        self._root = root
        root.chmod(0o500)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ, _MAIN)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)

    def _teardown(self) -> None:
        """Close what is left (after the thread ended, or after a failed start)."""
        for session in list(self._sessions.values()):
            self._end(session, ok=False, reason="server stopped", code=ERR_NOT_DEFINED)
        self._close_main()
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for attr in ("_wake_r", "_wake_w"):
            wake: socket.socket | None = getattr(self, attr)
            if wake is not None:
                wake.close()
                setattr(self, attr, None)
        if self._root is not None:
            with contextlib.suppress(OSError):
                self._root.chmod(0o700)
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def _close_main(self) -> None:
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
        sock.close()

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

    # -- the loop ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # pragma: no cover - the loop catches per pass
            log.exception("TFTP server loop crashed")
        finally:
            for session in list(self._sessions.values()):
                self._end(
                    session,
                    ok=False,
                    reason="server stopping",
                    code=ERR_NOT_DEFINED,
                    message="server shutting down",
                )
            self._close_main()

    def _loop(self) -> None:
        drain_until: float | None = None
        while True:
            if self._stopping.is_set() and drain_until is None:
                drain_until = time.monotonic() + self._grace
                self._close_main()
                if self._sessions:
                    log.info(
                        "TFTP stopping: %d transfers get up to %.1fs to finish",
                        len(self._sessions),
                        self._grace,
                    )
            if drain_until is not None and (not self._sessions or time.monotonic() >= drain_until):
                return
            try:
                self._pass(drain_until)
            except Exception:
                log.exception("TFTP server loop error (continuing)")
                self._stopping.wait(0.1)  # no hot loop if the error repeats

    def _pass(self, drain_until: float | None) -> None:
        selector = self._selector
        assert selector is not None
        for key, _events in selector.select(self._next_wait(drain_until)):
            if key.data == _MAIN:
                self._on_request_port()
            elif key.data == _WAKE:
                if self._wake_r is not None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(64)
            else:
                session: _Session = key.data
                if session.client in self._sessions:
                    self._on_session_port(session)
        self._check_timeouts(time.time())

    def _next_wait(self, drain_until: float | None) -> float:
        now = time.time()  # tftpy keeps last_update in time.time()
        wait = MAX_POLL
        for session in self._sessions.values():
            ctx = session.context
            if ctx.timeout_expectACK:
                return 0.0
            # A hair past the deadline: checkTimeout() wants strictly more than timeout.
            wait = min(wait, float(ctx.last_update) + float(ctx.timeout) - now + 0.002)
        if drain_until is not None:
            wait = min(wait, drain_until - time.monotonic())
        return max(wait, 0.0)

    # -- the request port ----------------------------------------------------

    def _on_request_port(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data, ancdata, _flags, address = sock.recvmsg(RECV_BUFFER, _PKTINFO_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.warning("TFTP receive on %s:%d failed: %s", self.host, self.port, err)
            return
        client = (str(address[0]), int(address[1]))
        try:
            self._on_request(data, client, _pktinfo_local_address(ancdata))
        except _Reject as rejected:
            self._reject(rejected, client)

    def _on_request(self, data: bytes, client: tuple[str, int], local_ip: str | None) -> None:
        if len(data) > MAX_REQUEST_BYTES:
            raise _Reject("bad", ERR_ILLEGAL, f"request of {len(data)} bytes is too large")
        if len(data) < 2:
            raise _Reject("bad", ERR_ILLEGAL, f"truncated packet ({len(data)} bytes)")
        opcode = int.from_bytes(data[:2], "big")
        if opcode == OP_WRQ:
            raise _Reject("refused", ERR_ACCESS, "uploads are not accepted")
        if opcode == OP_ERROR:
            raise _Reject("bad", ERR_ILLEGAL, "ERROR packet on the request port", reply=False)
        if opcode in _OPCODE_NAMES:
            raise _Reject("bad", ERR_ILLEGAL, f"unexpected {_OPCODE_NAMES[opcode]} on the request port")
        if opcode != OP_RRQ:
            raise _Reject("bad", ERR_ILLEGAL, f"unknown opcode {opcode}")
        try:
            packet = self._factory.parse(data)
            filename = str(packet.filename)
            mode = str(packet.mode)
            requested = {str(k): str(v) for k, v in dict(packet.options).items()}
        except Exception as err:  # noqa: BLE001 - costs this request or session only
            raise _Reject("bad", ERR_ILLEGAL, f"malformed request: {_describe(err)}") from None
        if mode not in ("octet", "netascii"):
            raise _Reject("bad", ERR_ILLEGAL, f"unsupported transfer mode {mode[:20]!r}")
        options = _negotiate(requested)
        try:
            name = clean_name(filename)
        except ValueError as err:
            raise _Reject("refused", ERR_ACCESS, f"{filename[:80]!r} refused: {err}") from None
        if client in self._sessions:
            log.debug("TFTP %s:%d: repeated request for %r, transfer already running", *client, name)
            return
        if len(self._sessions) >= self.max_sessions:
            raise _Reject("busy", ERR_NOT_DEFINED, f"{name!r}: server busy", message="server busy")
        fileobj = self._content(name, client)
        self._begin(name, options, fileobj, client, local_ip)

    def _content(self, name: str, client: tuple[str, int]) -> IO[bytes]:
        path = self._static.get(name)
        if path is not None:
            try:
                return _open_regular(path)
            except FileNotFoundError:
                raise _Reject(
                    "failed",
                    ERR_NOT_FOUND,
                    f"{name!r}: static file {path} is missing",
                    message="file not found",
                ) from None
            except OSError as err:
                raise _Reject(
                    "failed",
                    ERR_NOT_DEFINED,
                    f"{name!r}: cannot read static file {path}: {err.strerror or err}",
                    message="cannot read file",
                ) from None
        if self._dynamic is None:
            raise _Reject("refused", ERR_NOT_FOUND, f"{name!r} not found", level=logging.INFO)
        try:
            content = self._dynamic(name, client[0])
            if content is not None and not isinstance(content, bytes | bytearray | memoryview):
                raise TypeError(f"dynamic returned {type(content).__name__}, not bytes")
        except Exception as err:
            log.debug("TFTP dynamic(%r, %r) failed", name, client[0], exc_info=True)
            raise _Reject(
                "failed",
                ERR_NOT_DEFINED,
                f"{name!r}: dynamic files failed: {_describe(err)}",
                message="internal error",
            ) from None
        if content is None:
            raise _Reject("refused", ERR_NOT_FOUND, f"{name!r} not found", level=logging.INFO)
        return io.BytesIO(bytes(content))

    def _begin(
        self,
        name: str,
        options: dict[str, str],
        fileobj: IO[bytes],
        client: tuple[str, int],
        local_ip: str | None,
    ) -> None:
        def provide(_name: str, **_kwargs: object) -> IO[bytes]:
            return fileobj

        assert self._root is not None and self._selector is not None
        try:
            ctx = TftpContextServer(
                client[0],
                client[1],
                self.timeout,
                str(self._root),
                dyn_file_func=provide,
                upload_open=None,
                retries=self.retries,
                flock=False,  # tftpy's unlock in end() fails on a BytesIO
            )
        except Exception as err:  # noqa: BLE001 - costs this request or session only
            fileobj.close()
            raise _Reject(
                "failed",
                ERR_NOT_DEFINED,
                f"{name!r}: cannot open a session: {_describe(err)}",
                message="server busy",
            ) from None
        # tftpy leaves the socket blocking with a timeout; a datagram that select()
        # announced but the kernel then dropped (bad checksum) would stall the loop.
        ctx.sock.setblocking(False)
        source = self._bound_ip if self._bound_ip not in _WILDCARDS else local_ip
        if source:
            try:
                ctx.sock.bind((source, 0))
            except OSError as err:
                log.debug("TFTP session socket not bound to %s: %s", source, err)
        session = _Session(client, name, ctx, fileobj)
        self._sessions[client] = session
        self.stats.sessions += 1
        try:
            self._selector.register(ctx.sock, selectors.EVENT_READ, session)
            request = TftpPacketRRQ()
            request.filename = name
            request.mode = "octet"
            request.options = options
            ctx.start(request.encode().buffer)
        except TftpTimeoutExpectACK:
            ctx.timeout_expectACK = True
        except Exception as err:  # noqa: BLE001 - costs this request or session only
            self._end(session, ok=False, reason=_describe(err), code=_error_code_for(err))

    def _reject(self, rejected: _Reject, client: tuple[str, int]) -> None:
        stats = self.stats
        if rejected.kind == "bad":
            stats.bad_packets += 1
        elif rejected.kind == "refused":
            stats.refused += 1
        elif rejected.kind == "busy":
            stats.busy += 1
        else:
            stats.sessions += 1
            stats.failed += 1
        log.log(rejected.level, "TFTP %s:%d: %s", client[0], client[1], rejected.reason)
        if rejected.reply and self._sock is not None:
            self._send_error(self._sock, client, rejected.code, rejected.message)

    @staticmethod
    def _send_error(sock: socket.socket, to: tuple[str, int], code: int, message: str) -> None:
        try:
            sock.sendto(error_packet(code, message), to)
        except OSError as err:
            log.debug("TFTP cannot send an error to %s:%d: %s", to[0], to[1], err)

    # -- sessions ------------------------------------------------------------

    def _on_session_port(self, session: _Session) -> None:
        ctx = session.context
        sock: socket.socket = ctx.sock
        try:
            data, address = sock.recvfrom(RECV_BUFFER, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError as err:
            self._end(session, ok=False, reason=f"receive failed: {_describe(err)}", code=ERR_NOT_DEFINED)
            return
        sender = (str(address[0]), int(address[1]))
        if sender != session.client:
            with contextlib.suppress(OSError):
                sock.recvfrom(RECV_BUFFER)
            self.stats.bad_packets += 1
            log.warning(
                "TFTP %s:%d: datagram from %s:%d on its transfer port dropped",
                *session.client,
                *sender,
            )
            self._send_error(sock, sender, ERR_UNKNOWN_TID, "unknown transfer ID")
            return
        if data[:2] == OP_ERROR.to_bytes(2, "big"):
            with contextlib.suppress(OSError):
                sock.recvfrom(RECV_BUFFER)
            self._end(session, ok=False, reason=f"client aborted: {_peer_error_text(data)}", reply=False)
            return
        ctx.timeout_expectACK = False
        try:
            ctx.cycle()
        except TftpTimeoutExpectACK:
            ctx.timeout_expectACK = True
            return
        except Exception as err:  # noqa: BLE001 - costs this request or session only
            self._end(session, ok=False, reason=_describe(err), code=_error_code_for(err))
            return
        if ctx.state is None:
            self._end(session, ok=True)

    def _check_timeouts(self, now: float) -> None:
        for session in list(self._sessions.values()):
            ctx = session.context
            try:
                ctx.checkTimeout(now)
                continue
            except TftpTimeout:
                pass
            except Exception as err:  # noqa: BLE001 - costs this request or session only
                self._end(session, ok=False, reason=_describe(err), code=ERR_NOT_DEFINED)
                continue
            ctx.retry_count += 1
            if ctx.retry_count >= ctx.retries:
                self._end(
                    session,
                    ok=False,
                    reason=f"timed out ({self.retries} x {self.timeout:g}s without an answer)",
                    code=ERR_NOT_DEFINED,
                    message="timed out",
                )
                continue
            try:
                ctx.state.resendLast()
            except Exception as err:  # noqa: BLE001 - costs this request or session only
                self._end(session, ok=False, reason=f"resend failed: {_describe(err)}", code=ERR_NOT_DEFINED)
                continue
            # tftpy does not restart the clock after a resend: without this every later
            # pass of the loop would count as one more timeout.
            ctx.last_update = now
            ctx.timeout_expectACK = False

    def _end(
        self,
        session: _Session,
        *,
        ok: bool,
        reason: str = "",
        code: int = ERR_NOT_DEFINED,
        message: str | None = None,
        reply: bool = True,
    ) -> None:
        """Count, log, tell the client (unless tftpy or the client already sent an
        ERROR), then close the session's socket and file."""
        self._sessions.pop(session.client, None)
        ctx = session.context
        sock: socket.socket = ctx.sock
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
        sent = int(ctx.metrics.bytes)
        self.stats.bytes_sent += sent
        client = session.client
        if ok:
            self.stats.completed += 1
            log.info("TFTP %s:%d: sent %r (%d bytes)", client[0], client[1], session.name, sent)
        else:
            self.stats.failed += 1
            if sent == 0 and reason.startswith("client aborted: error 8 "):
                # PXE firmware asks for tsize, then ends option negotiation (error 8) and asks again
                log.info("TFTP %s:%d: %r: size query only (%s)", client[0], client[1], session.name, reason)
            else:
                log.warning(
                    "TFTP %s:%d: transfer of %r failed: %s", client[0], client[1], session.name, reason
                )
            already = isinstance(getattr(ctx, "last_pkt", None), TftpPacketERR)
            if reply and not already:
                self._send_error(sock, client, code, message or reason)
        size_query = not ok and sent == 0
        if self.on_transfer is not None and not size_query:
            try:
                self.on_transfer(client[0], session.name, session.started, time.time(), sent, ok)
            except Exception:
                log.exception("TFTP transfer hook failed")
        try:
            ctx.end()
        except Exception as err:  # noqa: BLE001 - costs this request or session only
            log.debug("TFTP %s:%d: session cleanup: %s", client[0], client[1], _describe(err))
        finally:
            sock.close()
            session.fileobj.close()
