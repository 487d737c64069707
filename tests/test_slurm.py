"""Slurm's side of SLIM (plugin/): the rendered files and the features helper.

The job_submit.lua runs in a real Lua 5.3 interpreter with a stand-in for the
``slurm`` table Slurm gives it; the helper runs as slurmd runs it (a process,
no arguments or one feature) against a real `slim core serve`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from slim.core.registry import load_registry
from slim.plugin.config import render, write
from slim.plugin.helper import slurmd_node_name
from slim.plugin.reboot import expand
from slim.rpc import CoreClient
from slim.v1 import core_pb2 as pb
from tests.support import Served, admin_credentials, from_nodes, need_tool, relay_credentials

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "registry.example.yaml"


def files(tmp: Path) -> Path:
    out = tmp / "etc"
    rendered = render(
        load_registry(EXAMPLE), directory=out, core="127.0.0.1:1", slurm_conf=out / "slurm.conf",
        reboot="ipmitool -H {node}-bmc chassis power cycle", resume_timeout=600,
    )  # fmt: skip
    write(rendered, out)
    return out


def test_helpers_conf_and_slurm_conf_lines(tmp_path: Path) -> None:
    out = files(tmp_path)
    helpers = (out / "helpers.conf").read_text().splitlines()
    for feature in ("ee=base", "ee=desktop", "ee=jdk14"):
        assert f"Feature={feature} Helper={out}/slim-helper" in helpers
    assert "MutuallyExclusive=ee=base,ee=desktop,ee=jdk14" in helpers
    lines = (out / "slurm.conf.slim").read_text().splitlines()
    assert "NodeFeaturesPlugins=node_features/helpers" in lines and "JobSubmitPlugins=lua" in lines
    assert f"RebootProgram={out}/slim-reboot" in lines and "ResumeTimeout=600" in lines
    assert f"PrologSlurmctld={out}/slim-prolog" in lines
    for script in ("slim-helper", "slim-reboot", "slim-prolog"):
        text = (out / script).read_text()
        assert (out / script).stat().st_mode & 0o111 and text.startswith("#!/bin/sh\n")
        assert "SLIM_CORE=127.0.0.1:1" in text and f"SLURM_CONF={out}/slurm.conf" in text and "PATH=" in text
    assert "--command 'ipmitool -H {node}-bmc chassis power cycle'" in (out / "slim-reboot").read_text()
    assert expand("ipmitool -H {node}-bmc", "n 1; x") == "ipmitool -H 'n 1; x'-bmc"
    with pytest.raises(ValueError, match="empty"):
        expand("  ", "n1")


LUA_DRIVER = """
slurm = {SUCCESS = 0, ERROR = -1}
function slurm.log_user(fmt, ...) print("USER: " .. string.format(fmt, ...)) end
dofile(arg[1])
for i = 2, #arg do
  local job = {features = arg[i]}
  local rc = slurm_job_submit(job, nil, 0)
  print(rc, job.features)
end
"""


@pytest.mark.parametrize(
    ("features", "rc", "rewritten"),
    [
        ("ee:jdk14", "0", "ee=jdk14"),
        ("ee:base&ssd", "0", "ee=base&ssd"),
        ("[ee:jdk14|ee:desktop]", "0", "[ee=jdk14|ee=desktop]"),
        ("ee=jdk14", "0", "ee=jdk14"),
        ("gpu", "0", "gpu"),
        ("free:x", "0", "free:x"),  # not one of our prefixes: left alone
        ("ee:nosuch", "-1", "ee:nosuch"),
        ("ssd&ee:jdk14.1", "-1", "ssd&ee:jdk14.1"),
    ],
)
def test_job_submit_lua_rewrites_and_refuses(tmp_path: Path, features: str, rc: str, rewritten: str) -> None:
    lua = need_tool("lua5.3")
    out = files(tmp_path)
    driver = tmp_path / "driver.lua"
    driver.write_text(LUA_DRIVER)
    proc = subprocess.run(
        [lua, str(driver), str(out / "job_submit.lua"), features], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.splitlines()[-1].split("\t")
    assert last[0] == rc and last[1] == rewritten, proc.stdout
    if rc != "0":
        asked = features.split("&")[-1]
        assert (
            f"USER: unknown execution environment '{asked}' (known: ee:base, ee:desktop, ee:jdk14)"
            in proc.stdout
        )


def helper(served: Served, *args: str) -> subprocess.CompletedProcess[str]:
    argv = ["slurm", "helper", "--node", "n1", "--core", served.address, *args]
    return subprocess.run(
        [sys.executable, "-m", "slim.cli", *argv], capture_output=True, text=True, timeout=60, check=False
    )


def report(served: Served, boot: str, stage: str, env: str, ok: bool = True) -> None:
    """One boot event for n1, as a relay passes an agent's on."""
    event = pb.BootEvent(node="n1", boot_id=boot, stage=stage, ok=ok, environment=env)
    event.message = "" if ok else "no space left"
    event.time.GetCurrentTime()
    with CoreClient(served.address, credentials=relay_credentials("room-1")) as client:
        client.call(client.core.ReportBootEvents, iter(from_nodes([event])))


def test_helper_reports_an_ee_only_once_its_boot_completed(served: Served) -> None:
    never = helper(served)
    assert never.returncode == 0 and never.stdout == "" and "has not booted" in never.stderr
    report(served, "b1", "plan", "base")
    booting = helper(served)
    assert booting.stdout == "" and "still booting base" in booting.stderr
    report(served, "b1", "done", "base")
    report(served, "b1", "switch_root", "base")
    starting = helper(served)  # the agent is done: only the environment says it is up
    assert starting.stdout == "" and "starting base" in starting.stderr
    report(served, "b1", "up", "base")
    assert helper(served).stdout == "ee=base\n"
    # staging: the core records the next boot
    staged = helper(served, "ee=jdk14")
    assert staged.returncode == 0 and "n1 boots jdk14 next" in staged.stderr
    with CoreClient(served.address, credentials=admin_credentials()) as client:
        node = client.call(client.admin.GetNode, pb.GetNodeRequest(node=pb.NodeRef(name="n1")))
    # set by: who the helper's credential says ($SLIM_IDENTITY, the tests' admin certificate)
    assert node.next_environment == "jdk14" and node.next_boot.set_by == "admin:tester"
    # a failed boot: no feature, and why
    report(served, "b2", "disk:/var", "jdk14", ok=False)
    failed = helper(served)
    assert failed.stdout == "" and "boot into jdk14 failed at disk:/var: no space left" in failed.stderr
    unknown = helper(served, "ee=nosuch")
    assert unknown.returncode == 1 and "unknown environment 'ee=nosuch'" in unknown.stderr


def test_helper_without_a_core_fails_clearly(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "slim.cli", "slurm", "helper", "--node", "n1", "--core", "127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "cannot reach the core" in proc.stderr


def test_node_name_from_the_slurmd_that_runs_the_helper(tmp_path: Path) -> None:
    fake = tmp_path / "slurmd"  # a process whose command line reads like "slurmd -c ... -N n7"
    fake.symlink_to(Path(sys.executable).resolve())
    wait = "import time; time.sleep(30)"
    proc = subprocess.Popen([str(fake), "-c", wait, "-N", "n7"])
    joined = subprocess.Popen([str(fake), "-c", wait, "-Nn8"])
    try:
        deadline = time.monotonic() + 10  # until both have exec'd (the command line is theirs)
        while time.monotonic() < deadline and not all(
            Path(f"/proc/{p.pid}/cmdline").read_bytes().startswith(str(fake).encode()) for p in (proc, joined)
        ):
            time.sleep(0.01)
        assert slurmd_node_name(proc.pid) == "n7" and slurmd_node_name(joined.pid) == "n8"
    finally:
        for p in (proc, joined):
            p.kill()
            p.wait()
    assert slurmd_node_name(1 << 22) is None
