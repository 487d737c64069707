"""A namespace cluster on one machine: `slim serve` on a bridge, nodes on veths.

The server namespace runs `slim serve` (core, relay with TFTP, dnsmasq in full
DHCP mode) from one registry file; four node namespaces get their addresses
from that dnsmasq and build their EE with the agent (no-reboot mode) from the
relay; a fifth, unregistered MAC gets no address.  The core holds every node's
boot events.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from labs.netlab import NetLab
from slim.agent.ee import run_dir
from slim.allinone import await_ready
from slim.core.build.release import build_environment
from slim.core.registry import load_registry
from slim.core.store import Store
from slim.signing import SigningKey
from slim.v1 import core_pb2 as pb
from slim.v1 import core_pb2_grpc as pb_grpc
from tests.support import make_image, need_netns

NODES = 4
MAC = "52:54:00:77:01:{:02x}"
REGISTRY = """\
settings: {{heartbeat_interval: 1, nfs_server: 10.77.0.1}}
sites:
  lab:
    prefixes: [10.77.0.0/24]
    dhcp: {{mode: full, range: [10.77.0.100, 10.77.0.199], interface: br0}}
relays:
  r1: {{urls: ["http://10.77.0.1:8080/"], site: lab}}
profiles:
  ns: {{}}
environments:
  base:
    image: {image}
    default_policy: ram
    directories: {{/usr: nfs, /srv: sync, /var: disk}}
nodes:
{nodes}
server:
  core_listen: unix:{tmp}/core.sock
  relay_listen: 10.77.0.1:8080
  tftp_listen: 10.77.0.1:69
  nfs_listen: null
"""


@dataclass
class Cluster:
    lab: NetLab
    tmp: Path
    image: Path
    serve: subprocess.Popen[bytes]
    admin: pb_grpc.AdminStub
    said: list[str]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    need_netns()
    image = tmp_path / "image"
    image.mkdir()
    make_image(image)
    nodes = "\n".join(
        f'  n{i}: {{macs: ["{MAC.format(i)}"], profile: ns, environment: base, site: lab, disk: /dev/sda1}}'
        for i in range(1, NODES + 1)
    )
    registry = tmp_path / "registry.yaml"
    registry.write_text(REGISTRY.format(image=image, nodes=nodes, tmp=tmp_path))
    state = tmp_path / "state"
    signer = SigningKey.load_or_create(state / "keys")  # what `slim serve` will sign with
    build_environment(load_registry(registry), Store(state / "store"), "base", signer=signer)
    with NetLab(tmp_path) as lab:
        for i in range(1, NODES + 1):
            lab.add_node(f"n{i}", MAC.format(i), rate="100mbit" if i == 1 else None)
        lab.add_node("stranger", "52:54:00:77:01:ff")
        serve = lab.popen(
            lab.server, sys.executable, "-m", "slim.cli", "serve", "--registry", str(registry),
            "--state-dir", str(state), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert serve.stdout is not None
        said = await_ready(serve.stdout, state / "logs")  # where each part listens, then "ready"
        with grpc.insecure_channel(f"unix:{tmp_path}/core.sock") as channel:
            yield Cluster(lab, tmp_path, image, serve, pb_grpc.AdminStub(channel), said)
        serve.stdout.close()


def agent(lab: NetLab, node: str, target: Path, state: Path) -> subprocess.CompletedProcess[str]:
    """The agent in ``node``'s namespace, trusting the key of the `slim serve` whose state is ``state``."""
    argv = lab.cmd(
        lab.nodes[node].netns, sys.executable, "-m", "slim.agent", "--no-reboot", "--target", str(target),
        "--node", node, "--relay", f"http://{lab.server_ip}:8080",
        "--trust", str(state / "keys" / "signing.pub"),
    )  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_namespace_cluster_gets_addresses_and_builds_every_node(cluster: Cluster) -> None:
    lab = cluster.lab
    assert any(s.startswith("dhcp answering lab (full on 10.77.0.0/24)") for s in cluster.said), cluster.said
    assert any(s.startswith("relay r1 tftp on 10.77.0.1:69") for s in cluster.said), cluster.said
    names = [f"n{i}" for i in range(1, NODES + 1)]
    with ThreadPoolExecutor(NODES + 1) as pool:
        addresses = dict(zip(names, pool.map(lab.dhcp, names), strict=True))
        stranger = pool.submit(lab.dhcp, "stranger", 2)
        assert stranger.result() is None  # an unknown MAC gets no address
    assert all(a is not None and a.startswith("10.77.0.1") for a in addresses.values()), addresses
    assert len(set(addresses.values())) == NODES
    # n1's link is shaped (both directions) with a token bucket
    for netns, dev in ((lab.nodes["n1"].netns, "eth0"), (lab.server, lab.nodes["n1"].veth)):
        qdisc = subprocess.run(
            lab.cmd(netns, "tc", "qdisc", "show", "dev", dev), capture_output=True, text=True
        )
        assert "tbf" in qdisc.stdout and "rate 100Mbit" in qdisc.stdout, qdisc.stdout
    roots = {n: cluster.tmp / "roots" / n for n in names}
    with ThreadPoolExecutor(NODES) as pool:
        results = dict(
            zip(names, pool.map(lambda n: agent(lab, n, roots[n], cluster.tmp / "state"), names), strict=True)
        )
    for node, proc in results.items():
        assert proc.returncode == 0, (node, proc.stderr[-2000:])
    for node, root in roots.items():
        active = json.loads((run_dir(root, no_reboot=True) / "ee").read_text())
        assert active["node"] == node and active["environment"] == "base"
        for rel in ("etc/hostname", "srv", "var"):
            assert (root / rel).exists(), (node, rel)
        assert (root / "etc" / "hostname").read_bytes() == (cluster.image / "etc" / "hostname").read_bytes()
        events = cluster.admin.ListBootEvents(pb.ListBootEventsRequest(node=node), timeout=10).events
        stages = {e.stage for e in events if e.boot_id == active["boot_id"]}
        assert {"plan", "ram:/", "sync:/srv", "disk:/var", "mount:/usr", "done"} <= stages, (node, stages)
        assert all(e.ok and e.relay == "r1" for e in events)
    # every node fetched from the relay as the address dnsmasq gave it (the core saw the origin)
    nodes = {n.name: n for n in cluster.admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes}
    assert set(nodes) == set(names)
