"""A boot's timeline (slim.timeline): built from boot events, printed, drawn; and
`slim node timeline` / `slim node list` against a real `slim core serve` process."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slim import timeline
from slim.errors import FailedPrecondition, InvalidArgument
from slim.rpc import CoreClient
from slim.v1 import core_pb2 as pb
from tests.support import Served, from_nodes, relay_credentials

T0 = 1_800_000_000.0  # power-on, epoch seconds
PNG = b"\x89PNG\r\n\x1a\n"
BEHALF = "reported by labs.slurmlab on the environment's behalf: no environment runs in no-reboot mode"
NO_REPORT = "no report from the environment 300 s after switch_root"


def ev(
    stage: str,
    end: float,
    duration: float = 0.0,
    *,
    ok: bool = True,
    relay: str = "",
    nbytes: int = 0,
    message: str = "",
    boot: str = "b1",
    at: float = T0,
) -> pb.BootEvent:
    """An event of boot ``boot`` ending ``end`` seconds after ``at``."""
    e = pb.BootEvent(
        node="n1",
        boot_id=boot,
        stage=stage,
        relay=relay,
        bytes=nbytes,
        ok=ok,
        message=message,
        environment="base",
        duration=duration,
    )
    e.time.FromNanoseconds(round((at + end) * 1e9))
    return e


def a_boot(up_message: str = "systemd reached multi-user.target", at: float = T0) -> list[pb.BootEvent]:
    """A whole boot: relays' stage 1, script, kernel, initrd; the agent; the environment's up."""
    return [
        ev(
            "tftp:ipxe.efi",
            0.5,
            0.5,
            relay="r1",
            nbytes=1_024_000,
            message="joined by address and time",
            at=at,
        ),
        ev("script", 1.0, 0.1, relay="r1", nbytes=900, at=at),
        ev("kernel", 3.0, 1.8, relay="r1", nbytes=12_000_000, at=at),
        ev("initrd", 5.0, 4.2, relay="r2", nbytes=30_000_000, at=at),  # starts before the kernel
        ev("plan", 5.5, relay="r1", at=at),
        ev("ram:/", 8.0, 2.4, relay="r1", nbytes=80_000_000, at=at),
        ev("mount:/usr", 8.1, 0.05, relay="r1", at=at),
        ev("done", 8.2, relay="r1", at=at),
        ev("switch_root", 8.3, relay="r1", message="/sbin/init: the environment reports up itself", at=at),
        ev("up", 20.0, relay="r1", message=up_message, at=at),
    ]


def test_build_orders_by_start_counts_from_power_on_and_names_sources() -> None:
    events = a_boot()
    shuffled = events[:]
    random.Random(3).shuffle(shuffled)
    t = timeline.build("n1", shuffled)
    assert [s.stage for s in t.stages] == [
        "tftp:ipxe.efi", "initrd", "script", "kernel", "plan",
        "ram:/", "mount:/usr", "done", "switch_root", "up",
    ]  # fmt: skip
    assert t.power_on == pytest.approx(T0)  # the first request's start: time - duration
    assert t.stages[0].start == pytest.approx(0.0) and t.stages[0].end == pytest.approx(0.5)
    initrd = t.stages[1]
    assert initrd.start == pytest.approx(0.8) and initrd.end == pytest.approx(5.0)
    assert initrd.duration == pytest.approx(4.2) and initrd.bytes == 30_000_000
    assert t.total == pytest.approx(20.0)
    assert (t.node, t.boot_id, t.environment, t.state) == ("n1", "b1", "base", "up")
    labels = {s.stage: s.label for s in t.stages}
    assert labels["tftp:ipxe.efi"] == "stage 1 over TFTP: ipxe.efi" and labels["script"] == "boot script"
    sources = {s.stage: s.source for s in t.stages}
    assert sources["tftp:ipxe.efi"] == sources["script"] == sources["kernel"] == "relay r1"
    assert sources["initrd"] == "relay r2"
    assert sources["plan"] == sources["ram:/"] == sources["switch_root"] == "agent"  # forwarded by r1
    assert sources["up"] == "environment"


def test_instants_with_one_start_keep_the_order_they_ended_in() -> None:
    t = timeline.build(
        "n1", [ev("done", 2.0), ev("plan", 1.0), ev("switch_root", 2.0, 0.0), ev("ram:/", 2.0, 1.0)]
    )
    assert [s.stage for s in t.stages] == ["plan", "ram:/", "done", "switch_root"]
    assert t.state == "starting" and t.total == pytest.approx(1.0)  # no up: to the latest end


def test_a_lab_reporting_on_the_environments_behalf_says_so() -> None:
    events = a_boot(BEHALF)
    events[-2] = ev("switch_root", 8.3, relay="r1", message=BEHALF)
    t = timeline.build("n1", events)
    sources = {s.stage: s.source for s in t.stages}
    assert sources["up"] == sources["switch_root"] == "labs.slurmlab for the environment"


def test_render_is_a_table_and_says_how_long_power_on_to_up_took() -> None:
    lines = timeline.render(timeline.build("n1", a_boot()))
    assert lines[0] == "n1: boot b1 of base: up"
    assert lines[1].split() == ["start", "s", "took", "s", "stage", "MB", "source"]
    assert len(lines) == 2 + 10 + 1
    kernel = next(line for line in lines if " kernel " in line)
    assert re.search(r"^\s*1\.20\s+1\.80\s+kernel\s+12\.00\s+relay r1$", kernel), kernel
    tftp = next(line for line in lines if "stage 1 over TFTP: ipxe.efi" in line)
    assert re.search(r"^\s*0\.00\s+0\.50\s+stage 1 over TFTP: ipxe\.efi\s+1\.02\s+relay r1$", tftp), tftp
    plan = next(line for line in lines if " plan " in line)
    assert re.search(r"^\s*5\.50\s+-\s+plan\s+-\s+agent$", plan), plan
    assert lines[-1] == "power-on (first request) to up: 20.0 s"


def test_a_failed_stage_is_the_failure() -> None:
    events = [
        *a_boot()[:6],
        ev("disk:/var", 9.5, 1.0, ok=False, relay="r1", message="node has no disk /dev/vdb"),
    ]
    t = timeline.build("n1", events)
    assert (t.state, t.failed_at, t.reason) == ("failed", "disk:/var", "node has no disk /dev/vdb")
    lines = timeline.render(t)
    assert any("disk:/var FAILED: node has no disk /dev/vdb" in line for line in lines)
    assert lines[-1] == (
        "power-on (first request) to the failure at disk:/var: 9.5 s (failed: node has no disk /dev/vdb)"
    )
    assert t.total == pytest.approx(9.5)


def test_the_cores_status_gives_the_state_of_its_boot_only() -> None:
    """The core fails a boot whose environment never reported: no event says so."""
    events = a_boot()[:-1]
    status = pb.BootStatus(boot_id="b1", environment="base", state="failed", stage="up", message=NO_REPORT)
    t = timeline.build("n1", events, status)
    assert (t.state, t.failed_at, t.reason) == ("failed", "up", NO_REPORT)
    assert timeline.render(t)[-1] == (
        f"power-on (first request) to the latest stage, switch_root: 8.3 s (failed at up: {NO_REPORT})"
    )
    other = pb.BootStatus(boot_id="b2", environment="base", state="up", stage="up")
    t = timeline.build("n1", events, other)  # the node's latest boot is another one
    assert t.state == "starting" and t.failed_at == ""
    assert (
        timeline.render(t)[-1]
        == "power-on (first request) to the latest stage, switch_root: 8.3 s (starting)"
    )


def test_build_refuses_no_events_and_events_of_two_boots() -> None:
    with pytest.raises(FailedPrecondition, match="no boot recorded for node n1 yet"):
        timeline.build("n1", [])
    with pytest.raises(InvalidArgument, match="events of 2 boots"):
        timeline.build("n1", [ev("plan", 1.0), ev("plan", 2.0, boot="b2")])


def test_to_json() -> None:
    t = timeline.build("n1", a_boot())
    doc = json.loads(json.dumps(t.to_json()))
    assert (
        doc["state"] == "up" and doc["total"] == pytest.approx(20.0) and doc["power_on"] == pytest.approx(T0)
    )
    assert doc["stages"][0] == {
        "stage": "tftp:ipxe.efi",
        "label": "stage 1 over TFTP: ipxe.efi",
        "start": pytest.approx(0.0),
        "end": pytest.approx(0.5),
        "bytes": 1_024_000,
        "ok": True,
        "source": "relay r1",
        "message": "joined by address and time",
    }


def test_plot_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "boot.png"
    timeline.plot(timeline.build("n1", a_boot()), out)
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["boot.png"]  # no temporary file left
    failed = [*a_boot()[:6], ev("disk:/var", 9.5, 1.0, ok=False, message="no disk")]
    timeline.plot(timeline.build("n1", failed), out)
    assert out.read_bytes().startswith(PNG)


def test_plot_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = timeline.build("n1", a_boot())
    with pytest.raises(InvalidArgument, match=r"name it FILE\.png, not boot\.pdf"):
        timeline.plot(t, tmp_path / "boot.pdf")
    with pytest.raises(FailedPrecondition, match=r"cannot write the plot to .*/nodir/boot\.png"):
        timeline.plot(t, tmp_path / "nodir" / "boot.png")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were missing
    with pytest.raises(FailedPrecondition, match=r"pip install 'slim\[plot\]'"):
        timeline.plot(t, tmp_path / "boot.png")


# -- the CLI against a real core ---------------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "slim.cli", "node", *args], capture_output=True, text=True, timeout=60
    )


def test_node_timeline_list_and_show_against_a_core(served: Served, tmp_path: Path) -> None:
    now = time.time()
    old = [ev("plan", 1.0, boot="b0", at=now - 100), ev("ram:/", 3.0, 2.0, boot="b0", at=now - 100)]
    failing = [  # no time: the core stamps them
        pb.BootEvent(
            node="n2", boot_id="c1", stage="script", relay="r1", ok=True, environment="base", duration=0.2
        ),
        pb.BootEvent(
            node="n2", boot_id="c1", stage="disk:/var", ok=False, message="no disk", environment="base"
        ),
    ]
    with CoreClient(served.address, credentials=relay_credentials("r1")) as client:  # relay r1's events
        accepted = client.core.ReportBootEvents(
            iter(from_nodes([*old, *a_boot(at=now - 30), *failing])), timeout=10
        )
    assert accepted.accepted == len(old) + 10 + 2
    core = ("--core", served.address)

    run = cli("timeline", "n1", *core)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "n1: boot b1 of base: up"
    assert any(re.search(r"^\s*1\.20\s+1\.80\s+kernel\s+12\.00\s+relay r1$", line) for line in lines), lines
    assert any("ram:/" in line and "agent" in line for line in lines)
    assert lines[-1] == "power-on (first request) to up: 20.0 s"

    png = tmp_path / "n1.png"
    run = cli("timeline", "52:54:00:00:00:01", "--plot", str(png), *core)  # by MAC
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == f"wrote {png}"
    data = png.read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000

    run = cli("timeline", "n1", "--boot", "b0", "--json", *core)  # an earlier boot
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert (doc["boot_id"], doc["state"], [s["stage"] for s in doc["stages"]]) == (
        "b0",
        "booting",
        ["plan", "ram:/"],
    )

    for args, error in (
        (("ghost",), "error: unknown node 'ghost' (NOT_FOUND)"),
        (("n3",), "error: no boot recorded for node n3 yet"),
        (("n1", "--boot", "nosuch"), "error: node n1 has no boot nosuch"),
        (("n1", "--plot", str(tmp_path / "nodir" / "x.png")), "error: cannot write the plot to"),
    ):
        run = cli("timeline", *args, *core)
        assert run.returncode == 1 and error in run.stderr, (args, run.stderr)

    run = cli("list", *core)
    assert run.returncode == 0, run.stderr
    n1 = next(line for line in run.stdout.splitlines() if line.lstrip("│ ").startswith("n1"))
    assert re.search(r"base: up \d+ s ago", n1), run.stdout
    assert re.search(r"failed \d+ s ago at disk:/var: no disk", run.stdout), run.stdout
    run = cli("list", "--json", *core)
    nodes = {n["name"]: n for n in json.loads(run.stdout)["nodes"]}
    assert nodes["n1"]["boot"]["state"] == "up"
    assert nodes["n1"]["boot"]["since_epoch"] == pytest.approx(time.time(), abs=60)
    run = cli("show", "n2", *core)
    assert run.returncode == 0 and re.search(r"base: failed \d+ s ago at disk:/var: no disk", run.stdout)
    run = cli("events", "n1", *core)
    assert run.returncode == 0 and re.search(r"kernel\s+│\s+1\.80 s", run.stdout), run.stdout
