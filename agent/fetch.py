"""Objects and API calls over HTTP from the relays of the plan (standard library only).

Every object is verified: bytes are hashed as they stream, and a digest that
does not match raises :class:`DigestMismatch` (the caller throws away what it
wrote).  When a relay fails mid-object (connection refused or broken, a 5xx,
a short body), the transfer resumes with a ``Range`` request from the next
relay of the list, at the byte where it stopped; each relay is tried at most
``rounds`` times.  One keep-alive connection per relay.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from slim.agent.plan import ObjectRef

CHUNK = 1 << 20


class FetchError(RuntimeError):
    """No relay could deliver (the message says what each answered)."""


class DigestMismatch(FetchError):
    """Bytes arrived whole but their sha256 is not the object's name."""


@dataclass
class FetchStats:
    objects: int = 0
    bytes: int = 0
    resumed: int = 0
    relay_failures: list[str] = field(default_factory=list)


class Relays:
    def __init__(self, urls: Sequence[str], timeout: float = 30.0, rounds: int = 2) -> None:
        if not urls:
            raise FetchError("no relay to ask")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout = timeout
        self.rounds = rounds
        self.stats = FetchStats()
        self._conns: dict[str, http.client.HTTPConnection] = {}
        self.current = 0  # index of the relay that served last: asked first next time

    def clone(self) -> Relays:
        """The same relays, in the same order, on connections of its own (for another thread)."""
        other = Relays(self.urls, self.timeout, self.rounds)
        other.current = self.current
        return other

    def absorb(self, other: Relays) -> None:
        """Count what a clone fetched as ours."""
        self.stats.objects += other.stats.objects
        self.stats.bytes += other.stats.bytes
        self.stats.resumed += other.stats.resumed
        if other.stats.relay_failures:  # it moved on from a relay that failed: so do we
            self.current = other.current
        self.stats.relay_failures.extend(other.stats.relay_failures)

    def close(self) -> None:
        for c in self._conns.values():
            c.close()
        self._conns.clear()

    def _conn(self, url: str) -> http.client.HTTPConnection:
        conn = self._conns.get(url)
        if conn is None:
            parts = urllib.parse.urlsplit(url)
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=self.timeout)
            self._conns[url] = conn
        return conn

    def _drop(self, url: str) -> None:
        conn = self._conns.pop(url, None)
        if conn is not None:
            conn.close()

    def _order(self) -> list[str]:
        n = len(self.urls)
        return [self.urls[(self.current + i) % n] for i in range(n)] * self.rounds

    # -- API ----------------------------------------------------------------
    def call(self, method: str, path: str, body: object = None) -> tuple[str, bytes]:
        """(relay URL, body) of the first relay that answers 200 (404/400/409 are final)."""
        errors: list[str] = []
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        for url in self._order():
            try:
                conn = self._conn(url)
                conn.request(method, path, body=payload, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self._drop(url)
                errors.append(f"{url}: {exc or type(exc).__name__}")
                continue
            if resp.status == 200:
                self.current = self.urls.index(url)
                return url, data
            message = _error_text(data)
            if resp.status in (400, 404, 409):
                raise FetchError(f"{url}{path}: {resp.status}: {message}")
            errors.append(f"{url}: {resp.status}: {message}")
        raise FetchError(f"{method} {path}: no relay answered: " + "; ".join(errors))

    # -- objects ------------------------------------------------------------
    def stream(self, ref: ObjectRef, write: Callable[[bytes], object]) -> str:
        """Send the object's bytes to ``write`` in order, resuming across relays;
        return the relay that sent the last byte.  DigestMismatch if the bytes are wrong."""
        h = hashlib.sha256()
        got = 0
        errors: list[str] = []
        path = f"/objects/sha256/{ref.hex}"
        for url in self._order():
            headers = {"Range": f"bytes={got}-"} if got else {}
            try:
                conn = self._conn(url)
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                if resp.status == 404:
                    resp.read()
                    errors.append(f"{url}: not found")
                    continue
                if resp.status != (206 if got else 200):
                    resp.read()
                    errors.append(f"{url}: answered {resp.status}")
                    self._drop(url)
                    continue
                if got:
                    self.stats.resumed += 1
                while True:
                    chunk = resp.read(min(CHUNK, ref.size - got) or 1)
                    if not chunk:
                        break
                    got += len(chunk)
                    if got > ref.size:
                        raise DigestMismatch(f"{url} sent more than the {ref.size} bytes of {ref.digest}")
                    h.update(chunk)
                    write(chunk)
                if got < ref.size:
                    raise http.client.IncompleteRead(b"", ref.size - got)
            except (OSError, http.client.HTTPException) as exc:
                self._drop(url)
                errors.append(f"{url}: {exc or type(exc).__name__} at byte {got}")
                self.stats.relay_failures.append(f"{url} at byte {got} of {ref.digest}")
                continue
            self.current = self.urls.index(url)
            if h.hexdigest() != ref.hex:
                raise DigestMismatch(f"{ref.digest}: the bytes received hash to sha256:{h.hexdigest()}")
            self.stats.objects += 1
            self.stats.bytes += got
            return url
        raise FetchError(f"{ref.digest}: no relay could send it: " + "; ".join(errors))

    def read(self, ref: ObjectRef) -> bytes:
        parts: list[bytes] = []
        self.stream(ref, parts.append)
        return b"".join(parts)


def _error_text(data: bytes) -> str:
    try:
        doc = json.loads(data)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return str(doc["error"])
    except ValueError:
        pass
    return data[:200].decode("utf-8", "replace").strip()


def now() -> float:
    return time.time()
