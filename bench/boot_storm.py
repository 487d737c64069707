"""P1 boot storm: N nodes booting at once on a namespace cluster, and the simulator beside it.

    PYTHONPATH=. .venv/bin/python bench/boot_storm.py [--nodes 1,2,4,8,16,32,64] [--repeat 3] \
        [--out docs/benchmarks]

**The real storms** (``labs.stormlab``): `slim serve` in a server namespace;
N node namespaces on tbf-shaped veths.  The paper's LAN is 100 Mb/s per node
and 1 Gb/s to the server; here every rate *and* every byte is divided by 10
(10 Mb/s per node, the server's side of the bridge at 100 Mb/s, the synthetic
Table-2 image at scale 0.1, a 1.49 MB kernel + initrd), so each transfer takes
the seconds it would take on the paper's network.  What is not scaled is CPU:
every node's agent and the servers share this machine's 2 cores.

A node's boot, after its firmware: the kernel and initrd its boot script names
(fetched as iPXE would), then the agent (no-reboot mode): the plan, ``/`` (all
but /bin /lib /sbin /usr, which are NFS, as in the paper) either unpacked from
its archive (**full copy**, fresh roots) or compared with the copy from the
boot before (**copy-if-needed, nothing changed**), the NFS mount points,
``done``.  The time of a storm is from its start until the last node's ``done``
event reached the core; each node's stage times are the core's boot events.

**The simulator** (``slim simulate``) is calibrated on one node booting alone
on an unshaped link (its CPU per stage, measured with getrusage, and the
release's sizes), then predicts every storm; the error is reported.  The same
calibration at full scale (the Table-2 image at scale 1.0, one node alone)
gives the workload for the paper's 272 nodes and for 10,000 nodes with relays.

Writes docs/benchmarks/boot_storm.json, boot_storm.png (boot time against
nodes, beside the paper's figures) and boot_storm_timeline.png.  As root.
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
from dataclasses import replace
from pathlib import Path
from typing import Any

from labs.stormlab import BOOT_BYTES, POLICIES, TCP_OVER_ETHERNET, StormLab, solo, table2_image
from slim.simulate import (
    PAPER,
    Topology,
    Workload,
    lower_bound,
    plan_relays,
    simulate,
    workload_from_dict,
    workload_to_dict,
)

ROOT = Path(__file__).resolve().parent.parent
PAPER_FULL_S, PAPER_CIN_S = 300.0, 180.0  # the paper's 272 nodes: 5 min full copy, 3 min copy-if-needed


def lab_topology(n: int, node_rate: float, uplink: float, cores: float) -> Topology:
    return Topology(
        nodes=n,
        per_switch=n,
        node_link=node_rate,
        switch_uplink=1e12,
        server_link=uplink,
        node_cpu=cores,
        rtt=0.0001,
        efficiency=TCP_OVER_ETHERNET,
    )


def real_storms(lab: StormLab, sizes: list[int], repeat: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every storm size, ``repeat`` rounds of full copy then copy-if-needed; the timelines
    of the last round of the largest."""
    storms: list[dict[str, Any]] = []
    timelines: dict[str, Any] = {}
    for n in sizes:
        nodes = lab.node_names[:n]
        for i in range(repeat):
            for policy in ("full", "cin"):
                wire0 = sum(lab.wire_bytes(x) for x in nodes)
                t0 = time.time()
                results = lab.storm(nodes, policy, fresh=policy == "full")
                failed = [r for r in results if r.returncode != 0 or not r.done_at]
                if failed:
                    raise SystemExit(f"{failed[0].node} failed: {failed[0].stderr}")
                took = max(r.done_at for r in results) - t0
                wire = sum(lab.wire_bytes(x) for x in nodes) - wire0
                storms.append({
                    "nodes": n, "policy": policy, "round": i, "seconds": took,
                    "median_node_s": statistics.median(r.done_at - t0 for r in results),
                    "wire_bytes_per_node": wire / n,
                })  # fmt: skip
                if i == repeat - 1 and n == max(sizes):
                    timelines[policy] = {r.node: r.timeline(t0) for r in results}
                print(
                    f"N={n} {policy} round {i + 1}: {took:.2f} s, {wire / n / 1e6:.2f} MB per node",
                    flush=True,
                )
    return storms, timelines


def predictions(
    storms: list[dict[str, Any]],
    calibration: dict[str, Workload],
    sizes: list[int],
    node_rate: float,
    uplink: float,
) -> list[dict[str, Any]]:
    """The simulator beside each storm size's median."""
    rows = []
    for n in sizes:
        for policy in ("full", "cin"):
            measured = statistics.median(
                s["seconds"] for s in storms if s["nodes"] == n and s["policy"] == policy
            )
            topo = lab_topology(n, node_rate, uplink, os.cpu_count() or 2)
            sim = simulate(topo, calibration[policy])
            bound, by = lower_bound(topo, calibration[policy])
            error = (sim.makespan - measured) / measured
            rows.append({
                "nodes": n, "policy": policy, "measured_s": round(measured, 3),
                "simulated_s": round(sim.makespan, 3), "error": round(error, 4),
                "lower_bound_s": round(bound, 3), "lower_bound_by": by,
                "simulated_bottleneck": sim.bottleneck, "measured_over_bound": round(measured / bound, 3),
            })  # fmt: skip
    return rows


def projections(work: dict[str, Workload]) -> tuple[dict[str, Any], dict[str, Any], Topology, dict[str, Any]]:
    """The paper's cluster (N = 1..272, then 272 with relays) and 10,000 nodes with relays."""
    curve = [1, 2, 4, 8, 16, 24, 48, 96, 144, 192, 240, 272]
    paper = {
        policy: [{"nodes": n, **simulate(replace(PAPER, nodes=n), work[policy]).summary()} for n in curve]
        for policy in ("full", "cin")
    }
    relayed = {
        policy: [simulate(replace(PAPER, relays=r), work[policy]).summary() for r in (1, 2, 3, 4, 6)]
        for policy in ("full", "cin")
    }
    campus = Topology(nodes=10_000, per_switch=24, switch_uplink=1e9, server_link=10e9, relay_link=10e9)
    ten_k = {
        policy: {
            "server_alone": simulate(campus, work[policy]).summary(),
            "plan_5min": [r.summary() for r in plan_relays(campus, work[policy], 300.0)],
            "plan_2min": [r.summary() for r in plan_relays(campus, work[policy], 120.0)],
        }
        for policy in ("full", "cin")
    }
    return paper, relayed, campus, ten_k


def measure(
    args: argparse.Namespace, sizes: list[int], node_rate: float, uplink: float
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Workload], dict[str, Workload] | None]:
    """The real part: calibrations and storms."""
    tmp = Path(tempfile.mkdtemp(prefix="slim-bench-p1-"))
    try:
        image = table2_image(tmp, args.scale, cached=False)
        with StormLab(
            tmp / "lab",
            image,
            POLICIES,
            nodes=max(sizes),
            node_rate=f"{node_rate:.0f}bit",
            uplink_rate=f"{uplink:.0f}bit",
            extra_unshaped=1,
        ) as lab:
            calibration = solo(lab, "u1", args.repeat)
            print(
                "calibration (one node, unshaped):",
                json.dumps({k: workload_to_dict(w) for k, w in calibration.items()}),
                flush=True,
            )
            lab.shape_uplink()
            storms, timelines = real_storms(lab, sizes, args.repeat)
        full_scale = None
        if not args.no_full_scale:
            big = table2_image(tmp, 1.0, cached=True)
            with StormLab(tmp / "lab1", big, POLICIES, nodes=0, extra_unshaped=1) as lab1:
                full_scale = solo(lab1, "u1", args.repeat)
                print(
                    "full-scale calibration:",
                    json.dumps({k: workload_to_dict(w) for k, w in full_scale.items()}),
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    return storms, timelines, calibration, full_scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="1,2,4,8,16,32,64", help="storm sizes, comma-separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scale", type=float, default=0.1, help="image scale and rate scale of the real storms")
    ap.add_argument(
        "--no-full-scale",
        action="store_true",
        help="skip the full-scale calibration (paper projections use --scale's, times 1/scale)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    ap.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="no storms: take the measurements (storms, calibrations, timelines) of an earlier run's "
        "boot_storm.json and redo the simulator's side (after a change to the simulator)",
    )
    args = ap.parse_args()
    started = time.time()
    if args.from_json is not None:
        earlier = json.loads(args.from_json.read_text())
        storms, timelines = earlier["storms"], earlier["timelines"]
        calibration = {k: workload_from_dict(w) for k, w in earlier["calibration"].items()}
        full_scale = {k: workload_from_dict(w) for k, w in earlier["full_scale_calibration"].items()} or None
        sizes = sorted({s["nodes"] for s in storms})
        args.scale = earlier["lab"]["scale"]
        node_rate, uplink = earlier["lab"]["node_link_bits"], earlier["lab"]["server_uplink_bits"]
        command, date, took = earlier["command"], earlier["date"], earlier["took_s"]
    else:
        if os.geteuid() != 0:
            raise SystemExit("the boot storm needs root (network namespaces)")
        sizes = sorted({int(x) for x in args.nodes.split(",")})
        node_rate, uplink = 100e6 * args.scale, 1e9 * args.scale
        storms, timelines, calibration, full_scale = measure(args, sizes, node_rate, uplink)
        command = "python bench/boot_storm.py " + " ".join(sys.argv[1:])
        date, took = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), round(time.time() - started)

    rows = predictions(storms, calibration, sizes, node_rate, uplink)
    worst = max(abs(r["error"]) for r in rows)
    big_w = full_scale or {k: w.scaled(1 / args.scale) for k, w in calibration.items()}
    paper, relayed, campus, ten_k = projections(
        {k: replace(w, boot_bytes=BOOT_BYTES) for k, w in big_w.items()}
    )
    result = {
        "benchmark": "P1 boot storm (namespace cluster) and the simulator",
        "command": command,
        "date": date,
        "took_s": took,
        "simulated_with": "python bench/boot_storm.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "lab": {
            "scale": args.scale,
            "node_link_bits": node_rate,
            "server_uplink_bits": uplink,
            "image": "synthetic Table-2 image (labs/table2.py)",
            "copied": "/ except /bin /lib /sbin /usr (NFS)",
        },
        "calibration": {k: workload_to_dict(w) for k, w in calibration.items()},
        "full_scale_calibration": {k: workload_to_dict(w) for k, w in (full_scale or {}).items()},
        "storms": storms,
        "prediction": rows,
        "worst_error": worst,
        "paper_topology": paper,
        "paper_topology_with_relays": relayed,
        "campus_10000": {"topology": campus.__dict__, **ten_k},
        "paper_figures_s": {"full": PAPER_FULL_S, "cin": PAPER_CIN_S},
        "timelines": timelines,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "boot_storm.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out)
    print(f"{'N':>4} {'policy':>6} {'measured':>9} {'simulated':>9} {'error':>7} {'bound':>7}")
    for r in rows:
        print(
            f"{r['nodes']:>4} {r['policy']:>6} {r['measured_s']:>8.2f}s {r['simulated_s']:>8.2f}s "
            f"{r['error']:>+7.1%} {r['lower_bound_s']:>6.2f}s"
        )
    print(f"worst simulator error: {worst:.1%}")
    for policy in ("full", "cin"):
        p = paper[policy][-1]
        print(
            f"paper topology, 272 nodes, {policy}: {p['makespan_s']:.1f} s simulated "
            f"(paper: {result['paper_figures_s'][policy]:.0f} s; bound {p['lower_bound_s']:.1f} s)"
        )


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {"full": "tab:red", "cin": "tab:blue"}
    names = {"full": "full copy", "cin": "copy-if-needed"}
    fig, ax = plt.subplots(figsize=(8, 5))
    for policy in ("full", "cin"):
        rows = [r for r in result["prediction"] if r["policy"] == policy]
        ax.plot(
            [r["nodes"] for r in rows],
            [r["measured_s"] for r in rows],
            "o-",
            color=colors[policy],
            label=f"{names[policy]}: measured (namespace cluster, bytes and rates ÷10)",
        )
        ax.plot(
            [r["nodes"] for r in rows],
            [r["simulated_s"] for r in rows],
            "x:",
            color=colors[policy],
            label=f"{names[policy]}: simulator, same set-up",
        )
        curve = result["paper_topology"][policy]
        ax.plot(
            [c["nodes"] for c in curve],
            [c["makespan_s"] for c in curve],
            "-",
            color=colors[policy],
            alpha=0.4,
            linewidth=3,
            label=f"{names[policy]}: simulator, paper's cluster (1 server)",
        )
        ax.plot(
            [272],
            [result["paper_figures_s"][policy]],
            "*",
            color=colors[policy],
            markersize=14,
            label=f"{names[policy]}: the paper, 272 nodes",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("nodes booting at once")
    ax.set_ylabel("seconds until every node has its EE")
    ax.set_title("Boot time against number of nodes (cf. the paper's Figure 5)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "boot_storm.png", dpi=110)
    plt.close(fig)

    stage_colors = {
        "kernel+initrd": "tab:gray",
        "plan": "tab:purple",
        "ram:/": "tab:red",
        "sync:/": "tab:blue",
        "mount (NFS)": "tab:olive",
        "done": "tab:green",
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 6), sharey=True)
    for ax, policy in zip(axes, ("full", "cin"), strict=True):
        tl = result["timelines"].get(policy, {})
        for y, (_node, stages) in enumerate(sorted(tl.items(), key=lambda kv: int(kv[0][1:]))):
            for s in stages:
                color = stage_colors.get(
                    "mount (NFS)" if s["stage"].startswith("mount:") else s["stage"], "k"
                )
                ax.barh(y, s["end"] - s["start"], left=s["start"], color=color, height=0.8)
        ax.set_title(f"{names[policy]}: {len(tl)} nodes")
        ax.set_xlabel("seconds from the storm's start")
    axes[0].set_ylabel("node")
    handles = [Patch(color=c) for c in stage_colors.values()]
    fig.legend(handles, list(stage_colors), loc="lower center", ncol=len(stage_colors))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out / "boot_storm_timeline.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
