"""Slurm: from `sbatch --constraint=ee:NAME` to the job's start, with and without a reboot.

    PYTHONPATH=. .venv/bin/python bench/slurm_submit.py [--repeat 3] [--out docs/benchmarks]

The lab of tests/test_slurm_cluster.py (labs/slurmlab.py): slurmctld and three
``slurmd -N`` on this host, `slim serve`, the files `slim slurm config` renders,
simulated reboots (slurmd stops, the agent rebuilds the node's root for the next
EE, ``slurmd -b``).  Each round submits a 2-node job for the EE the nodes do not
run (they reboot), then the same again (they do not).  The figures are Slurm's
own SubmitTime and StartTime (whole seconds) and, host-side, sbatch to the
job's end.  Results go to docs/benchmarks/slurm_submit.json.  Needs root,
slurm-wlm and munge (``./run setup`` installs them).  A benchmark, not a test.
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
from datetime import datetime
from pathlib import Path
from typing import Any

from labs.slurmlab import SlurmLab

ROOT = Path(__file__).resolve().parent.parent


def one(lab: SlurmLab, env: str) -> dict[str, Any]:
    started = time.monotonic()
    job = lab.sbatch("-N2", f"--constraint=ee:{env}", "--wrap", "srun true")
    info = lab.wait_job(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 600)
    wall = time.monotonic() - started
    if info["JobState"] != "COMPLETED":
        raise SystemExit(f"job {job} ended {info['JobState']}: {info}")
    submit, start = (datetime.fromisoformat(info[k]) for k in ("SubmitTime", "StartTime"))
    return {"job": job, "environment": env, "submit_to_start_s": (start - submit).total_seconds(),
            "sbatch_to_end_s": round(wall, 2)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="slim-bench-slurm-"))
    reboot, warm = [], []
    try:
        with SlurmLab(tmp) as lab:
            lab.start()
            for i in range(args.repeat):
                env = "jdk14" if i % 2 == 0 else "base"  # the nodes run the other one: they reboot
                reboot.append(one(lab, env))
                warm.append(one(lab, env))
                print(f"round {i + 1}: with reboot {reboot[-1]['submit_to_start_s']} s, "
                      f"without {warm[-1]['submit_to_start_s']} s", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
        return {k: statistics.median(r[k] for r in runs) for k in ("submit_to_start_s", "sbatch_to_end_s")}

    result = {
        "benchmark": "Slurm submit to start",
        "command": "python bench/slurm_submit.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "with_reboot": {"medians": medians(reboot), "runs": reboot},
        "without_reboot": {"medians": medians(warm), "runs": warm},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "slurm_submit.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k]["medians"] for k in ("with_reboot", "without_reboot")}))  # type: ignore[index]


if __name__ == "__main__":
    main()
