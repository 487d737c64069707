"""The boot-storm lab (labs.stormlab) the P1/P2 benchmarks run: real `slim serve`, shaped
node namespaces, the core's per-node timelines, and the calibration the simulator reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from labs.stormlab import POLICIES, StormLab, solo, table2_image
from slim.agent.ee import run_dir
from slim.simulate import Topology, simulate
from tests.support import need_netns


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_small_storm_full_copy_then_copy_if_needed(tmp_path: Path) -> None:
    need_netns()
    image = table2_image(tmp_path, 0.01, cached=False)
    with StormLab(
        tmp_path / "lab", image, POLICIES, nodes=3, node_rate="20mbit", uplink_rate="40mbit", extra_unshaped=1
    ) as lab:
        # the shaping is where the lab says: both ends of each node's link, and the server's uplink
        lab.shape_uplink()
        release = lab.builds["full"].release
        archive = release.directories["/"].archive
        manifest = release.directories["/"].manifest
        assert archive is not None and manifest is not None
        boot_bytes = release.kernel.size + release.initrd.size

        full = lab.storm(lab.node_names, "full", fresh=True)
        for r in full:
            assert r.returncode == 0, r.stderr
            stages = [s["stage"] for s in r.timeline(r.launched)]
            # the core's events, in order, after the boot files
            assert stages == [
                "kernel+initrd",
                "plan",
                "ram:/",
                "mount:/bin",
                "mount:/lib",
                "mount:/sbin",
                "mount:/usr",
                "done",
            ], stages
            ends = [s["end"] for s in r.timeline(r.launched)]
            assert ends == sorted(ends)
            assert r.boot_bytes == boot_bytes
            ram = next(e for e in r.events if e["stage"] == "ram:/")
            assert ram["bytes"] == archive.size
            root = lab.roots / r.node
            assert (root / "etc").is_dir() and (run_dir(root, no_reboot=True) / "ee").is_file()
            assert not any((root / "usr").iterdir())  # NFS: only the mount point
            # what crossed the node's shaped link: at least the payload, with headers on top
            assert lab.wire_bytes(r.node) >= boot_bytes + archive.size

        before = {r.node: lab.wire_bytes(r.node) for r in full}
        cin = lab.storm(lab.node_names, "cin", fresh=False)
        for r in cin:
            assert r.returncode == 0, r.stderr
            sync = next(e for e in r.events if e["stage"] == "sync:/")
            assert sync["bytes"] == manifest.size  # nothing changed: the manifest, and no file
            sent = lab.wire_bytes(r.node) - before[r.node]
            assert boot_bytes + manifest.size <= sent < boot_bytes + archive.size

        # the calibration the simulator reads: one node alone, unshaped
        work = solo(lab, "u1", 1)
        full_w, cin_w = work["full"], work["cin"]
        assert full_w.boot_bytes == boot_bytes
        assert [d.policy for d in full_w.directories] == ["ram", "nfs", "nfs", "nfs", "nfs"]
        assert full_w.directories[0].archive_bytes == archive.size and full_w.directories[0].cpu > 0
        assert cin_w.directories[0].policy == "sync" and cin_w.directories[0].manifest_bytes == manifest.size
        assert full_w.start_cpu > 0
        prediction = simulate(Topology(nodes=3, per_switch=3, node_link=20e6, server_link=40e6), full_w)
        assert prediction.makespan > 0
    assert not lab.roots.is_mount()  # the tmpfs is gone with the lab
