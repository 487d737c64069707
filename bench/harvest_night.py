"""Harvest: a simulated night of 500 desktops (`slim simulate night`), several wake rates side by side.

    PYTHONPATH=. .venv/bin/python bench/harvest_night.py [--desktops 500] [--seeds 10] [--out docs/benchmarks]

The model of :mod:`slim.simulate_night` (docs/simulate.md, ``night``): a weekday window
20:00-07:00, 15 min grace, 20 % of the desktops in use, owners coming back at 1 % an hour,
the ``night`` job mix (5,000 single-desktop jobs: 60 % 1 h, 30 % 4 h, 10 % 12 h limits, each
running 30-100 % of its limit), the paper's Table-2 EE built in RAM over the relays' 1 Gb/s
links, Slurm's backfill every 30 s with the blackout reservation from end - grace.

Variants, one run each with the same seed (so the same desktops are in use and the same
owners come back): the pool's default wake rate (4 relays, 60 packets a minute each), a
slow one (10 a minute), a fast one (600), one relay for all 500 desktops at 600 a minute (the
relay's link then carries the storm), and the default without the blackout reservation.
The default is also run over ``--seeds`` seeds: min / median / max of the node-hours.

Writes docs/benchmarks/harvest_night.json (and harvest_night.png, desktops in the EE and
jobs running over the night, if matplotlib is installed).  A simulation: no root, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from slim.simulate_night import MIXES, Night, simulate_night

ROOT = Path(__file__).resolve().parent.parent

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("4 relays, 60/min each (the pool's default)", {}),
    ("4 relays, 10/min each", {"wakes_per_minute": 10}),
    ("4 relays, 600/min each", {"wakes_per_minute": 600}),
    ("1 relay, 600/min", {"relays": 1, "wakes_per_minute": 600}),
    ("4 relays, 60/min, no blackout reservation", {"reservation": False}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--desktops", type=int, default=500)
    ap.add_argument("--seeds", type=int, default=10, help="seeds for the default's spread")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = ap.parse_args()
    base = Night(desktops=args.desktops)
    mix = MIXES["night"]
    rows = []
    profiles = {}
    for name, change in VARIANTS:
        night = replace(base, **change)
        t0 = time.perf_counter()
        result = simulate_night(night, mix)
        took = time.perf_counter() - t0
        s = result.summary()
        rows.append({"variant": name, "changes": change, "simulated_in_s": round(took, 3), **s})
        profiles[name] = result.profile(300.0)
    spread = []
    for seed in range(args.seeds):
        s = simulate_night(replace(base, seed=seed), mix).summary()
        spread.append(
            {
                "seed": seed,
                "ee": s["node_hours"]["ee"]["value"],
                "jobs": s["node_hours"]["jobs"]["value"],
                "all_up_s": s["times"]["all_up_s"],
                "first_job_s": s["times"]["first_job_s"],
            }
        )

    def stats(key: str) -> dict[str, float]:
        values = [r[key] for r in spread]
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    seeds: dict[str, Any] = {
        "runs": spread,
        "ee": stats("ee"),
        "jobs": stats("jobs"),
        "all_up_s": stats("all_up_s"),
    }
    result_json: dict[str, Any] = {
        "benchmark": "harvest: a simulated night of desktops",
        "command": "PYTHONPATH=. .venv/bin/python bench/harvest_night.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "night": dict(base.__dict__),
        "job_mix": mix.describe(),
        "variants": rows,
        "seeds": seeds,
        "profiles": profiles,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "harvest_night.json").write_text(json.dumps(result_json, indent=1) + "\n")
    print(f"{args.desktops} desktops, {mix.describe()}")
    print(
        f"{'variant':44} {'last wake':>9} {'all up':>8} {'1st job':>8} {'EE n-h':>8} {'jobs n-h':>8} "
        f"{'lost n-h':>8} {'done':>6}"
    )
    for r in rows:
        print(
            f"{r['variant']:44} {r['wake']['last_packet_s']:8.0f}s {r['times']['all_up_s']:7.0f}s "
            f"{r['times']['first_job_s']:7.0f}s {r['node_hours']['ee']['value']:8.1f} "
            f"{r['node_hours']['jobs']['value']:8.1f} {r['node_hours']['requeued_work']:8.1f} "
            f"{r['jobs']['completed']:6d}"
        )
    s = seeds
    print(
        f"default over {args.seeds} seeds: EE {s['ee']['min']:.0f} / {s['ee']['median']:.0f} / "
        f"{s['ee']['max']:.0f} node-hours, jobs {s['jobs']['min']:.0f} / {s['jobs']['median']:.0f} / "
        f"{s['jobs']['max']:.0f} (min / median / max)"
    )
    try:
        plot(result_json, args.out / "harvest_night.png")
    except ImportError:
        print("matplotlib is not installed: no plot (the JSON is written)")


def plot(result: dict[str, Any], path: Path) -> None:
    """Desktops in the EE and jobs running over the night: the default and no reservation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.4))
    names = [VARIANTS[0][0], VARIANTS[-1][0]]
    for name, style in zip(names, ("-", ":"), strict=True):
        prof = result["profiles"][name]
        hours = [p["t_s"] / 3600 for p in prof]
        ax.plot(hours, [p["in_ee"] for p in prof], "tab:blue", linestyle=style, label=f"in the EE: {name}")
        ax.plot(hours, [p["jobs"] for p in prof], "tab:red", linestyle=style, label=f"running jobs: {name}")
    ax.set_xlabel("hours since the window opened (20:00)")
    ax.set_ylabel("desktops")
    ax.legend(fontsize=7, loc="center left")
    ax.set_title("A simulated night of 500 desktops (slim simulate night)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
