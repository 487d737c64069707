"""The lab path for ``up``: a simulated node reports on its environment's behalf.

A boot is ``up`` only when the running environment reports in (slim.agent.report_up).  In
the agent's no-reboot mode — the Slurm lab's simulated reboots, the storm lab, tests — the
agent builds the environment under a directory and no environment runs, so nothing would
ever report.  A lab calls :func:`report` once what stands in for the environment has
started (the Slurm lab: slurmd on the new root), and both events say who sent them.

A lab image holding ``CRASH_MARKER`` stands for an environment whose init dies right after
switch_root: only ``switch_root`` is reported, never ``up`` (the core then fails the boot
once the environment's ``up_timeout`` has passed).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from slim.agent.ee import run_dir

CRASH_MARKER = Path("etc/slim-lab/crash-after-switch-root")
TRIES = 5


def report(relay: str, target: Path, lab: str) -> str:
    """Report ``switch_root`` and (unless the image says it crashes) ``up`` for the boot the
    agent just made under ``target``; the stage reported last."""
    active = json.loads((run_dir(target, no_reboot=True) / "ee").read_text())
    said = f"reported by {lab} on the environment's behalf: no environment runs in no-reboot mode"
    events = [{"stage": "switch_root", "message": said}]
    crashes = (target / CRASH_MARKER).exists()
    if not crashes:
        events.append({"stage": "up", "message": said})
    body = {
        "events": [
            {**e, "boot_id": active["boot_id"], "environment": active["environment"], "time": time.time()}
            for e in events
        ]
    }
    post(relay, active["node"], body)
    return events[-1]["stage"]


def post(relay: str, node: str, body: object) -> None:
    data = json.dumps(body).encode()
    last: Exception | None = None
    for attempt in range(TRIES):  # bounded: a relay that sheds load says so with 503
        request = urllib.request.Request(  # noqa: S310 - the lab's own relay
            f"{relay.rstrip('/')}/v1/nodes/{node}/events",
            data=data,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
                resp.read()
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # the relay (or core) refuses it: asking again changes nothing
                raise RuntimeError(
                    f"{relay} refused the report for {node}: {exc.code} {exc.read()[:200]!r}"
                ) from None
            last = exc
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"{relay} took no report for {node}: {last}")
