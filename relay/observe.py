"""What a relay sees of a boot before the agent runs, recorded as boot events.

Firmware, stage 1 and the loader report nothing themselves; the relay that serves them
does, on its own clock, each event with how long the transfer took:

- ``script``: the boot script (iPXE) or pxelinux config the relay fetched from the core and
  sent.  The core names the boot in it (its boot id): the kernel arguments carry
  ``slim.boot=ID`` (the agent's events join the boot) and the kernel and initrd URLs
  ``?boot=ID&stage=kernel`` / ``stage=initrd``.
- ``kernel``, ``initrd``: the downloads of such a URL, with the bytes sent.  The relay that
  served the script knows the node; another relay sends the boot id alone and the core
  finds the node by it.
- ``tftp:NAME``: stage 1 over TFTP.  TFTP carries only the client's address, and behind
  proxy-DHCP or NAT an address is weak evidence: a transfer is joined to the boot whose
  script is next asked for from the same address within :data:`TFTP_WINDOW` seconds, and
  the event says it was matched by address and time.

Events are queued and sent to the core by one background task (:meth:`BootObserver.run`),
in batches; the queue is bounded (the oldest go first, counted) so a core that is away
never costs the relay its memory.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from slim.errors import InvalidArgument, NotFound, SlimError
from slim.v1 import core_pb2 as pb

log = logging.getLogger(__name__)

TFTP_WINDOW = 300.0  # seconds between a TFTP transfer and the boot script that claims it
MAX_TFTP_KEPT = 1024  # recent TFTP transfers remembered for matching
MAX_QUEUED = 10_000  # events waiting for the core
MAX_BATCH = 500
MAX_BOOTS_KEPT = 4096  # boot id -> node, for the scripts this relay served
BOOT_ID_RE = re.compile(r"[0-9a-f]{1,64}")
OBJECT_STAGES = ("kernel", "initrd")
RETRY_MIN, RETRY_MAX = 0.5, 30.0


@dataclass(frozen=True)
class TftpTransfer:
    address: str
    name: str
    started: float
    ended: float
    bytes: int
    ok: bool


@dataclass
class ObserverCounters:
    recorded: int = 0
    sent: int = 0
    dropped: int = 0  # queue full, or refused by the core
    tftp_matched: int = 0


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class BootObserver:
    """Boot events from the relay's own observations (see the module's docstring)."""

    def __init__(self, relay: str, send: Callable[[list[pb.BootEvent]], Awaitable[int]]) -> None:
        self.relay = relay
        self.send = send
        self.counters = ObserverCounters()
        self._queue: collections.deque[pb.BootEvent] = collections.deque()
        self._wake = asyncio.Event()
        self._tftp: collections.deque[TftpTransfer] = collections.deque(maxlen=MAX_TFTP_KEPT)
        self._tftp_lock = threading.Lock()  # TFTP transfers end on the TFTP thread
        self._nodes: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- observations ---------------------------------------------------------
    def tftp_done(self, address: str, name: str, started: float, ended: float, nbytes: int, ok: bool) -> None:
        """A TFTP transfer ended (any thread); kept until a boot script claims it."""
        with self._tftp_lock:
            self._tftp.append(TftpTransfer(address, name, started, ended, nbytes, ok))

    def script_served(
        self, node: str, boot_id: str, environment: str, origin: str, started: float, nbytes: int, what: str
    ) -> None:
        """The relay sent ``node`` its boot script (on the event loop)."""
        if not boot_id:
            return
        self._nodes[boot_id] = node
        self._nodes.move_to_end(boot_id)
        while len(self._nodes) > MAX_BOOTS_KEPT:
            self._nodes.popitem(last=False)
        for t in self._claim_tftp(origin, started):
            self._record(
                pb.BootEvent(
                    node=node, boot_id=boot_id, stage=f"tftp:{t.name}", time=_ts(t.ended), bytes=t.bytes,
                    ok=t.ok, environment=environment, duration=max(0.0, t.ended - t.started),
                    message=f"stage 1 over TFTP to {t.address}; joined to this boot by address and time",
                )
            )  # fmt: skip
        now = time.time()
        self._record(
            pb.BootEvent(
                node=node, boot_id=boot_id, stage="script", time=_ts(now), bytes=nbytes, ok=True,
                environment=environment, duration=max(0.0, now - started), message=f"{what} to {origin}",
            )
        )  # fmt: skip

    def object_served(self, query: Mapping[str, str], started: float, status: int, nbytes: int) -> None:
        """An object URL of a boot (``?boot=ID&stage=kernel``) was answered (on the loop)."""
        boot_id, stage = query.get("boot", ""), query.get("stage", "")
        if not BOOT_ID_RE.fullmatch(boot_id) or stage not in OBJECT_STAGES:
            return  # not a boot's URL: nothing to record (the object was served all the same)
        now = time.time()
        ok = status in (200, 206)
        self._record(
            pb.BootEvent(
                node=self._nodes.get(boot_id, ""), boot_id=boot_id, stage=stage, time=_ts(now),
                bytes=nbytes if ok else 0, ok=ok, duration=max(0.0, now - started),
                message="" if ok else f"answered {status}" if status else "transfer broken off",
            )
        )  # fmt: skip

    def _claim_tftp(self, address: str, before: float) -> list[TftpTransfer]:
        with self._tftp_lock:
            mine = [
                t for t in self._tftp if t.address == address and before - TFTP_WINDOW <= t.started <= before
            ]
            for t in mine:
                self._tftp.remove(t)
        self.counters.tftp_matched += len(mine)
        return mine

    def _record(self, event: pb.BootEvent) -> None:
        event.relay = self.relay
        if len(self._queue) >= MAX_QUEUED:
            self._queue.popleft()
            self.counters.dropped += 1
        self._queue.append(event)
        self.counters.recorded += 1
        self._wake.set()

    # -- sending ----------------------------------------------------------------
    async def run(self) -> None:
        """Send queued events to the core until cancelled (the relay's background task)."""
        backoff = RETRY_MIN
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = [self._queue[i] for i in range(min(MAX_BATCH, len(self._queue)))]
                try:
                    await self.send(batch)
                except SlimError as exc:
                    if isinstance(exc, NotFound | InvalidArgument):
                        # the core will never take these (a boot it does not know): drop them
                        log.warning("the core refused %d boot events: %s", len(batch), exc)
                        self._pop(len(batch))
                        self.counters.dropped += len(batch)
                        continue
                    log.info("boot events wait for the core (%s); again in %.1f s", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(RETRY_MAX, backoff * 2)
                    continue
                self._pop(len(batch))
                self.counters.sent += len(batch)
                backoff = RETRY_MIN

    def _pop(self, n: int) -> None:
        for _ in range(min(n, len(self._queue))):
            self._queue.popleft()
