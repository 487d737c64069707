"""Where served objects come from, and the objects themselves.

* :class:`CachedObject` — one object on local disk (and, if small, in memory), with
  the count of responses reading it (a reader keeps it from being evicted).
* :class:`Fetch` — one object on its way from an upstream; responses follow
  ``written`` and send bytes as they arrive (the relay's fetcher makes them).
* :class:`Source` — what the routes ask: a relay's cache with its upstreams, or
  :class:`StoreSource`, the core's store as it is (nothing fetched or evicted).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from slim.errors import NotFound, SlimError


@dataclass(eq=False)
class CachedObject:
    hex: str
    size: int
    path: Path
    readers: int = 0
    body: bytes | None = None  # the bytes, for small objects kept in memory (see ObjectCache.remember)
    head: bytes = b""  # the fast path's response headers, made once


class Fetch:
    """One object on its way from upstream; readers follow ``written``."""

    def __init__(self, hexdigest: str) -> None:
        self.hex = hexdigest
        self.size: int | None = None  # known once an upstream answered
        self.written = 0
        self.tmp: Path | None = None
        self.obj: CachedObject | None = None  # set when published
        self.error: SlimError | None = None
        self.started = asyncio.Event()  # size known, or failed
        self._tick = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self.obj is not None or self.error is not None

    def available(self) -> int:
        """Bytes readers may send: all once verified, else all but the last."""
        if self.obj is not None:
            return self.obj.size
        if self.size is None:
            return 0
        return min(self.written, self.size - 1)

    def _notify(self) -> None:
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    async def wait_beyond(self, position: int) -> None:
        """Return once more than ``position`` bytes are available, or the fetch ended."""
        while not self.finished and self.available() <= position:
            await self._tick.wait()


class Source(Protocol):
    """Where objects come from: a cache with an upstream, or the store."""

    def acquire(self, hexdigest: str) -> CachedObject | None: ...
    def release(self, obj: CachedObject) -> None: ...
    def lost(self, obj: CachedObject) -> None: ...
    def remember(self, obj: CachedObject, body: bytes) -> None: ...
    def fetch(self, hexdigest: str) -> Fetch: ...  # NotFound when there is no upstream
    async def head(self, hexdigest: str) -> int: ...


class StoreSource:
    """Objects straight from a store directory (the core's object server): nothing
    is fetched or evicted."""

    def __init__(self, objects_dir: str | Path) -> None:
        self.objects_dir = Path(objects_dir)

    def acquire(self, hexdigest: str) -> CachedObject | None:
        path = self.objects_dir / hexdigest
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return CachedObject(hexdigest, st.st_size, path, readers=1)

    def release(self, obj: CachedObject) -> None:
        obj.readers -= 1

    def lost(self, obj: CachedObject) -> None:
        pass

    def remember(self, obj: CachedObject, body: bytes) -> None:
        pass  # the store's objects are not indexed in memory

    def fetch(self, hexdigest: str) -> Fetch:
        raise NotFound(f"object sha256:{hexdigest} is not in the store")

    async def head(self, hexdigest: str) -> int:
        raise NotFound(f"object sha256:{hexdigest} is not in the store")
