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
  proxy-DHCP or NAT an address is weak evidence: the transfers from an address since the
  previous script asked from it (within :data:`TFTP_WINDOW` seconds; the latest of each
  name) are joined to the boot whose script that address asks for next, and the event
  says it was matched by address and time.  (A pxelinux config over TFTP is the script
  itself: it is not stage 1.)

A transfer that failed (a relay that answered 503, a download broken off) is recorded
as a failed attempt; the loader goes on to another try or another relay, so an attempt
never decides a boot's state (the agent's stages and the environment's report do).

Events are queued and sent to the core by one background task (:meth:`BootObserver.run`),
in batches; the queue is bounded (when it is full, new events are dropped and counted) so
a core that is away never costs the relay its memory.  A batch the core refuses (a node
since removed from the registry) is sent again event by event, so one bad event costs
only itself.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from slim.errors import InvalidArgument, NotFound
from slim.v1 import core_pb2 as pb
from slim.vocabulary import BOOT_ID_RE, LOCAL_STAGE

log = logging.getLogger(__name__)

TFTP_WINDOW = 300.0  # seconds between a TFTP transfer and the boot script that claims it
MAX_TFTP_KEPT = 1024  # recent TFTP transfers remembered for matching
MAX_QUEUED = 10_000  # events waiting for the core
MAX_BATCH = 500
MAX_BOOTS_KEPT = 4096  # boot id -> node, for the scripts this relay served
OBJECT_STAGES = ("kernel", "initrd")
PXELINUX_CONFIG = "pxelinux.cfg/"
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
        # boot id -> the address its menu was sent to (only that address may say it went local)
        self._origins: collections.OrderedDict[str, str] = collections.OrderedDict()
        # address -> when the latest script was asked from it (TFTP before that is claimed)
        self._scripts: collections.OrderedDict[str, float] = collections.OrderedDict()

    # -- observations ---------------------------------------------------------
    def tftp_done(self, address: str, name: str, started: float, ended: float, nbytes: int, ok: bool) -> None:
        """A TFTP transfer ended (any thread); kept until a boot script claims it."""
        if name.lower().startswith(PXELINUX_CONFIG):
            return  # the script itself (script_served records it), not stage 1
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
        self._origins[boot_id] = origin
        self._origins.move_to_end(boot_id)
        while len(self._nodes) > MAX_BOOTS_KEPT:
            self._nodes.popitem(last=False)
        while len(self._origins) > MAX_BOOTS_KEPT:
            self._origins.popitem(last=False)
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

    def local_boot(self, boot_id: str, origin: str) -> bool:
        """A boot's menu went to the local disk (on the loop); False (nothing recorded) unless
        this relay sent that boot's menu to ``origin``."""
        if self._origins.get(boot_id) != origin:
            return False
        self._record(
            pb.BootEvent(
                node=self._nodes.get(boot_id, ""), boot_id=boot_id, stage=LOCAL_STAGE, time=_ts(time.time()),
                ok=True, message=f"the menu booted the local disk ({origin})",
            )
        )  # fmt: skip
        return True

    def _claim_tftp(self, address: str, before: float) -> list[TftpTransfer]:
        """The transfers from ``address`` since its previous script (within the window),
        the latest of each name; the rest of that address's are forgotten."""
        since = max(before - TFTP_WINDOW, self._scripts.get(address, 0.0))
        self._scripts[address] = before
        self._scripts.move_to_end(address)
        while len(self._scripts) > MAX_BOOTS_KEPT:
            self._scripts.popitem(last=False)
        latest: dict[str, TftpTransfer] = {}
        with self._tftp_lock:
            for t in [t for t in self._tftp if t.address == address and t.started <= before]:
                self._tftp.remove(t)
                if t.started >= since:
                    latest[t.name] = t
        mine = sorted(latest.values(), key=lambda t: t.started)
        self.counters.tftp_matched += len(mine)
        return mine

    def _record(self, event: pb.BootEvent) -> None:
        event.relay = self.relay
        if len(self._queue) >= MAX_QUEUED:
            self.counters.dropped += 1  # the newest go: the sender pops what it sent from the left
            return
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
                    sent = await self._send(batch)
                except Exception as exc:  # noqa: BLE001 - the core is away or broken: wait, never die
                    log.info("boot events wait for the core (%s); again in %.1f s", exc, backoff)
                    await asyncio.sleep(backoff * random.uniform(1.0, 1.5))  # noqa: S311 - jitter
                    backoff = min(RETRY_MAX, backoff * 2)
                    continue
                self._pop(len(batch))
                self.counters.sent += sent
                self.counters.dropped += len(batch) - sent
                backoff = RETRY_MIN

    async def _send(self, batch: list[pb.BootEvent]) -> int:
        """Send a batch; the events the core took.  A batch it refuses (an event it will
        never take) goes again event by event, so that one costs only itself."""
        try:
            await self.send(batch)
            return len(batch)
        except (NotFound, InvalidArgument) as exc:
            if len(batch) == 1:
                log.warning("the core refused a boot event (%s): %s", batch[0].stage, exc)
                return 0
        taken = 0
        for event in batch:
            taken += await self._send([event])
        return taken

    def _pop(self, n: int) -> None:
        for _ in range(min(n, len(self._queue))):
            self._queue.popleft()
