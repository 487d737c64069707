"""Prefetch orders and pins: which objects a relay warms and keeps.

A release document names its objects: kernel, initrd, and per directory the
copy-set archive and the manifest; a ``sync`` directory's manifest names
every file object (or, for big files, the chunks) that copy-if-needed nodes
fetch.  A prefetch order warms all of them, a few at a time, reporting
progress on the heartbeat stream.  The core's replies list the current
releases; every object of those that the relay holds is pinned (never
evicted).  Objects of a ``sync`` manifest that is not cached yet are pinned
once it is (after a prefetch, or within a minute of a node fetching it).

A release is pinned or warmed only if the core signed its document with a key the
relay trusts (``--trust``): the document is fetched (an object like any other) and its
signature checked before anything it names is fetched or pinned; a release that fails is
refused, counted and logged, never warmed.  The trusted keys are read again when their files
change (a key rotation), and a release whose signature changes is checked again at once.  A
relay given an older key (a key file, away from the core's key directory) follows the core's
rotations: each heartbeat reply carries the chain, each new key signed by the one it replaced,
and a key the trusted ones endorsed (in turn) is trusted too (:func:`slim.signing.follow`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from pydantic import ValidationError

from slim.errors import FailedPrecondition, InvalidArgument, SlimError
from slim.relay.fetch import CachingSource
from slim.release import Named, Release, decode_manifest, manifest_objects
from slim.signing import Endorsement, TrustedKeys, follow, verify
from slim.v1 import core_pb2 as pb
from slim.vocabulary import parse_digest

log = logging.getLogger(__name__)

T = TypeVar("T")
PIN_REFRESH = 60.0  # seconds between pin recomputations while the releases stay the same
PROGRESS_EVERY = 0.5  # seconds between early heartbeats that carry a prefetch's progress


async def _parse(source: CachingSource, hexdigest: str, parse: Callable[[bytes], T]) -> T:
    """``parse`` of a cached object's bytes, read and parsed in one trip off the event loop
    (the object is marked in use meanwhile, so it is not evicted under the reader)."""
    obj = source.cache.acquire(hexdigest)
    if obj is None:
        raise InvalidArgument(f"object sha256:{hexdigest} left the cache while being read")
    try:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: parse(obj.path.read_bytes()))
    finally:
        source.cache.release(obj)


def _release(release_hex: str, data: bytes) -> tuple[Release, list[Named]]:
    try:
        release = Release.model_validate_json(data)
    except ValidationError as exc:
        raise InvalidArgument(
            f"release sha256:{release_hex} is not a release document: {exc.errors()[0]['msg']}"
        ) from None
    wanted = [Named(release_hex, 0)]
    wanted += [Named(parse_digest(ref.digest), ref.size) for ref in release.objects()]
    return release, wanted


async def release_objects(source: CachingSource, release_hex: str) -> tuple[Release, list[Named]]:
    """The release document (cached) and the objects it names directly, the
    document first (the objects of ``sync`` manifests: :func:`manifest_wanted`)."""
    return await _parse(source, release_hex, lambda data: _release(release_hex, data))


async def manifest_wanted(source: CachingSource, hexdigest: str) -> list[Named]:
    """The file (or chunk) objects a cached ``sync`` manifest names: read, decompressed
    (up to 512 MiB) and parsed off the event loop."""
    return await _parse(source, hexdigest, lambda data: manifest_objects(decode_manifest(data)))


def sync_manifests(release: Release) -> list[str]:
    return [parse_digest(ref.digest) for ref in release.sync_manifests()]


class Warmer:
    """Runs prefetch orders and keeps the cache's pins in step with the core."""

    def __init__(
        self,
        source: CachingSource,
        poke: Callable[[], None],
        concurrency: int = 4,
        trusted: TrustedKeys | None = None,
        on_releases: Callable[[list[tuple[str, Release]]], None] | None = None,
    ) -> None:
        self.source = source
        self.on_releases = on_releases  # the current releases whose signatures checked, after each pin pass
        self.poke = poke
        self.concurrency = concurrency
        self.trusted = trusted if trusted is not None else TrustedKeys([])
        self.signatures: dict[str, str] = {}  # release digest -> the core's signature (from its replies)
        self.endorsements: tuple[Endorsement, ...] = ()  # the core key's rotations (from its replies)
        self.refused: set[str] = set()  # releases whose signature did not check: counted once each
        self.statuses: dict[str, pb.PrefetchStatus] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._releases: tuple[str, ...] = ()
        self._pin_task: asyncio.Task[None] | None = None
        self._pinned_at = time.monotonic()

    # -- prefetch -----------------------------------------------------------
    def order(self, order: pb.PrefetchOrder) -> None:
        if order.id in self.statuses:
            return
        status = pb.PrefetchStatus(id=order.id, release_digest=order.release_digest)
        self.statuses[order.id] = status
        log.info("prefetch %s: warming %s (%s)", order.id, order.environment, order.release_digest)
        self._spawn(self._prefetch(order, status), f"prefetch {order.id}")

    def report(self) -> list[pb.PrefetchStatus]:
        """Statuses for the next beat; a finished order is reported once more, then dropped."""
        out = []
        for status in self.statuses.values():
            copy = pb.PrefetchStatus()
            copy.CopyFrom(status)
            out.append(copy)
        for s in out:
            if s.done:
                self.statuses.pop(s.id, None)
        return out

    async def _prefetch(self, order: pb.PrefetchOrder, status: pb.PrefetchStatus) -> None:
        try:
            release_hex = parse_digest(order.release_digest)
            await self.source.ensure(release_hex)
            await self._check(order.release_digest, order.release_signature)
            release, wanted = await release_objects(self.source, release_hex)
            wanted = wanted[1:]
            fetched_here: set[str] = set()  # manifests fetched to read them count as fetched by this order
            for manifest_hex in sync_manifests(release):
                if (await self.source.ensure(manifest_hex))[1]:
                    fetched_here.add(manifest_hex)
                wanted.extend(await manifest_wanted(self.source, manifest_hex))
            unique = list({w.hex: w for w in wanted}.values())
            status.objects_total = len(unique)
            status.bytes_total = sum(w.size for w in unique)
            self.poke()
            queue: asyncio.Queue[Named] = asyncio.Queue()
            for w in unique:
                queue.put_nowait(w)

            said = time.monotonic()

            async def worker() -> None:
                nonlocal said
                while not queue.empty():
                    w = queue.get_nowait()
                    size, fetched = await self.source.ensure(w.hex)
                    status.objects_done += 1
                    status.bytes_done += size
                    if fetched or w.hex in fetched_here:
                        status.bytes_fetched += size
                    if time.monotonic() - said >= PROGRESS_EVERY:  # not a beat per object
                        said = time.monotonic()
                        self.poke()

            await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(unique)) or 1)))
            log.info(
                "prefetch %s: %d objects, %d bytes (%d fetched)",
                order.id,
                status.objects_done,
                status.bytes_done,
                status.bytes_fetched,
            )
            self.refresh_pins()
        except SlimError as exc:
            status.error = exc.message
            log.warning("prefetch %s failed: %s", order.id, exc.message)
        except Exception as exc:
            status.error = f"internal error: {exc}"
            log.exception("prefetch %s failed unexpectedly", order.id)
        finally:
            status.done = True
            self.poke()

    # -- pins ---------------------------------------------------------------
    def set_releases(
        self,
        digests: Iterable[str],
        signatures: Mapping[str, str] | None = None,
        endorsements: Iterable[Endorsement] = (),
    ) -> None:
        """The core's current releases, their signatures and the core key's rotations (every
        heartbeat reply).  Pins are recomputed when they change (a release signed again: a key
        rotation), and every PIN_REFRESH seconds anyway: manifests that nodes fetched since
        then now pin their file objects too."""
        chain = tuple(endorsements)
        resigned = (
            signatures is not None and dict(signatures) != self.signatures
        ) or chain != self.endorsements
        if signatures is not None:
            self.signatures = dict(signatures)
        self.endorsements = chain
        releases = tuple(sorted(digests))
        if resigned or releases != self._releases or time.monotonic() - self._pinned_at > PIN_REFRESH:
            self._releases = releases
            self.refresh_pins()

    def refresh_pins(self) -> None:
        if self._pin_task is None or self._pin_task.done():
            self._pin_task = self._spawn(self._pins(), "pins")
        else:  # a refresh is running: run another one after it
            prev = self._pin_task

            async def after() -> None:
                await asyncio.gather(prev, return_exceptions=True)
                await self._pins()

            self._pin_task = self._spawn(after(), "pins")

    async def _pins(self) -> None:
        self._pinned_at = time.monotonic()
        pins: set[str] = set()
        checked: list[tuple[str, Release]] = []
        for digest in self._releases:
            try:
                release_hex = parse_digest(digest)
                await self.source.ensure(release_hex)
                await self._check(digest, self.signatures.get(digest, ""))
                release, wanted = await release_objects(self.source, release_hex)
                pins.update(w.hex for w in wanted)
                checked.append((digest, release))
                for manifest_hex in sync_manifests(release):
                    if manifest_hex in self.source.cache:
                        pins.update(w.hex for w in await manifest_wanted(self.source, manifest_hex))
            except SlimError as exc:
                log.warning("cannot pin release %s: %s", digest, exc.message)
        self.source.cache.set_pins(pins)
        log.info("pins: %d objects of %d current releases", len(pins), len(self._releases))
        if self.on_releases is not None:
            self.on_releases(checked)

    async def _check(self, digest: str, signature: str) -> None:
        """FailedPrecondition unless the core signed the (cached) release document with a
        trusted key."""
        try:
            if not signature:
                raise FailedPrecondition(f"release {digest} comes without the core's signature")
            if not self.trusted.paths:
                raise FailedPrecondition("this relay trusts no key (--trust): it warms and pins no release")
            await _parse(  # off the loop: the trusted keys' files are looked at too
                self.source,
                parse_digest(digest),
                # the keys trusted here, and those the core's rotations endorsed since
                lambda data: verify(
                    data, signature, follow(self.trusted.current(), self.endorsements), "release"
                ),
            )
        except (FailedPrecondition, InvalidArgument) as exc:
            if digest not in self.refused:
                self.refused.add(digest)
                log.warning("release %s refused: %s", digest, exc.message)
            raise FailedPrecondition(f"release {digest} refused: {exc.message}") from None

    def _spawn(self, coro: object, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
