"""`sbatch --constraint=ee:jdk14` on a real Slurm: slurmctld and three slurmd on this host.

The lab (labs/slurmlab.py) runs munged, slurmctld, ``slurmd -N n1..n3``,
`slim serve` and the files `slim slurm config` renders; reboots are simulated
(slurmd stops, the agent rebuilds the node's root for its next EE, ``slurmd
-b``).  Every node starts on base.
"""

from __future__ import annotations

import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from labs.slurmlab import SlurmLab
from slim.plugin.access import SlurmCli
from slim.v1 import core_pb2 as pb
from slim.v1 import core_pb2_grpc as pb_grpc
from tests.support import need, need_tool


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[SlurmLab]:
    need(os.geteuid() == 0, "slurmd and munged run as root here")
    for tool in ("slurmctld", "slurmd", "sbatch"):
        need_tool(tool, "slurm-wlm")
    need_tool("munged", "munge")
    with SlurmLab(tmp_path) as lab:
        yield lab.start()


def relay_counters(lab: SlurmLab) -> dict[str, float]:
    with urllib.request.urlopen(f"{lab.relay}/metrics", timeout=10) as r:  # noqa: S310 - our relay
        text = r.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def boot_ids(lab: SlurmLab) -> dict[str, tuple[str, str, str]]:
    """Node -> (boot id, environment, state) of its most recent boot, from the core."""
    with grpc.insecure_channel(lab.core) as channel:
        nodes = pb_grpc.AdminStub(channel).ListNodes(pb.ListNodesRequest(), timeout=10).nodes
    return {n.name: (n.boot.boot_id, n.boot.environment, n.boot.state) for n in nodes}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sbatch_constraint_reboots_nodes_into_the_environment(lab: SlurmLab) -> None:
    # an environment nobody has is refused at submit, naming the known ones
    refused = lab.slurm("sbatch", "--constraint=ee:nosuch", "--wrap", "true", check=False)
    assert refused.returncode != 0
    assert (
        "unknown execution environment 'ee:nosuch' (known: ee:base, ee:jdk14, ee:jdk15, ee:jdk16)"
        in refused.stderr
    )

    before = relay_counters(lab)
    booted = boot_ids(lab)
    assert {b[1:] for b in booted.values()} == {("base", "up")}
    roots = lab.roots
    script = f"srun sh -c 'echo $SLURMD_NODENAME $(cat {roots}/$SLURMD_NODENAME/opt/jdk14/release)'"
    job = lab.sbatch("-N2", "--constraint=ee:jdk14", "--wrap", script)
    info = lab.wait_job(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300)
    assert info["JobState"] == "COMPLETED", info
    out = (lab.tmp / f"job-{job}.out").read_text()
    ran = sorted(re.findall(r"^(n\d) JAVA_VERSION=\"14.0.2\"$", out, re.M))
    assert len(ran) == 2, out  # both nodes ran the job step on jdk14's root
    after = boot_ids(lab)
    for node in ran:
        assert after[node][1:] == ("jdk14", "up") and after[node][0] != booted[node][0]
    nodes = lab.nodes()
    assert all(nodes[n][1] == "ee=jdk14" for n in ran) and nodes["n3"][1] == "ee=base"
    # the objects were warm before the nodes asked: fetched from upstream once each (by the
    # prefetch), and not one node request had to wait for an upstream fetch
    counters = relay_counters(lab)
    assert counters["slim_relay_upstream_fetches_total"] > before["slim_relay_upstream_fetches_total"]
    assert counters["slim_relay_object_misses_total"] == before["slim_relay_object_misses_total"]
    assert counters["slim_relay_object_hits_total"] > before["slim_relay_object_hits_total"]
    assert "relay r1: warm" in lab.prolog_log.read_text()

    # the same constraint again: the nodes run jdk14 already, nothing reboots
    again = lab.sbatch("-N2", "--constraint=ee:jdk14", "--wrap", script)
    assert lab.wait_job(again, ("COMPLETED", "FAILED", "CANCELLED"), 120)["JobState"] == "COMPLETED"
    assert boot_ids(lab) == after

    # a boot that fails: the node goes DOWN with the reason, the job is requeued, not run
    broken = lab.sbatch("-N1", "-w", "n3", "--constraint=ee:jdk15", "--wrap", "true")
    lab.wait_nodes(lambda nodes: nodes["n3"][0].startswith("down"), 240)
    slurm = SlurmCli(lab.env)  # the access layer's CLI backend, on the real cluster
    n3 = slurm.nodes()["n3"]
    assert n3.state.startswith("down") and n3.reason.startswith("slim: boot into jdk15 failed at ram:/"), n3
    queued = slurm.job(broken)
    assert queued is not None and queued.state == "PENDING" and queued.restarts >= 1, queued
    assert slurm.hostnames("n[1-3]") == ["n1", "n2", "n3"]

    # an environment whose init dies right after switch_root never reports up: once its
    # up_timeout (5 s) has passed the core fails the boot, and the prolog treats that as
    # a failed boot: the node DOWN with the core's reason, the job requeued
    crashed = lab.sbatch("-N1", "-w", "n2", "--constraint=ee:jdk16", "--wrap", "true")
    lab.wait_nodes(lambda nodes: nodes["n2"][0].startswith("down"), 240)
    assert boot_ids(lab)["n2"][1:] == ("jdk16", "failed")
    n2 = slurm.nodes()["n2"]
    assert (
        n2.reason
        == "slim: boot into jdk16 failed at up: no report from the environment 5 s after switch_root"
    )
    requeued = slurm.job(crashed)
    assert requeued is not None and requeued.state == "PENDING" and requeued.restarts >= 1, requeued
    assert not (lab.tmp / f"job-{broken}.out").exists() or (lab.tmp / f"job-{broken}.out").read_text() == ""
