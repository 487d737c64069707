"""The relay's on-disk object cache: content-addressed, byte-budgeted, LRU.

Layout under the cache directory::

    objects/sha256/<hex>   verified objects, named by their SHA-256 (0444)
    tmp/                   objects being fetched (removed at start)

Every object here was verified against its name before it was published (by
rename, after fsync), so a crash leaves either the whole object or nothing.

The budget (``max_bytes``) counts published objects plus space *reserved* for
fetches in flight, so the directory never holds more than the budget.  To
make room the least recently used object is evicted, unless it is pinned (it
belongs to a current release) or in use (a reader holds it; eviction would
free no space while the reader's descriptor keeps the file alive, and the
reader may still need to reopen it).  When nothing can be evicted, reserving
fails with :class:`~slim.errors.Overloaded` and the request gets 503 with
Retry-After.

Everything here runs on the event loop thread, but for :meth:`ObjectCache.load`
(at start, before anything else uses the cache) and :meth:`ObjectCache.place`,
which run on the relay's I/O pool.  Eviction unlinks on the loop, so that the
files never hold more than the budget (see tests/support.py, LOOP_BLOCKING_ALLOWED).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from slim.errors import InvalidArgument, Overloaded
from slim.objects.source import CachedObject
from slim.vocabulary import HEX_RE

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Reservation:
    """Space set aside for one object being fetched; give it back with
    :meth:`ObjectCache.publish` or :meth:`ObjectCache.cancel`."""

    size: int
    open: bool = field(default=True)


@dataclass(frozen=True)
class CacheStats:
    objects: int
    bytes: int
    reserved: int
    pinned_objects: int
    pinned_bytes: int
    in_use: int
    max_bytes: int


class ObjectCache:
    def __init__(self, root: str | Path, max_bytes: int, memory_bytes: int = 512 << 20) -> None:
        if max_bytes <= 0:
            raise InvalidArgument(f"the cache budget must be positive, not {max_bytes} bytes")
        self.root = Path(root)
        self.objects_dir = self.root / "objects" / "sha256"
        self.tmp_dir = self.root / "tmp"
        self.max_bytes = max_bytes
        self.used = 0  # bytes of published objects
        self.reserved = 0  # bytes set aside for fetches in flight
        self.evictions = 0
        self.memory_bytes = memory_bytes  # budget for small objects' bytes kept in memory
        self.memory_used = 0
        self._lru: OrderedDict[str, CachedObject] = OrderedDict()  # least recently used first
        self._pins: frozenset[str] = frozenset()

    # -- start --------------------------------------------------------------
    def load(self) -> None:
        """Create the layout, drop leftovers of interrupted fetches, index what is
        cached (oldest first), and evict down to the budget if it shrank."""
        try:
            self.objects_dir.mkdir(parents=True, exist_ok=True)
            if self.tmp_dir.exists():
                shutil.rmtree(self.tmp_dir)
            self.tmp_dir.mkdir()
        except OSError as exc:
            raise InvalidArgument(f"cache directory {self.root}: {exc.strerror or exc}") from None
        found: list[tuple[int, str, int]] = []
        with os.scandir(self.objects_dir) as it:
            for entry in it:
                if not HEX_RE.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
                    log.warning("cache: ignoring %s (not an object)", entry.path)
                    continue
                st = entry.stat(follow_symlinks=False)
                found.append((st.st_mtime_ns, entry.name, st.st_size))
        self._lru.clear()
        self.used = 0
        for _, hexdigest, size in sorted(found):
            self._lru[hexdigest] = CachedObject(hexdigest, size, self.objects_dir / hexdigest)
            self.used += size
        if self.used > self.max_bytes:
            freed = self._evict(self.used - self.max_bytes)
            log.info("cache: evicted %d bytes to fit the budget of %d bytes", freed, self.max_bytes)
        log.info(
            "cache: %d objects, %d bytes of %d in %s", len(self._lru), self.used, self.max_bytes, self.root
        )

    # -- reads --------------------------------------------------------------
    def path(self, hexdigest: str) -> Path:
        return self.objects_dir / hexdigest

    def __contains__(self, hexdigest: str) -> bool:
        return hexdigest in self._lru

    def acquire(self, hexdigest: str) -> CachedObject | None:
        """The object, marked in use and most recently used; None if not cached.
        Every acquire is paired with :meth:`release`."""
        obj = self._lru.get(hexdigest)
        if obj is None:
            return None
        self._lru.move_to_end(hexdigest)
        obj.readers += 1
        return obj

    def release(self, obj: CachedObject) -> None:
        obj.readers -= 1

    def remember(self, obj: CachedObject, body: bytes) -> None:
        """Keep a small object's bytes in memory while the memory budget allows
        (first come, first kept; they go when the object is evicted)."""
        if obj.body is None and self.memory_used + len(body) <= self.memory_bytes and obj.hex in self._lru:
            obj.body = body
            self.memory_used += len(body)

    def _forget_body(self, obj: CachedObject) -> None:
        if obj.body is not None:
            self.memory_used -= len(obj.body)
            obj.body = None

    def lost(self, obj: CachedObject) -> None:
        """The object's file vanished or is unreadable (removed by hand?): forget it."""
        if self._lru.get(obj.hex) is obj:
            del self._lru[obj.hex]
            self._forget_body(obj)
            self.used -= obj.size
            log.warning("cache: object %s vanished from %s; forgotten", obj.hex, obj.path)

    # -- pins ---------------------------------------------------------------
    def set_pins(self, hexes: Iterable[str]) -> None:
        self._pins = frozenset(hexes)

    @property
    def pins(self) -> frozenset[str]:
        return self._pins

    # -- writes -------------------------------------------------------------
    def reserve(self, size: int) -> Reservation:
        """Set aside ``size`` bytes, evicting unpinned, unused objects (least recently
        used first) as needed; Overloaded when that cannot make enough room."""
        if size > self.max_bytes:
            raise Overloaded(
                f"object of {size} bytes is larger than the whole cache budget ({self.max_bytes} bytes)",
                retry_after=3600,
            )
        over = self.used + self.reserved + size - self.max_bytes
        if over > 0:
            self._evict(over)
            over = self.used + self.reserved + size - self.max_bytes
            if over > 0:
                raise Overloaded(
                    f"cache full: {size} bytes needed, {self.max_bytes - self.used - self.reserved} free "
                    "and everything else is pinned or in use"
                )
        self.reserved += size
        return Reservation(size)

    def cancel(self, reservation: Reservation) -> None:
        if reservation.open:
            reservation.open = False
            self.reserved -= reservation.size

    def place(self, hexdigest: str, tmp: Path) -> None:
        """Move a verified, fsynced temporary file into place, read-only: a rename, so it
        runs off the event loop (the fetcher's I/O pool); then :meth:`publish` it."""
        os.chmod(tmp, 0o444)
        os.rename(tmp, self.objects_dir / hexdigest)

    def publish(self, hexdigest: str, reservation: Reservation) -> CachedObject:
        """Index an object :meth:`place` put in place, in the space ``reservation`` held."""
        size = reservation.size
        self.cancel(reservation)
        final = self.objects_dir / hexdigest
        old = self._lru.pop(hexdigest, None)
        if old is not None:  # a second copy of the same bytes: same name, same size
            self._forget_body(old)
            self.used -= old.size
        obj = CachedObject(hexdigest, size, final)
        self._lru[hexdigest] = obj
        self.used += size
        return obj

    def tmp_path(self, hexdigest: str, n: int) -> Path:
        return self.tmp_dir / f"{hexdigest}.{n}"

    def _evict(self, need: int) -> int:
        """Evict least recently used objects that are neither pinned nor in use
        until ``need`` bytes are freed (or nothing more can go); return bytes freed."""
        freed = 0
        pins = self._pins
        for hexdigest, obj in list(self._lru.items()):
            if freed >= need:
                break
            if obj.readers or hexdigest in pins:
                continue
            try:
                obj.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("cache: cannot evict %s: %s", obj.path, exc)
                continue
            del self._lru[hexdigest]
            self._forget_body(obj)
            self.used -= obj.size
            freed += obj.size
            self.evictions += 1
        return freed

    def stats(self) -> CacheStats:
        pinned = [o for h, o in self._lru.items() if h in self._pins]
        return CacheStats(
            objects=len(self._lru),
            bytes=self.used,
            reserved=self.reserved,
            pinned_objects=len(pinned),
            pinned_bytes=sum(o.size for o in pinned),
            in_use=sum(1 for o in self._lru.values() if o.readers),
            max_bytes=self.max_bytes,
        )
