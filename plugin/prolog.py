"""PrologSlurmctld: at allocation, warm the relays and hold the job until its nodes run the EE.

slurmctld runs it when a job is allocated, with ``SLURM_JOB_ID``,
``SLURM_JOB_CONSTRAINTS`` and ``SLURM_JOB_NODELIST`` (and no PATH or
SLURM_CONF: the wrapper script sets both).  If the job asks for an
environment (``ee=jdk14`` after job_submit.lua):

1. it asks the core to have the relays that serve the job's nodes prefetch the
   environment's objects, so that they are warm before the rebooting nodes ask
   (the reboots and this run at the same time);
2. it waits until every node's boot into the environment completed (a node
   already running it counts at once);
3. a node whose boot failed is set DOWN with a reason naming the stage and the
   error, and the prolog exits non-zero: Slurm requeues the job instead of
   starting it on a half-built node.

Each step is logged to standard error (and ``--log``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from slim.plugin.access import Slurm, backend
from slim.plugin.config import slurm_feature
from slim.rpc import CoreClient, credentials_from_environment
from slim.v1 import core_pb2 as pb

_TOKEN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*=[A-Za-z0-9_.]+")


@dataclass(frozen=True)
class Outcome:
    environment: str | None
    nodes: list[str]
    failed: dict[str, str]  # node -> reason it was set down with
    prefetch: dict[str, str]  # relay -> "warm (...)" or the error


def job_environment(constraints: str, features: dict[str, str]) -> str | None:
    """The environment a job's constraints ask for (``features``: Slurm feature -> name)."""
    asked = [features[t] for t in _TOKEN_RE.findall(constraints or "") if t in features]
    return asked[0] if asked else None


def prefetch(client: CoreClient, env: str, nodes: list[str], job: str, timeout: float) -> dict[str, str]:
    """Order the prefetch and follow it to the end; relay -> what became of it."""
    request = pb.PrefetchRequest(environment=env, nodes=nodes, requested_by=f"slurm job {job}")
    final: dict[str, str] = {}
    for p in client.stream(client.admin.Prefetch, request, timeout):
        s = p.status
        if s.done:
            final[p.relay] = f"failed: {s.error}" if s.error else (
                f"warm ({s.objects_done} objects, {s.bytes_done} bytes, {s.bytes_fetched} fetched)"
            )  # fmt: skip
    return final


def wait_for_boots(
    client: CoreClient,
    env: str,
    nodes: list[str],
    timeout: float,
    say: Callable[[str], None],
    poll: float = 0.5,
) -> dict[str, str]:
    """Until each node runs ``env`` (its boot into it is up) or its boot into it failed;
    node -> failure reason for those that failed (or did not finish within ``timeout``)."""

    def boot(node: str) -> pb.BootStatus | None:
        info = client.call(client.admin.GetNode, pb.GetNodeRequest(node=pb.NodeRef(name=node)))
        return info.boot if info.HasField("boot") else None

    # a node already up in env is ready; any other waits for a boot newer than the one now
    before = {n: boot(n) for n in nodes}
    waiting = {n for n, b in before.items() if not (b and b.environment == env and b.state == "up")}
    failed: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        time.sleep(poll)
        for node in sorted(waiting):
            b = boot(node)
            old = before[node]
            if b is None or (old is not None and b.boot_id == old.boot_id) or b.environment != env:
                continue
            if b.state == "up":
                say(f"{node} runs {env} (boot {b.boot_id})")
                waiting.discard(node)
            elif b.state == "failed":
                failed[node] = f"slim: boot into {env} failed at {b.stage}: {b.message}"
                waiting.discard(node)
    for node in waiting:
        failed[node] = f"slim: {node} did not finish booting {env} within {timeout:g}s"
    return failed


def run(
    core: str,
    job: str,
    constraints: str,
    nodelist: str,
    say: Callable[[str], None],
    slurm: Slurm | None = None,
    prefetch_timeout: float = 600.0,
    boot_timeout: float = 900.0,
) -> Outcome:
    with CoreClient(core, credentials=credentials_from_environment(core)) as client:
        envs = client.call(client.admin.ListEnvironments, pb.ListEnvironmentsRequest()).environments
        env = job_environment(constraints, {slurm_feature(e.feature): e.name for e in envs})
        if env is None:
            say(f"job {job}: no execution environment asked for ({constraints or 'no constraints'})")
            return Outcome(None, [], {}, {})
        slurm = slurm or backend()
        nodes = slurm.hostnames(nodelist)
        say(f"job {job}: {env} on {', '.join(nodes)}; prefetching on their relays")
        warmed = prefetch(client, env, nodes, job, prefetch_timeout)
        for relay, what in sorted(warmed.items()):
            say(f"job {job}: relay {relay}: {what}")
        failed = wait_for_boots(client, env, nodes, boot_timeout, lambda m: say(f"job {job}: {m}"))
    for node, reason in sorted(failed.items()):
        say(f"job {job}: {node} DOWN: {reason}")
        slurm.set_down(node, reason)
    return Outcome(env, nodes, failed, warmed)
