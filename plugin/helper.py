"""The node_features/helpers helper: what slurmd asks about a node's EE.

slurmd runs it as root (docs/slurm.md, "Slurm 22.05 as measured here"):

* with no arguments, at every start and registration: print the node's active
  features, one per line.  We print the node's EE feature (``ee=jdk14``) only
  once the core confirms that the node's most recent boot into it is up (the
  running EE itself reported in): a node is never handed to a job needing an
  EE it does not run yet.  A boot still going on (booting, or starting: its
  init runs but has not reported) or a failed one prints nothing (the reason
  goes to standard error, which slurmd logs).
* with one argument (``ee=jdk14``): ask the core to make that EE the node's
  next boot, and have the relays that serve the node prefetch it, waiting
  (bounded) until they are warm; Slurm then runs the RebootProgram, and the
  node's boot finds every object cached.  An unknown EE or an unreachable core
  exits non-zero with a message.

The node is ``--node``, else ``$SLIM_NODE``, else the ``-N`` name of the slurmd
that started us (several slurmd on one host), else the short host name.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from slim.plugin.config import slurm_feature
from slim.rpc import CoreClient
from slim.v1 import core_pb2 as pb


def slurmd_node_name(pid: int) -> str | None:
    """The ``-N NAME`` (or ``-NNAME``) of process ``pid`` if it is a slurmd started so."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return None
    if not argv or not argv[0].endswith("slurmd"):
        return None
    for i, arg in enumerate(argv):
        if arg == "-N" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("-N") and len(arg) > 2:
            return arg[2:]
    return None


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[1]) if len(fields) > 1 else None


def slurmd_ancestor(depth: int = 6) -> tuple[int, str] | None:
    """(pid, node name) of the ``slurmd -N NAME`` that started us, directly or through a
    shell or two (slurmd runs RebootProgram through ``sh -c``)."""
    pid: int | None = os.getppid()
    for _ in range(depth):
        if pid is None or pid <= 1:
            return None
        name = slurmd_node_name(pid)
        if name is not None:
            return pid, name
        pid = parent_of(pid)
    return None


def node_name(explicit: str | None = None) -> str:
    ancestor = slurmd_ancestor()
    return (
        explicit
        or os.environ.get("SLIM_NODE")
        or (ancestor[1] if ancestor else None)
        or socket.gethostname().split(".", 1)[0]
    )


def active_features(client: CoreClient, node: str) -> tuple[list[str], str]:
    """(features to print, a note for the log): the EE's feature only if the node's most
    recent boot into it is up."""
    info = client.call(client.admin.GetNode, pb.GetNodeRequest(node=pb.NodeRef(name=node)))
    if not info.HasField("boot"):
        return [], f"slim: {node} has not booted an EE through SLIM yet"
    b = info.boot
    if b.state == "failed":
        return [], f"slim: {node}'s boot into {b.environment} failed at {b.stage}: {b.message}"
    if b.state == "starting":
        return [], f"slim: {node} is starting {b.environment}: its init runs, it has not reported up"
    if b.state != "up" or not b.environment:
        return [], f"slim: {node} is still booting {b.environment} (at {b.stage})"
    env = client.call(client.admin.GetEnvironment, pb.GetEnvironmentRequest(name=b.environment))
    return [slurm_feature(env.feature)], ""


def stage_next_boot(client: CoreClient, node: str, feature: str) -> str:
    """Make the EE of ``feature`` (``ee=jdk14``, ``ee:jdk14`` or a name) the node's next boot;
    returns the environment's name."""
    info = client.call(client.admin.SetNextBoot, pb.SetNextBootRequest(node=node, environment=feature))
    return info.next_environment


def warm_relays(client: CoreClient, node: str, env: str, timeout: float) -> list[str]:
    """Have the relays that serve ``node`` prefetch ``env`` and wait until they are done;
    one line per relay ("r1: warm, 23 objects, 4 fetched" or "r1: failed: ...")."""
    request = pb.PrefetchRequest(environment=env, nodes=[node], requested_by=f"slurm helper on {node}")
    out = []
    for p in client.stream(client.admin.Prefetch, request, timeout):
        s = p.status
        if s.done:
            what = (
                f"failed: {s.error}"
                if s.error
                else f"warm, {s.objects_done} objects, {s.bytes_fetched} B fetched"
            )
            out.append(f"{p.relay}: {what}")
    return out
