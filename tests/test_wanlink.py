"""The WAN lab's link (labs/wanlink.py): tbf's rate and the user-space delayer's round trip,
between two namespaces made here."""

from __future__ import annotations

import re
import secrets
import subprocess

from labs.wanlink import WanLink
from tests.support import need_netns

DELAY_MS = 20.0  # one way: a 40 ms round trip, as issue 19's home link


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_the_wan_link_adds_its_round_trip_and_carries_nothing_without_its_delayer() -> None:
    need_netns()
    tag = f"wl{secrets.token_hex(3)}"
    home, isp = f"{tag}-home", f"{tag}-isp"
    made: list[str] = []
    try:
        for ns in (home, isp):
            assert _run("ip", "netns", "add", ns).returncode == 0
            made.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        link = WanLink(
            home, isp, "10.198.1.2", "10.198.1.1", rate="3mbit", delay_ms=DELAY_MS, max_seconds=120
        )
        with link:
            for ns in (home, isp):
                shown = _run("ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", "wan0").stdout
                assert "tbf" in shown and "rate 3Mbit" in shown, shown
            ping = _run("ip", "netns", "exec", home, "busybox", "ping", "-c", "3", "-W", "5", "10.198.1.1")
            assert ping.returncode == 0, ping.stdout + ping.stderr
            m = re.search(r"min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms", ping.stdout)
            assert m is not None, ping.stdout
            assert float(m.group(1)) >= 2 * DELAY_MS - 0.5, ping.stdout  # held each way, never early
        counters = link.counters
        assert counters["delay_ms"] == DELAY_MS
        assert all(d["packets"] >= 3 and d["dropped"] == 0 for d in counters["directions"]), counters
        # the delayer is gone: the link carries nothing (never packets without the delay)
        lost = _run("ip", "netns", "exec", home, "busybox", "ping", "-c", "1", "-W", "1", "10.198.1.1")
        assert lost.returncode != 0, lost.stdout
    finally:
        for ns in made:
            _run("ip", "netns", "delete", ns)
