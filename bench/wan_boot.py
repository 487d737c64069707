"""P2 WAN boot: one node behind a 3 Mb/s link booting the paper's Table-2 image through a relay.

    PYTHONPATH=. .venv/bin/python bench/wan_boot.py [--rate 3mbit] [--repeat 3] [--out docs/benchmarks]

The synthetic Table-2 image at full scale (``python -m labs.table2``: 173k files,
2.4 GB; /bin /lib /sbin /usr over NFS as in the paper, the rest, 95 MB, copied)
with a stand-in kernel + initrd of the real ones' size (14.9 MB).  `slim
serve` (core and relay) in a server namespace; one node namespace on a veth
shaped with tbf to ``--rate`` both ways (the paper's home PC had 3 Mb/s down).
The node fetches the kernel and initrd its boot script names, then runs the
agent: plan, ``/`` unpacked from one archive into its RAM (a tmpfs), NFS mount
points, done.  Then it boots again with copy-if-needed and nothing changed.

Reported per boot: time from the node's first request to its ``done`` event;
payload bytes (what the relay's objects and answers weigh) and bytes on the
wire (the tbf qdisc's count of frames to the node, headers included); the lower
bound, payload bytes ÷ link rate; the paper's 3 min 40 s.  The simulator's
prediction from the same node's calibration (CPU per stage on an unshaped link)
is printed beside it.  Writes docs/benchmarks/wan_boot.json.  As root; the
first run generates the image (about 90 s) into the cache
(``$SLIM_BENCH_CACHE``, default ~/.cache/slim-bench).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from labs.stormlab import POLICIES, TCP_OVER_ETHERNET, StormLab, solo, table2_image
from slim.simulate import Topology, lower_bound, simulate, workload_to_dict
from slim.vocabulary import parse_rate

ROOT = Path(__file__).resolve().parent.parent
PAPER_WAN_S = 220.0  # 3 min 40 s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", default="3mbit", help="the node's link, both ways (tc's spelling)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="the Table-2 image's scale (1.0: the paper's)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the WAN boot needs root (network namespaces)")
    rate = parse_rate(args.rate)
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="slim-bench-p2-"))
    boots: list[dict[str, Any]] = []
    try:
        image = table2_image(tmp, args.scale, cached=args.scale == 1.0)
        with StormLab(tmp / "lab", image, POLICIES, nodes=1, node_rate=args.rate, extra_unshaped=1) as lab:
            calibration = solo(lab, "u1", 1)
            release = lab.builds["full"].release
            for i in range(args.repeat):
                for policy in ("full", "cin"):
                    wire0 = lab.wire_bytes("n1")
                    t0 = time.time()
                    (r,) = lab.storm(["n1"], policy, fresh=policy == "full")
                    if r.returncode != 0 or not r.done_at:
                        raise SystemExit(f"the WAN boot failed: {r.stderr}")
                    payload = r.boot_bytes + sum(e["bytes"] for e in r.events if e["stage"] != "done")
                    boots.append(
                        {
                            "policy": policy,
                            "round": i,
                            "seconds": r.done_at - t0,
                            "payload_bytes": payload,
                            "wire_bytes": lab.wire_bytes("n1") - wire0,
                            "timeline": r.timeline(t0),
                        }
                    )
                    print(
                        f"round {i + 1} {policy}: {r.done_at - t0:.1f} s, {payload / 1e6:.2f} MB", flush=True
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = {}
    topo = Topology(
        nodes=1,
        node_link=rate,
        switch_uplink=1e12,
        server_link=1e12,
        rtt=0.0001,
        efficiency=TCP_OVER_ETHERNET,
    )
    for policy in ("full", "cin"):
        mine = [b for b in boots if b["policy"] == policy]
        seconds = statistics.median(b["seconds"] for b in mine)
        payload = statistics.median(b["payload_bytes"] for b in mine)
        wire = statistics.median(b["wire_bytes"] for b in mine)
        bound = payload * 8 / rate
        sim = simulate(topo, calibration[policy])
        rows[policy] = {
            "seconds": round(seconds, 2),
            "payload_bytes": payload,
            "wire_bytes": wire,
            "lower_bound_s": round(bound, 2),
            "over_bound": round(seconds / bound, 3),
            "simulated_s": round(sim.makespan, 2),
            "simulated_error": round((sim.makespan - seconds) / seconds, 4),
            "simulated_bound_s": round(lower_bound(topo, calibration[policy])[0], 2),
        }
    result = {
        "benchmark": "P2 WAN boot",
        "command": "python bench/wan_boot.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "took_s": round(time.time() - started),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "link_bits": rate,
        "image": {
            "scale": args.scale,
            "kernel_bytes": release.kernel.size,
            "initrd_bytes": release.initrd.size,
            "copied": {
                p: {"archive_bytes": d.archive.size if d.archive else 0, "files": d.files, "bytes": d.bytes}
                for p, d in release.directories.items()
                if d.policy != "nfs"
            },
        },
        "paper_s": PAPER_WAN_S,
        "results": rows,
        "calibration": {k: workload_to_dict(w) for k, w in calibration.items()},
        "boots": boots,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wan_boot.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "wan_boot.png")
    for policy, row in rows.items():
        print(
            f"{policy}: {row['seconds']:.1f} s, {row['payload_bytes'] / 1e6:.2f} MB payload, "
            f"{row['wire_bytes'] / 1e6:.2f} MB on the wire; bound {row['lower_bound_s']:.1f} s "
            f"({row['over_bound']:.2f}x); simulator {row['simulated_s']:.1f} s; paper {PAPER_WAN_S:.0f} s"
        )


def plot(result: dict[str, Any], path: Path) -> None:
    """One bar per boot (its stages, from the median round), the lower bound and the paper's time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {"kernel+initrd": "tab:gray", "plan": "tab:purple", "ram:/": "tab:red", "sync:/": "tab:blue"}
    names = {"full": "full copy (first boot)", "cin": "copy-if-needed, nothing changed"}
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for y, policy in enumerate(("full", "cin")):
        mine = sorted((b for b in result["boots"] if b["policy"] == policy), key=lambda b: b["seconds"])
        boot = mine[len(mine) // 2]
        for s in boot["timeline"]:
            ax.barh(y, s["end"] - s["start"], left=s["start"], color=colors.get(s["stage"], "tab:olive"))
        bound = result["results"][policy]["lower_bound_s"]
        ax.plot([bound, bound], [y - 0.45, y + 0.45], "k--")
    ax.axvline(result["paper_s"], color="tab:orange", linewidth=2)
    ax.text(result["paper_s"], 1.5, " the paper: 3 min 40 s", color="tab:orange", va="center")
    ax.set_yticks([0, 1], [names["full"], names["cin"]])
    ax.set_ylim(-0.6, 1.8)
    ax.set_xlim(0, result["paper_s"] * 1.45)
    ax.set_xlabel(f"seconds, one node behind {result['link_bits'] / 1e6:g} Mb/s (dashed: bytes ÷ bandwidth)")
    ax.legend([Patch(color=c) for c in colors.values()], list(colors), loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
