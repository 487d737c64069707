"""Objects and API calls over HTTP from the relays of the plan (standard library only).

Every object is verified: bytes are hashed as they stream, and a digest that
does not match raises :class:`DigestMismatch` (the caller throws away what it
wrote).  When a relay fails mid-object (connection refused or broken, a 5xx,
a short body), the transfer resumes with a ``Range`` request from the next
relay of the list, at the byte where it stopped; a relay that fails so is
left at once for the next, and tried at most ``rounds`` times per request.

A relay that sheds load answers 503: it is asked again after its
``Retry-After`` (seconds or an HTTP date, at most :data:`MAX_RETRY_AFTER`),
or after a doubling backoff when it names none, each wait stretched by up to
half again at random so that a storm of nodes does not come back at once;
meanwhile the other relays of the list are asked.  Busy relays are asked again
for as long as the *boot deadline* allows: ``deadline`` seconds (the kernel
argument ``slim.deadline=``, default :data:`DEFAULT_DEADLINE`) from the start
of the boot, shared by every request and every clone.  The deadline bounds
waiting only: a long transfer, or a request to a relay that need not be waited
for, is never cut short by it.  One keep-alive
connection per relay.

A relay named by an ``https://`` URL is spoken to over TLS (:func:`relay_connection`):
its certificate must chain to SLIM's CA (``/etc/slim/ca.pem`` in the initrd, which the
build puts there, or ``--ca``; the system's CAs are not trusted) and be a relay's (the
role SLIM's CA writes in it).  The host name in the URL is not what is checked: relays'
certificates name the relay (``NAME.relay.slim``), not the addresses sites reach it at.
A relay that fails the check counts as a failed relay, and the agent says why.
``ssl`` is imported only then: an initrd built without it still boots over ``http://``.

Many small objects (copy-if-needed's changed files) are asked for *pipelined*
(:meth:`Relays.fetch_pipelined`): every request of a batch is sent on one connection
before the first answer is read, and the answers are read in order with a lean parser
of plain ``200`` answers.  A small object's round trip and http.client's parsing of its
answer cost more than its bytes (1,000 files of 16 KiB: 0.27 s one by one, 0.09 s
pipelined, this machine).  Anything else — another status, no or another length, a
digest that does not match, a connection that breaks — drops the connection, and the
objects from that one on are fetched one by one with :meth:`Relays.stream`, which
retries, resumes and moves on to other relays as above.
"""

from __future__ import annotations

import codecs
import email.utils  # (http.client imports it anyway)
import functools
import hashlib
import http.client
import json
import random
import select
import time
import urllib.parse
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from slim.agent.cache import CacheCorrupt, LocalObjects
from slim.agent.plan import DEFAULT_DEADLINE, ObjectRef
from slim.agent.value import Mutable

TYPE_CHECKING = False  # typing is not imported at run time (the agent's start-up: slim.agent)
if TYPE_CHECKING:
    import ssl
    from typing import Any, BinaryIO

CHUNK = 1 << 20
Chunk = bytes | memoryview  # a piece of an object, as a stream's sink is given it
Sink = Callable[[Chunk], object]  # where a stream's pieces go
Splicer = Callable[[int, int], int]  # a sink's taking from a descriptor: (fd, most) → how many
Within = tuple[ObjectRef, int] | None  # a range of another object: (that object, where it begins)
MAX_RETRY_AFTER = 60.0  # a relay that asks for longer is asked again after this
BACKOFF_FIRST = 0.5  # a 503 without Retry-After: 0.5, 1, 2, ... seconds
BACKOFF_MAX = 30.0
JITTER = 0.5  # each wait is stretched by up to this fraction, never shortened
BUSY = (429, 503)  # "come back later": waited for, not counted as a failure


PIPELINE_HEAD = 8192  # bytes of one pipelined answer's status line and headers, at most
LOCAL = "local"  # what Relays.stream says served an object from the local cache
CA_FILE = Path("/etc/slim/ca.pem")  # SLIM's CA in the initrd (core/build/agentrt.py puts it there)
RELAY_ROLE = "relay"  # the OU SLIM's CA writes in a relay's certificate (slim.pki)


class FetchError(RuntimeError):
    """No relay could deliver (the message says what each answered)."""


class NotSlimRelay(OSError):
    """A relay's TLS certificate is not a relay's certificate from SLIM's CA."""


def tls_context(ca: Path) -> ssl.SSLContext:
    """The client context for https relays: only certificates that chain to ``ca``."""
    try:
        import ssl
    except ImportError:
        raise FetchError(
            "an https relay, but this agent's Python has no ssl module (the initrd was built "
            "without it: its registry had no https relay URL)"
        ) from None
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise FetchError(f"an https relay, but SLIM's CA certificate {ca} cannot be read: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # the role in the certificate is checked instead (relay_connection)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def relay_certificate_problem(cert: dict[str, Any]) -> str | None:
    """Why a certificate that chains to SLIM's CA is not a relay's (None if it is): SLIM's CA
    writes the holder's role in the subject's OU and its name in CN (slim.pki)."""
    subject = {k: v for rdn in cert.get("subject", ()) for k, v in rdn}
    role, name = subject.get("organizationalUnitName"), subject.get("commonName")
    if role != RELAY_ROLE:
        return f"its certificate is SLIM's but not a relay's (role {role!r}, name {name!r})"
    return None


@functools.cache
def relay_connection() -> Callable[..., http.client.HTTPConnection]:
    """:class:`http.client.HTTPSConnection` for relays: TLS checks the chain against SLIM's CA
    (the context's), then this checks the role.  A function: http.client has HTTPSConnection
    only where ssl imports, and an initrd without ssl must still import this module."""
    import ssl

    class RelayConnection(http.client.HTTPSConnection):
        def connect(self) -> None:
            try:
                super().connect()
            except ssl.SSLCertVerificationError as exc:
                raise NotSlimRelay(
                    f"its certificate is not from SLIM's CA: {exc.verify_message or exc.reason}"
                ) from None
            assert isinstance(self.sock, ssl.SSLSocket)
            problem = relay_certificate_problem(dict(self.sock.getpeercert() or {}))
            if problem is not None:
                self.close()
                raise NotSlimRelay(problem)

    return RelayConnection


class DigestMismatch(FetchError):
    """Bytes arrived whole but their sha256 is not the object's name."""


class FetchStats(Mutable):
    """What a :class:`Relays` fetched: objects, bytes, resumptions, busy answers, failures."""

    __slots__ = ("busy", "bytes", "objects", "relay_failures", "resumed", "waited")

    def __init__(
        self,
        objects: int = 0,
        bytes: int = 0,
        resumed: int = 0,
        relay_failures: list[str] | None = None,
        busy: int = 0,  # answers 503 (or 429): the relay asked us to come back later
        waited: float = 0.0,  # seconds slept waiting for busy relays
    ) -> None:
        self.objects = objects
        self.bytes = bytes
        self.resumed = resumed
        self.relay_failures: list[str] = [] if relay_failures is None else relay_failures
        self.busy = busy
        self.waited = waited


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (a number of seconds or an HTTP date,
    RFC 9110 10.2.3), between 0 and :data:`MAX_RETRY_AFTER`; None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        seconds = float(int(text))
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class _Attempts:
    """Which relay to ask next for one request, and what each answered.

    Relays are asked in turn from ``relays.current``; one that fails (down,
    broken, an error) is left at once for the next and dropped after ``rounds``
    failures; one that is busy is asked again when its wait is over, the others
    meanwhile.  When no relay may be asked before the boot deadline, or every
    relay failed ``rounds`` times, :class:`FetchError` says what each answered."""

    def __init__(self, relays: Relays, what: str) -> None:
        self.relays = relays
        self.what = what
        self.urls = list(relays.urls)
        self.cursor = relays.current
        self.failures = dict.fromkeys(self.urls, 0)
        self.busy = dict.fromkeys(self.urls, 0)
        self.ready = dict.fromkeys(self.urls, 0.0)  # monotonic time it may be asked again
        self.answers: dict[str, str] = {}

    def next(self) -> str:
        r = self.relays
        while True:
            n = len(self.urls)
            live = [
                u for u in (self.urls[(self.cursor + i) % n] for i in range(n)) if self.failures[u] < r.rounds
            ]
            if not live:
                raise FetchError(f"{self.what}: no relay could serve it: {self.summary()}")
            now = time.monotonic()
            for u in live:  # a relay that need not be waited for is asked, deadline or not
                if self.ready[u] <= now:
                    self.cursor = self.urls.index(u) + 1
                    return u
            wake = min(self.ready[u] for u in live)
            if wake >= r.deadline_at:
                raise self.past_deadline()
            r.stats.waited += wake - now
            time.sleep(wake - now)

    def failed(self, url: str, answer: str) -> None:
        self.failures[url] += 1
        self.answers[url] = answer

    def busy_answer(self, url: str, status: int, message: str, header: str | None) -> None:
        self.relays.stats.busy += 1
        self.busy[url] += 1
        told = retry_after(header)
        if told is None:
            wait = min(BACKOFF_FIRST * 2 ** (self.busy[url] - 1), BACKOFF_MAX)
            how = "no Retry-After"
        else:
            wait = told
            how = f"Retry-After {header}"
        wait = max(wait, 0.05) * (1 + JITTER * self.relays.rng.random())
        self.ready[url] = time.monotonic() + wait
        self.answers[url] = f"{status}: {message} ({how})"

    def past_deadline(self) -> FetchError:
        r = self.relays
        return FetchError(
            f"{self.what}: the boot deadline ({r.deadline:g} s, slim.deadline=) passes before "
            f"a relay may be asked again: {self.summary()}"
        )

    def summary(self) -> str:
        parts = []
        for u in self.urls:
            answer = self.answers.get(u, "not asked")
            if self.busy[u] > 1:
                answer += f", busy {self.busy[u]} times"
            parts.append(f"{u}: {answer}")
        return "; ".join(parts)


class Relays:
    def __init__(
        self,
        urls: Sequence[str],
        timeout: float = 30.0,
        rounds: int = 2,
        deadline: float = DEFAULT_DEADLINE,
        token: str = "",
        ca: Path = CA_FILE,
    ) -> None:
        """``deadline``: seconds from now within which busy relays are asked again;
        ``token``: the node's token, sent with every node API call (``Authorization``); ``ca``:
        SLIM's CA certificate, which https relays' certificates must chain to."""
        if not urls:
            raise FetchError("no relay to ask")
        for url in urls:
            if not url.isascii():  # (urllib needs unicodedata for such names: not in the initrd)
                raise FetchError(f"relay URL {url!r}: host names must be ASCII (IDNA ones as xn--)")
        ascii_host_names()  # the initrd's Python has no "idna" codec (slim.core.build.smallpython)
        if not deadline > 0:
            raise FetchError(f"the boot deadline must be a positive number of seconds, not {deadline!r}")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout = timeout
        self.rounds = rounds
        self.deadline = deadline
        self.ca = ca
        self._tls: ssl.SSLContext | None = None  # made at the first https relay
        self.deadline_at = time.monotonic() + deadline
        self.stats = FetchStats()
        self.rng = random.Random()  # noqa: S311 - jitter, not secret
        self._conns: dict[str, http.client.HTTPConnection] = {}
        self.current = 0  # index of the relay that served last: asked first next time
        self.token = token
        self.local: LocalObjects | None = None  # a boot medium's cache: asked first, filled after
        self._unpipelined: set[str] = set()  # relays whose first pipelined answer was not a plain 200

    def clone(self) -> Relays:
        """The same relays, in the same order, on connections of its own (for another thread)."""
        other = Relays(self.urls, self.timeout, self.rounds, self.deadline, self.token, self.ca)
        other.deadline_at = self.deadline_at  # one deadline for the whole boot
        other.current = self.current
        other._tls = self._tls  # an SSLContext may be shared between threads
        other.local = self.local
        return other

    def absorb(self, stats: FetchStats, current: int) -> None:
        """Count what a clone fetched (its ``stats``; ``current``: the relay it asks first
        now) as ours."""
        self.stats.objects += stats.objects
        self.stats.bytes += stats.bytes
        self.stats.resumed += stats.resumed
        self.stats.busy += stats.busy
        self.stats.waited += stats.waited
        if stats.relay_failures:  # it moved on from a relay that failed: so do we
            self.current = current
        self.stats.relay_failures.extend(stats.relay_failures)

    def close(self) -> None:
        for c in self._conns.values():
            c.close()
        self._conns.clear()

    def _conn(self, url: str) -> http.client.HTTPConnection:
        conn = self._conns.get(url)
        if conn is None:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname or ""
            if parts.scheme == "https":
                if self._tls is None:
                    self._tls = tls_context(self.ca)
                conn = relay_connection()(host, parts.port or 443, timeout=self.timeout, context=self._tls)
            else:
                conn = http.client.HTTPConnection(host, parts.port or 80, timeout=self.timeout)
            self._conns[url] = conn
        return conn

    def _drop(self, url: str) -> None:
        conn = self._conns.pop(url, None)
        if conn is not None:
            conn.close()

    # -- API ----------------------------------------------------------------
    def call(self, method: str, path: str, body: object = None) -> tuple[str, bytes]:
        """(relay URL, body) of the first relay that answers 200 (404/400/409 are final;
        503 is asked again after its Retry-After, within the boot deadline)."""
        attempts = _Attempts(self, f"{method} {path}")
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        token = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        while True:
            url = attempts.next()
            try:
                conn = self._conn(url)
                # the node's token goes only over TLS (never in clear, where it could be copied)
                sent = {**headers, **token} if url.startswith("https://") else headers
                conn.request(method, path, body=payload, headers=sent)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self._drop(url)
                attempts.failed(url, f"{exc or type(exc).__name__}")
                continue
            if resp.status == 200:
                self.current = self.urls.index(url)
                return url, data
            message = _error_text(data)
            if resp.status in (400, 401, 403, 404, 409):
                raise FetchError(f"{url}{path}: {resp.status}: {message}")
            if resp.status in BUSY:
                attempts.busy_answer(url, resp.status, message, resp.getheader("Retry-After"))
            else:
                attempts.failed(url, f"{resp.status}: {message}")

    # -- objects ------------------------------------------------------------
    def stream(
        self,
        ref: ObjectRef,
        write: Sink,
        verify: bool = True,
        splice: Splicer | None = None,
        within: Within = None,
    ) -> str:
        """Send the object's bytes to ``write`` in order, resuming across relays (each piece
        is valid only during the call: a buffer read into again, not a copy of it);
        return the relay that sent the last byte (:data:`LOCAL`: the local cache had it).
        DigestMismatch if the bytes are wrong.  ``verify`` False: the caller checks their
        digest itself (the initrd's zstd does, slim.agent.ee), except that bytes the local
        cache keeps are checked here all the same.  ``splice``: the sink can also take
        bytes from a file descriptor itself, ``splice(fd, most)`` → how many it took
        (``os.splice`` into a pipe: they never enter this process; BlockingIOError only
        when the descriptor has none yet: its own side blocks); used where nothing here
        looks at the bytes (not checked here, not kept by the local cache) and the relay's
        answer is plain HTTP of a known length, on a socket with a timeout.  ``within``:
        ``ref`` is a range of another object, ``(object, offset)`` (a part of an archive,
        with a digest of its own), asked for by ``Range``; the local cache keeps whole
        objects, and is not asked."""
        if within is not None:
            return self._stream(ref, write, verify, splice, within)
        try:
            if self.local is not None and self.local.read(ref.hex, ref.size, write):
                return LOCAL
        except CacheCorrupt as exc:
            raise DigestMismatch(str(exc)) from None
        staged = self.local.writer() if self.local is not None else None
        try:
            url = self._stream(
                ref,
                write if staged is None else _tee(write, staged.write),
                verify or staged is not None,
                splice if staged is None else None,
                None,
            )
        except BaseException:
            if staged is not None:
                staged.discard()
            raise
        if staged is not None:
            staged.keep(ref.hex)
        return url

    def _stream(
        self, ref: ObjectRef, write: Sink, verify: bool, splice: Splicer | None, within: Within
    ) -> str:
        h = hashlib.sha256() if verify else None
        got = 0
        # one buffer read into, again and again: read(n) would allocate n zeroed bytes for
        # each piece and copy them once more (at 2 GB, a second of this process's time
        # taken from the unpacking, which waits for the interpreter's lock meanwhile)
        buffer = memoryview(bytearray(max(1, min(CHUNK, ref.size))))
        attempts = _Attempts(self, ref.digest)
        path = f"/objects/sha256/{(ref if within is None else within[0]).hex}"
        at = 0 if within is None else within[1]  # where ref's bytes begin in what path names
        while True:
            url = attempts.next()
            if within is not None:
                headers = {"Range": f"bytes={at + got}-{at + ref.size - 1}"}
            else:
                headers = {"Range": f"bytes={got}-"} if got else {}
            try:
                conn = self._conn(url)
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                if resp.status == 404:
                    resp.read()
                    attempts.failed(url, "not found")
                    continue
                if resp.status != (206 if got or within is not None else 200):
                    if resp.status in BUSY:
                        message = _error_text(resp.read())
                        attempts.busy_answer(url, resp.status, message, resp.getheader("Retry-After"))
                    else:  # (its body not read: a 200 to a Range would be the whole object)
                        attempts.failed(url, f"answered {resp.status} at byte {got}")
                        self._drop(url)
                    continue
                if got:
                    self.stats.resumed += 1
                if (
                    splice is not None
                    and h is None
                    and type(conn) is http.client.HTTPConnection  # (not TLS: its bytes are not the socket's)
                    and conn.sock is not None
                    and (quiet := conn.sock.gettimeout()) is not None  # (a blocking one would stall the pipe)
                    and not resp.chunked
                    and resp.length == ref.size - got
                ):
                    # what the answer's reader holds already (or one read) through write,
                    # the rest taken from the socket by the sink (got kept, for a resume)
                    if head := resp.read1(min(ref.size - got, CHUNK)):  # (all its reader holds)
                        write(head)
                        got += len(head)
                    fd = conn.sock.fileno()
                    readable = select.poll()
                    readable.register(fd, select.POLLIN)
                    while got < ref.size:
                        try:
                            n = splice(fd, ref.size - got)
                        except BlockingIOError:  # (a socket with a timeout does not block)
                            if not readable.poll(1000 * quiet):
                                raise TimeoutError(f"nothing came for {quiet} s") from None
                            continue
                        if not n:
                            break
                        got += n
                    resp.close()  # (all its bytes taken: the connection may serve the next request)
                else:
                    while True:
                        n = resp.readinto(buffer[: min(len(buffer), ref.size - got) or 1])
                        if not n:
                            break
                        chunk = buffer[:n]
                        got += n
                        if got > ref.size:
                            raise DigestMismatch(f"{url} sent more than the {ref.size} bytes of {ref.digest}")
                        if h is not None:
                            h.update(chunk)
                        write(chunk)
                if got < ref.size:
                    raise http.client.IncompleteRead(b"", ref.size - got)
            except (OSError, http.client.HTTPException) as exc:
                self._drop(url)
                attempts.failed(url, f"{exc or type(exc).__name__} at byte {got}")
                self.stats.relay_failures.append(f"{url} at byte {got} of {ref.digest}")
                continue
            self.current = self.urls.index(url)
            if h is not None and h.hexdigest() != ref.hex:
                raise DigestMismatch(f"{ref.digest}: the bytes received hash to sha256:{h.hexdigest()}")
            self.stats.objects += 1
            self.stats.bytes += got
            return url

    def fetch_pipelined(self, refs: Sequence[ObjectRef], got: Callable[[int, bytes], object]) -> int:
        """Fetch ``refs`` (small objects: each is held in memory) from the relay that served
        last, pipelined on its connection (see the module's docstring); ``got(i, data)`` is
        given each object's bytes, verified, in order.  Returns how many were given: the
        rest, from the first that did not come as a plain ``200`` of its size and digest, are
        the caller's to fetch with :meth:`stream`.  Nothing is pipelined through a local
        cache (:attr:`local`): the caller streams each object."""
        url = self.urls[self.current]
        if not refs or self.local is not None or url in self._unpipelined:
            return 0
        done = 0
        try:
            conn = self._conn(url)
            if conn.sock is None:
                conn.connect()
            sock = conn.sock
            host = urllib.parse.urlsplit(url).netloc.rpartition("@")[2].encode("ascii")
            sock.sendall(
                b"".join(
                    b"GET /objects/sha256/%s HTTP/1.1\r\nHost: %s\r\nAccept-Encoding: identity\r\n\r\n"
                    % (ref.hex.encode("ascii"), host)
                    for ref in refs
                )
            )
            with sock.makefile("rb") as answers:
                for i, ref in enumerate(refs):
                    size, close = pipelined_head(answers)
                    if size != ref.size:
                        break
                    data = answers.read(size)
                    if len(data) != size or hashlib.sha256(data).hexdigest() != ref.hex:
                        break
                    self.stats.objects += 1
                    self.stats.bytes += size
                    got(i, data)
                    done += 1
                    if close:
                        break
                else:
                    return done  # every answer read: the connection stays, idle
        except ValueError:  # an answer that was not a plain 200 of the object
            if not done:
                self._unpipelined.add(url)  # (a relay, or a proxy, that does not pipeline: asked no more)
        except (OSError, http.client.HTTPException):
            pass  # what is left is fetched one by one
        self._drop(url)
        return done

    def read(self, ref: ObjectRef) -> bytes:
        parts: list[bytes] = []
        self.stream(ref, lambda chunk: parts.append(bytes(chunk)))
        return b"".join(parts)


def pipelined_head(answers: BinaryIO) -> tuple[int, bool]:
    """Read one pipelined answer's status line and headers from ``answers`` (a binary file):
    (its Content-Length, whether the relay closes the connection after it).  ValueError
    unless it is a plain ``HTTP/1.1 200`` with one Content-Length, no Transfer-Encoding and
    a head of at most :data:`PIPELINE_HEAD` bytes."""
    line = answers.readline(PIPELINE_HEAD + 1)
    if not line.startswith(b"HTTP/1.1 200 ") or not line.endswith(b"\r\n"):
        raise ValueError("not a plain 200 answer")
    left = PIPELINE_HEAD - len(line)
    length = -1
    close = False
    while True:
        line = answers.readline(left + 1)
        left -= len(line)
        if left < 0 or not line.endswith(b"\r\n"):
            raise ValueError("answer head too long, or cut")
        if line == b"\r\n":
            break
        name, colon, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip()
        if not colon:
            raise ValueError("not a header line")
        if name == b"content-length":
            if length >= 0 or not value.isdigit() or len(value) > 18:
                raise ValueError("bad or repeated Content-Length")
            length = int(value)
        elif name == b"transfer-encoding":
            raise ValueError("a transfer coding")
        elif name == b"connection":
            close = b"close" in value.lower()
    if length < 0:
        raise ValueError("no Content-Length")
    return length, close


def _tee(first: Callable[[Chunk], object], second: Callable[[Chunk], object]) -> Callable[[Chunk], None]:
    def both(chunk: Chunk) -> None:
        first(chunk)
        second(chunk)

    return both


def _error_text(data: bytes) -> str:
    try:
        doc = json.loads(data)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return str(doc["error"])
    except ValueError:
        pass
    return data[:200].decode("utf-8", "replace").strip()


_ascii_idna = False


def ascii_host_names() -> None:
    """Let sockets resolve ASCII host names where Python has no "idna" codec.

    The socket module encodes every host name with that codec (IP addresses too), and
    the standard one needs ``unicodedata``, which the initrd's interpreter leaves out
    (slim.core.build.smallpython).  ASCII names need none of IDNA's mapping (its
    ToASCII passes them through unchanged; it also refuses empty and over-long labels,
    which this leaves to the resolver), so this search function, consulted only after
    the standard library's found nothing, passes them through and refuses the others.
    Every :class:`Relays` calls it: all the agent's connections start there."""
    global _ascii_idna
    if _ascii_idna:
        return
    _ascii_idna = True

    def encode(text: str, errors: str = "strict") -> tuple[bytes, int]:
        if not text.isascii():
            raise UnicodeError(f"{text!r}: only ASCII host names can be used here (no IDNA codec)")
        return text.encode("ascii"), len(text)

    def decode(data: bytes, errors: str = "strict") -> tuple[str, int]:
        return bytes(data).decode("ascii"), len(data)

    info = codecs.CodecInfo(encode, decode, name="idna")  # type: ignore[arg-type]
    codecs.register(lambda name: info if name == "idna" else None)


def now() -> float:
    return time.time()
