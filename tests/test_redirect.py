"""Request redirection: Redirector.rank as a pure function of registry, heartbeats and time."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from collections.abc import Mapping

import pytest

from slim.core.control.redirect import RankedRelay, Redirector, RelayStatus, parse_origin, relay_status
from slim.core.control.state import RelayBeat
from slim.core.registry import Registry, load_registry_text
from slim.errors import InvalidArgument
from slim.vocabulary import Tier

NOW = 1_000_000.0
STALE_AFTER = 20.0
WINDOW = 30.0

# Site a has two relays whose parent is "up" (at site c); b has one relay, no parent.
REGISTRY = f"""\
settings:
  stale_after: {STALE_AFTER}
  spread_window: {WINDOW}
sites:
  a:
    prefixes: [10.1.0.0/16, "fd00:1::/64"]
  b:
    prefixes: [10.2.0.0/16]
  c:
    prefixes: [10.3.0.0/16]
relays:
  up:
    urls: [http://10.3.0.1:8080/]
    site: c
  a1:
    urls: [http://10.1.0.1:8080/, "http://[fd00:1::1]:8080/"]
    site: a
    parent: up
  a2:
    urls: [http://10.1.0.2:8080/]
    site: a
    parent: up
  b1:
    urls: [http://10.2.0.1:8080/]
    site: b
"""


def make_registry(text: str = REGISTRY) -> Registry:
    return load_registry_text(text, file="reg.yaml")


def one_site(relays: Mapping[str, float]) -> Registry:
    """A registry with site ``s`` (10.0.0.0/8) and the given relays (name → capacity)."""
    lines = [
        "settings:",
        f"  stale_after: {STALE_AFTER}",
        f"  spread_window: {WINDOW}",
        "sites:",
        "  s:",
        "    prefixes: [10.0.0.0/8]",
        "relays:",
    ]
    for name, capacity in relays.items():
        lines += [f"  {name}:", f"    urls: [http://{name}/]", "    site: s", f"    capacity: {capacity}"]
    return make_registry("\n".join(lines) + "\n")


def beat(relay: str, load: float = 0.0, age: float = 1.0, healthy: bool = True) -> RelayBeat:
    """A heartbeat from ``relay`` received ``age`` seconds before NOW."""
    return RelayBeat(
        relay=relay,
        load=load,
        active_transfers=int(load),
        egress_bps=0.0,
        cache_bytes=0,
        healthy=healthy,
        message="",
        last_seen=NOW - age,
    )


def beats(*items: RelayBeat) -> dict[str, RelayBeat]:
    return {b.relay: b for b in items}


def live_all(**loads: float) -> dict[str, RelayBeat]:
    return beats(*(beat(name, load) for name, load in loads.items()))


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def redirector(seed: int = 1) -> Redirector:
    return Redirector(random.Random(seed))


def names(ranked: list[RankedRelay]) -> list[str]:
    return [r.name for r in ranked]


def tiers(ranked: list[RankedRelay]) -> list[Tier]:
    return [r.tier for r in ranked]


ALL_LIVE = live_all(up=0, a1=0, a2=0, b1=0)


# -- origin → site ------------------------------------------------------------


def test_origin_in_a_site_prefix_gets_that_site_first() -> None:
    site, ranked = redirector().rank(make_registry(), ALL_LIVE, ip("10.1.7.7"), NOW, assign=False)
    assert site == "a"
    assert set(names(ranked[:2])) == {"a1", "a2"}
    assert names(ranked[2:]) == ["up", "b1"]
    assert tiers(ranked) == [Tier.SITE, Tier.SITE, Tier.PARENT, Tier.OTHER]
    first = next(r for r in ranked if r.name == "a1")
    assert first.urls == ("http://10.1.0.1:8080/", "http://[fd00:1::1]:8080/")
    assert first.site == "a"
    assert first.heartbeat_seen


def test_other_site_has_its_own_order() -> None:
    # b1 has no parent, so "up" is just another relay for an origin at site b
    site, ranked = redirector().rank(make_registry(), ALL_LIVE, ip("10.2.0.9"), NOW, assign=False)
    assert site == "b"
    assert names(ranked)[0] == "b1"
    assert tiers(ranked) == [Tier.SITE, Tier.OTHER, Tier.OTHER, Tier.OTHER]


def test_ipv6_origin_matches_an_ipv6_prefix() -> None:
    site, ranked = redirector().rank(make_registry(), ALL_LIVE, ip("fd00:1::42"), NOW, assign=False)
    assert site == "a"
    assert tiers(ranked)[:2] == [Tier.SITE, Tier.SITE]


def test_node_site_is_the_fallback_when_no_prefix_matches() -> None:
    site, ranked = redirector().rank(
        make_registry(), ALL_LIVE, ip("192.0.2.1"), NOW, node_site="b", assign=False
    )
    assert site == "b"
    assert names(ranked)[0] == "b1"
    assert ranked[0].tier is Tier.SITE


def test_prefix_wins_over_node_site() -> None:
    site, ranked = redirector().rank(
        make_registry(), ALL_LIVE, ip("10.1.0.50"), NOW, node_site="b", assign=False
    )
    assert site == "a"
    assert ranked[0].site == "a"


def test_no_site_at_all_gives_every_relay_as_other() -> None:
    site, ranked = redirector().rank(make_registry(), ALL_LIVE, ip("192.0.2.1"), NOW, assign=False)
    assert site is None
    assert sorted(names(ranked)) == ["a1", "a2", "b1", "up"]
    assert set(tiers(ranked)) == {Tier.OTHER}


# -- load order ---------------------------------------------------------------


def test_relays_of_a_site_are_ordered_by_load() -> None:
    reg = one_site({"x": 1, "y": 1, "z": 1})
    _, ranked = redirector().rank(reg, live_all(x=3, y=1, z=2), ip("10.0.0.5"), NOW, assign=False)
    assert names(ranked) == ["y", "z", "x"]
    assert [r.score for r in ranked] == [1.0, 2.0, 3.0]


def test_capacity_weighs_the_load() -> None:
    # big: load 4 on capacity 4 (score 1) beats small: load 2 on capacity 1 (score 2)
    reg = one_site({"small": 1, "big": 4})
    _, ranked = redirector().rank(reg, live_all(small=2, big=4), ip("10.0.0.5"), NOW, assign=False)
    assert names(ranked) == ["big", "small"]
    assert [r.score for r in ranked] == [1.0, 2.0]


def test_load_only_orders_within_a_tier() -> None:
    # a busy site relay still comes before an idle parent and an idle other relay
    _, ranked = redirector().rank(
        make_registry(), live_all(a1=50, a2=40, up=0, b1=0), ip("10.1.0.9"), NOW, assign=False
    )
    assert names(ranked) == ["a2", "a1", "up", "b1"]


def test_assign_false_does_not_count() -> None:
    red = redirector()
    reg = one_site({"x": 1})
    for _ in range(5):
        red.rank(reg, live_all(x=0), ip("10.0.0.5"), NOW, assign=False)
    assert red.pending("x", beat("x"), NOW, WINDOW) == 0


# -- excluded and unknown relays ----------------------------------------------


def test_stale_relay_is_excluded() -> None:
    hb = beats(beat("a1", age=STALE_AFTER + 0.5), beat("a2", age=STALE_AFTER), beat("up"), beat("b1"))
    _, ranked = redirector().rank(make_registry(), hb, ip("10.1.0.9"), NOW, assign=False)
    assert "a1" not in names(ranked)
    assert names(ranked)[0] == "a2"  # exactly stale_after old is still live


def test_unhealthy_relay_is_excluded() -> None:
    hb = beats(beat("a1", healthy=False), beat("a2"), beat("up"), beat("b1"))
    _, ranked = redirector().rank(make_registry(), hb, ip("10.1.0.9"), NOW, assign=False)
    assert names(ranked) == ["a2", "up", "b1"]


def test_unknown_relay_is_kept_after_the_live_ones_of_its_tier() -> None:
    # a1 was never heard from: it stays, after a2 even though a2 is busier, before the parent
    hb = beats(beat("a2", load=9), beat("up"), beat("b1"))
    _, ranked = redirector().rank(make_registry(), hb, ip("10.1.0.9"), NOW, assign=False)
    assert names(ranked) == ["a2", "a1", "up", "b1"]
    assert [r.heartbeat_seen for r in ranked] == [True, False, True, True]
    assert ranked[1].tier is Tier.SITE
    assert ranked[1].score == 0.0


def test_relay_status() -> None:
    assert relay_status(None, NOW, STALE_AFTER) is RelayStatus.UNKNOWN
    assert relay_status(beat("x"), NOW, STALE_AFTER) is RelayStatus.LIVE
    assert relay_status(beat("x", age=STALE_AFTER + 1), NOW, STALE_AFTER) is RelayStatus.STALE
    assert relay_status(beat("x", healthy=False), NOW, STALE_AFTER) is RelayStatus.UNHEALTHY
    # a stale report of ill health is stale: the relay is not heard from either way
    assert relay_status(beat("x", age=99, healthy=False), NOW, STALE_AFTER) is RelayStatus.STALE


# -- fallback -----------------------------------------------------------------


def test_parents_then_other_sites_when_the_site_relays_are_stale() -> None:
    hb = beats(beat("a1", age=60), beat("a2", age=60), beat("up", load=5), beat("b1"))
    _, ranked = redirector().rank(make_registry(), hb, ip("10.1.0.9"), NOW, assign=False)
    assert names(ranked) == ["up", "b1"]
    assert tiers(ranked) == [Tier.PARENT, Tier.OTHER]  # a loaded parent still beats an idle stranger


def test_tiers_come_in_order() -> None:
    hb = beats(beat("a1", load=30), beat("a2", age=60), beat("up", load=20), beat("b1", load=0))
    _, ranked = redirector().rank(make_registry(), hb, ip("10.1.0.9"), NOW, assign=False)
    assert tiers(ranked) == sorted(tiers(ranked))
    assert tiers(ranked) == [Tier.SITE, Tier.PARENT, Tier.OTHER]


def test_nothing_to_offer_when_every_relay_is_stale() -> None:
    hb = beats(*(beat(n, age=60) for n in ("up", "a1", "a2", "b1")))
    red = redirector()
    site, ranked = red.rank(make_registry(), hb, ip("10.1.0.9"), NOW)
    assert site == "a"
    assert ranked == []


# -- spreading a boot storm ---------------------------------------------------


def test_a_storm_spreads_over_equal_relays() -> None:
    reg = one_site({"r1": 1, "r2": 1, "r3": 1, "r4": 1})
    hb = live_all(r1=0, r2=0, r3=0, r4=0)
    red = redirector(seed=42)
    order = [red.rank(reg, hb, ip("10.0.0.5"), NOW)[1][0].name for _ in range(1000)]
    firsts = Counter(order)
    assert set(firsts) == {"r1", "r2", "r3", "r4"}
    for name, count in firsts.items():
        assert 200 <= count <= 300, f"{name} got {count} of 1000 first places: {firsts}"
    # random tie-breaking alone would also give about 25 % each; counting the
    # redirections is what sends every 4 consecutive nodes to 4 different relays
    for i in range(0, 1000, 4):
        assert len(set(order[i : i + 4])) == 4, f"nodes {i}..{i + 3} went to {order[i : i + 4]}"


def test_a_storm_respects_capacity() -> None:
    reg = one_site({"big": 3, "small": 1})
    hb = live_all(big=0, small=0)
    red = redirector()
    firsts = Counter(names(red.rank(reg, hb, ip("10.0.0.5"), NOW)[1])[0] for _ in range(400))
    assert 290 <= firsts["big"] <= 310
    assert 90 <= firsts["small"] <= 110


def test_ties_are_broken_by_the_seeded_rng() -> None:
    reg = one_site({"r1": 1, "r2": 1, "r3": 1, "r4": 1})
    hb = live_all(r1=0, r2=0, r3=0, r4=0)
    orders = {
        tuple(names(redirector(seed).rank(reg, hb, ip("10.0.0.5"), NOW, assign=False)[1]))
        for seed in range(20)
    }
    assert len(orders) > 1  # not a fixed order
    same = [names(redirector(7).rank(reg, hb, ip("10.0.0.5"), NOW, assign=False)[1]) for _ in range(2)]
    assert same[0] == same[1]  # but reproducible


def test_redirections_count_as_load_until_the_next_heartbeat() -> None:
    reg = one_site({"x": 1})
    red = redirector()
    old = beat("x", load=2, age=1)
    for _ in range(3):
        red.rank(reg, beats(old), ip("10.0.0.5"), NOW)
    assert red.pending("x", old, NOW, WINDOW) == 3
    _, ranked = red.rank(reg, beats(old), ip("10.0.0.5"), NOW, assign=False)
    assert ranked[0].score == 5.0  # reported 2 + 3 on their way

    # the relay reports again after those redirections: its load now includes them
    new = beat("x", load=4, age=-1)  # last_seen NOW + 1
    assert red.pending("x", new, NOW + 2, WINDOW) == 0
    _, ranked = red.rank(reg, beats(new), ip("10.0.0.5"), NOW + 2, assign=False)
    assert ranked[0].score == 4.0


def test_redirections_after_the_heartbeat_still_count() -> None:
    reg = one_site({"x": 1})
    red = redirector()
    hb = beats(beat("x", age=1))
    red.rank(reg, hb, ip("10.0.0.5"), NOW - 2)  # before the heartbeat: forgotten
    red.rank(reg, hb, ip("10.0.0.5"), NOW)  # after it: counted
    assert red.pending("x", hb["x"], NOW, WINDOW) == 1


def test_redirections_expire_after_the_spread_window() -> None:
    reg = one_site({"x": 1})
    red = redirector()
    for _ in range(3):
        red.rank(reg, {}, ip("10.0.0.5"), NOW)  # never heard from: only the window forgets
    assert red.pending("x", None, NOW + WINDOW - 0.001, WINDOW) == 3
    _, ranked = red.rank(reg, {}, ip("10.0.0.5"), NOW + WINDOW - 0.001, assign=False)
    assert ranked[0].score == 3.0
    assert red.pending("x", None, NOW + WINDOW, WINDOW) == 0
    _, ranked = red.rank(reg, {}, ip("10.0.0.5"), NOW + WINDOW, assign=False)
    assert ranked[0].score == 0.0


def test_a_redirection_at_the_instant_of_a_heartbeat_still_counts() -> None:
    """A report stamped at the same instant as a redirection cannot include that node."""
    reg = one_site({"w": 1, "x": 1, "y": 1, "z": 1})
    red = redirector()
    now_beats = beats(*(beat(r, age=0.0) for r in "wxyz"))
    firsts = [names(red.rank(reg, now_beats, ip("10.0.0.5"), NOW)[1])[0] for _ in range(40)]
    assert sorted(firsts) == sorted(list("wxyz") * 10)


def test_pending_of_a_relay_never_sent_to() -> None:
    assert redirector().pending("x", None, NOW, WINDOW) == 0


# -- origin parsing -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.1.2.3", ipaddress.IPv4Address("10.1.2.3")),
        (" 10.1.2.3\n", ipaddress.IPv4Address("10.1.2.3")),
        ("fd00:1::42", ipaddress.IPv6Address("fd00:1::42")),
        ("FD00:1::42", ipaddress.IPv6Address("fd00:1::42")),
        ("fe80::1%eth0", ipaddress.IPv6Address("fe80::1")),
        ("::ffff:10.1.2.3", ipaddress.IPv4Address("10.1.2.3")),
        ("::ffff:a01:203", ipaddress.IPv4Address("10.1.2.3")),
    ],
)
def test_parse_origin(text: str, expected: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    parsed = parse_origin(text)
    assert parsed == expected
    assert type(parsed) is type(expected)


def test_mapped_origin_matches_an_ipv4_site() -> None:
    site, _ = redirector().rank(make_registry(), ALL_LIVE, parse_origin("::ffff:10.2.0.7"), NOW, assign=False)
    assert site == "b"


@pytest.mark.parametrize(
    "garbage", ["", "localhost", "10.1.2", "10.1.2.300", "1.2.3.4/32", "ipv4:10.0.0.1", "::g"]
)
def test_parse_origin_rejects_garbage(garbage: str) -> None:
    with pytest.raises(InvalidArgument, match="is not an IPv4 or IPv6 address"):
        parse_origin(garbage)
