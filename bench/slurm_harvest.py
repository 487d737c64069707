"""A window's start on the real-Slurm lab's desktop pool: to the first job running, to all of
the pool up (issue 18).

    ./run bench harvest        # = PYTHONPATH=. .venv/bin/python bench/slurm_harvest.py (as root)

The lab (labs/harvestlab.py): Debian's Slurm 22.05 (slurmctld, one slurmd per desktop), `slim
serve`, `slim slurm harvest` on the "controller", three desktops d1..d3 with simulated power
(the relay's real magic packets go to a listener that boots the desktop: the agent builds its
root for the pool's EE, then slurmd starts).  Three one-node jobs (`-t 1`) are queued before
the window opens (they wait: the blackout reservation).  From the window's start on the wall
clock: when Slurm started the first job (its StartTime), when all three had started, and when
the core saw each desktop up in the EE.  No firmware or kernel here (simulated power): the real
desktop's boot is bench/desktop_night.py's 31 s.  Results: docs/benchmarks/slurm_harvest.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from labs.harvestlab import DESKTOPS, PARTITION, HarvestLab

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks" / "slurm_harvest.json"


def _start_time(lab: HarvestLab, job: str) -> float | None:
    info = lab.job(job)
    if info.get("JobState") not in ("RUNNING", "COMPLETING", "COMPLETED"):
        return None
    local = dt.datetime.strptime(info["StartTime"], "%Y-%m-%dT%H:%M:%S")  # scontrol: its local time
    return local.astimezone().timestamp()


def run(tmp: Path) -> dict[str, object]:
    lab = HarvestLab(tmp)
    try:
        lab.start()
        jobs = [lab.sbatch("-p", PARTITION, "-N1", "-t", "1", "--wrap", "sleep 5") for _ in DESKTOPS]
        opened = lab.window_start.timestamp()
        lab.wait("the window's start", lambda: time.time() >= opened, opened - time.time() + 5, 0.2)
        up: dict[str, float] = {}
        started: dict[str, float] = {}
        deadline = time.time() + 150
        while time.time() < deadline and (len(up) < len(DESKTOPS) or len(started) < len(jobs)):
            for d, (state, _) in lab.harvest_status().items():
                if state in ("idle", "job") and d not in up:
                    up[d] = time.time() - opened
            for j in jobs:
                if j not in started and (at := _start_time(lab, j)) is not None:
                    started[j] = at - opened
            time.sleep(0.2)  # polling the lab's state, bounded by the deadline
        if len(started) < len(jobs) or len(up) < len(DESKTOPS):
            raise RuntimeError(f"not all up or started: up {up}, started {started}\n{lab.describe()}")
    finally:
        lab.close()
    return {
        "first_job_running_s": round(min(started.values()), 1),
        "all_jobs_running_s": round(max(started.values()), 1),
        "first_desktop_up_s": round(min(up.values()), 1),
        "all_desktops_up_s": round(max(up.values()), 1),
        "up_s": {d: round(t, 1) for d, t in sorted(up.items())},
        "note": "seconds from the window's start (wall clock); job start times have 1 s resolution; "
        "'up' is when this poll (every 0.2 s) first saw the core say idle or job",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/slurm_harvest.py needs root (Slurm's daemons)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="slim-harvest-") as tmp:
        result = run(Path(tmp))
    print(
        "window start -> first job running {first_job_running_s} s, all three {all_jobs_running_s} s; "
        "desktops up {first_desktop_up_s} to {all_desktops_up_s} s".format(**result)
    )
    doc = {
        "benchmark": "slurm_harvest",
        "command": "./run bench harvest",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count()},
        "window_start": result,
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
