"""Request redirection: which relays should serve a node, best first.

The paper's request redirection module picks "the best available
dissemination service" by the origin address of the query and the current
load of each replica.  Here (docs/redirection.md has the full rules):

1. The origin address picks a site by longest prefix match; a node whose
   address matches no site falls back to the site the registry gives it.
2. Candidates come in tiers: the site's relays, then the parents (upstream
   relays) of those, then every other relay.
3. A relay whose last heartbeat is older than ``stale_after`` seconds, or
   that reported itself unhealthy, is left out.  A relay never heard from
   since the core's state began ("unknown") stays in, after the live relays of
   its tier: a restarted core keeps answering, and nodes fail over down the
   list.
4. Within a tier, relays are ordered by score = load ÷ capacity, where load
   is the last reported load plus the nodes this module sent to the relay
   since that report (within ``spread_window`` seconds).  Counting its own
   redirections is what spreads a storm of simultaneous boots across equal
   relays: heartbeats arrive every few seconds, but each answer moves the
   next one along.  Exact ties are broken at random.
"""

from __future__ import annotations

import ipaddress
import random
import threading
from collections import deque
from collections.abc import Mapping
from enum import StrEnum
from typing import NamedTuple

from slim.core.control.state import RelayBeat
from slim.core.registry import IPAddress, Registry
from slim.errors import InvalidArgument
from slim.vocabulary import Tier

MAX_REMEMBERED_NODES = 200_000  # node -> relay assignments kept for stickiness


class RelayStatus(StrEnum):
    LIVE = "live"
    STALE = "stale"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"


EXCLUDED = (RelayStatus.STALE, RelayStatus.UNHEALTHY)  # never in an answer


class RankedRelay(NamedTuple):  # a tuple: cheap to make, and a storm makes many
    name: str
    urls: tuple[str, ...]
    site: str
    tier: Tier
    score: float
    heartbeat_seen: bool


def parse_origin(origin: str) -> IPAddress:
    """An origin address; IPv4-mapped IPv6 (``::ffff:10.0.0.1``) becomes IPv4."""
    try:
        addr = ipaddress.ip_address(origin.strip().split("%", 1)[0])
    except ValueError:
        raise InvalidArgument(f"origin {origin!r} is not an IPv4 or IPv6 address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def relay_status(beat: RelayBeat | None, now: float, stale_after: float) -> RelayStatus:
    if beat is None:
        return RelayStatus.UNKNOWN
    if now - beat.last_seen > stale_after:
        return RelayStatus.STALE
    if not beat.healthy:
        return RelayStatus.UNHEALTHY
    return RelayStatus.LIVE


def _sort_key(k: tuple[int, bool, float, float, RankedRelay]) -> tuple[int, bool, float, float]:
    return k[0], k[1], k[2], k[3]


class Redirector:
    """Ranks relays; remembers its recent choices so that storms spread."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()  # noqa: S311 - tie-breaking, not security
        self._lock = threading.RLock()
        self._sent: dict[str, deque[float]] = {}
        self._assigned: dict[str, tuple[str, float]] = {}  # node -> (relay, when)

    def pending(self, relay: str, beat: RelayBeat | None, now: float, window: float) -> int:
        """How many nodes were sent to ``relay`` since its last report (within ``window``).

        A redirection made at the very instant of a report is still counted: the
        report cannot have included that node yet."""
        with self._lock:
            return self._pending(relay, beat, now, window)

    def _pending(self, relay: str, beat: RelayBeat | None, now: float, window: float) -> int:
        sent = self._sent.get(relay)
        if not sent:
            return 0
        expired = now - window
        reported = beat.last_seen if beat is not None else expired
        while sent and (sent[0] <= expired or sent[0] < reported):
            sent.popleft()
        return len(sent)

    def rank(
        self,
        registry: Registry,
        beats: Mapping[str, RelayBeat],
        origin: IPAddress,
        now: float,
        node_site: str | None = None,
        assign: bool = True,
        node: str | None = None,
    ) -> tuple[str | None, list[RankedRelay]]:
        """(matched site, relays best first).

        With ``assign`` the first relay is counted as having one more node on
        its way.  A ``node`` sent somewhere within the last ``spread_window``
        seconds is sent there again while that relay is still in the answer,
        and counted once: the boot script, plan and locate calls of one boot
        agree on the relay."""
        settings = registry.settings
        site = registry.site_of_address(origin) or node_site
        stale_after = settings.stale_after
        window = settings.spread_window
        random = self._rng.random
        with self._lock:
            keyed: list[tuple[int, bool, float, float, RankedRelay]] = []
            for name, tier_name in registry.relays_by_site(site):
                relay = registry.relays[name]
                beat = beats.get(name)
                if relay_status(beat, now, stale_after) in EXCLUDED:
                    continue
                load = (beat.load if beat is not None else 0.0) + self._pending(name, beat, now, window)
                score = load / relay.capacity
                tier = Tier[tier_name.upper()]
                ranked = RankedRelay(name, tuple(relay.urls), relay.site, tier, score, beat is not None)
                keyed.append((tier, beat is None, score, random(), ranked))
            keyed.sort(key=_sort_key)
            result = [k[4] for k in keyed[: settings.max_relays]]
            if not result:
                return site, result
            previous = self._assigned.get(node) if node is not None else None
            if previous is not None and now - previous[1] < window:
                for i, r in enumerate(result):
                    if r.name == previous[0]:
                        if i:
                            result.insert(0, result.pop(i))
                        return site, result
            if assign:
                self._sent.setdefault(result[0].name, deque()).append(now)
                if node is not None:
                    if len(self._assigned) >= MAX_REMEMBERED_NODES:
                        self._forget(now - window)
                    self._assigned[node] = (result[0].name, now)
        return site, result

    def _forget(self, before: float) -> None:
        """Drop node assignments made before ``before`` (all, if that frees nothing)."""
        self._assigned = {n: a for n, a in self._assigned.items() if a[1] >= before}
        if len(self._assigned) >= MAX_REMEMBERED_NODES:
            self._assigned.clear()
