"""The network configuration service: dnsmasq rendered from the registry, run for real.

Unit tests check the rendering and the registry's checks; the rest run the real
dnsmasq in network namespaces this test creates (labs/netlab.py), with busybox
udhcpc as the client, and finally a whole namespace cluster: `slim serve` on the
server side, four nodes that get addresses and build their EE with the agent, and
a stranger that gets nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from labs.netlab import NetLab
from slim.core.daemons.dhcp import render
from slim.core.registry import load_registry, load_registry_text
from slim.errors import ConfigError, FailedPrecondition
from tests.support import need_netns, need_tool

BASE = """\
sites:
  lab:
    prefixes: [10.77.0.0/24]
    dhcp: {dhcp}
relays:
  r1: {{urls: ["http://10.77.0.1:8080/"], site: lab}}
profiles:
  p: {{}}
  old: {{loader: pxelinux}}
environments:
  base: {{image: /srv/img}}
nodes:
  n1: {{macs: ["52:54:00:77:00:01"], profile: p, environment: base}}
  n2: {{macs: ["52:54:00:77:00:02"], profile: old, environment: base}}
"""


def reg(dhcp: str) -> str:
    return BASE.format(dhcp=dhcp)


# -- rendering --------------------------------------------------------------------------
def test_proxy_is_the_default_and_renders_the_boot_chain() -> None:
    text = render(load_registry_text(reg("{}"))).text
    lines = text.splitlines()
    assert "dhcp-range=set:site-lab,10.77.0.0,proxy,255.255.255.0" in lines
    # only registered MACs; the pxelinux profile's node is tagged legacy
    assert "dhcp-host=52:54:00:77:00:01,set:known  # n1" in lines
    assert "dhcp-host=52:54:00:77:00:02,set:legacy  # n2" in lines
    assert "dhcp-ignore=tag:!known,tag:!legacy  # nobody else" in lines
    # option 93 chooses the loader; TFTP from the relay's address
    assert "dhcp-match=set:efi64,option:client-arch,7" in lines
    assert any(
        ln.startswith("pxe-service=") and "x86PC" in ln and ln.endswith("undionly.kpxe,10.77.0.1")
        for ln in lines
    )
    assert any("X86-64_EFI" in ln and ln.endswith("ipxe.efi,10.77.0.1") for ln in lines)
    assert any("tag:legacy" in ln and ln.endswith("lpxelinux.0,10.77.0.1") for ln in lines)
    # iPXE (user class) goes to HTTP: this is what breaks the chainload loop
    assert "dhcp-userclass=set:ipxe,iPXE" in lines
    assert "dhcp-boot=tag:site-lab,tag:!legacy,tag:ipxe,http://10.77.0.1:8080/boot/${mac}.ipxe" in lines
    assert not any(ln.startswith("dhcp-range") and ",proxy" not in ln for ln in lines)


def test_full_mode_and_open_enrollment() -> None:
    r = load_registry_text(
        reg("{mode: full, range: [10.77.0.100, 10.77.0.199], router: 10.77.0.1, dns: [10.77.0.2], "
            "lease_time: 30m, open_enrollment: true, interface: br0}")
    )  # fmt: skip
    lines = render(r).text.splitlines()
    assert "dhcp-range=set:site-lab,10.77.0.100,10.77.0.199,255.255.255.0,30m" in lines
    assert "dhcp-option=tag:site-lab,option:router,10.77.0.1" in lines
    assert "dhcp-option=tag:site-lab,option:dns-server,10.77.0.2" in lines
    assert not any(ln.startswith("dhcp-ignore") for ln in lines)
    assert "interface=br0" in lines and "bind-interfaces" in lines
    assert "dhcp-boot=tag:site-lab,tag:!legacy,tag:!ipxe,tag:efi64,ipxe.efi,,10.77.0.1" in lines
    assert "dhcp-boot=tag:site-lab,tag:!legacy,tag:!ipxe,tag:!efi64,undionly.kpxe,,10.77.0.1" in lines


@pytest.mark.parametrize(
    ("dhcp", "field", "words"),
    [
        ("{mode: full}", "range", "full mode needs a range"),
        ("{mode: full, range: [10.9.0.1, 10.9.0.9]}", "range", "not inside 10.77.0.0/24"),
        ("{mode: full, range: [10.77.0.9, 10.77.0.1]}", "range", "starts after it ends"),
        ("{range: [10.77.0.1, 10.77.0.9]}", "range", "only to mode: full"),
        ("{router: 10.77.0.1}", "router", "only to mode: full"),
        ("{relay: nosuch}", "relay", "unknown relay 'nosuch'"),
        ("{mode: dynamic}", "mode", "proxy"),
        ("{interface: 'eth0; rm -rf'}", "interface", "not a network interface name"),
        ("{lease_time: soon}", "lease_time", "not a lease time"),
        ("{subnet: 'fd00::/64'}", "subnet", "not an IPv4 network"),
        ("{tftp_server: relay.example}", "tftp_server", "not an IPv4 address"),
    ],
)
def test_bad_dhcp_sections_name_the_field(dhcp: str, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_registry_text(reg(dhcp))
    text = str(err.value)
    assert f"dhcp.{field}" in text and words in text, text


def test_relay_by_name_needs_an_address_for_tftp() -> None:
    text = reg("{}").replace("http://10.77.0.1:8080/", "http://relay.lab:8080/")
    with pytest.raises(ConfigError, match="tftp_server"):
        load_registry_text(text)
    ok = load_registry_text(text.replace("dhcp: {}", "dhcp: {tftp_server: 10.77.0.1}"))
    assert "boot/${mac}.ipxe" in render(ok).text and "http://relay.lab:8080/" in render(ok).text


def test_a_site_without_relays_or_prefix_is_an_error() -> None:
    text = (
        reg("{}")
        .replace("site: lab}", "site: other}")
        .replace("relays:", "relays:\n  r0: {urls: ['http://10.1.1.1/'], site: other}")
    )
    text = text.replace("sites:\n", "sites:\n  other: {prefixes: [10.1.0.0/16]}\n")
    with pytest.raises(ConfigError, match="site 'lab' has no relay"):
        load_registry_text(text)
    with pytest.raises(ConfigError, match="no IPv4 prefix"):
        load_registry_text(reg("{}").replace("prefixes: [10.77.0.0/24]", "prefixes: []"))


def test_no_dhcp_site_is_a_clear_error() -> None:
    r = load_registry_text(reg("{}").replace("    dhcp: {}\n", ""))
    with pytest.raises(FailedPrecondition, match=r"no site in .* has a dhcp section"):
        render(r)
    with pytest.raises(FailedPrecondition, match="nosuch"):
        render(load_registry_text(reg("{}")), sites=["nosuch"])


def test_rendered_configuration_passes_dnsmasqs_own_check(tmp_path: Path) -> None:
    dnsmasq = need_tool("dnsmasq", "dnsmasq-base")
    example = Path(__file__).resolve().parent.parent / "docs" / "registry.example.yaml"
    for text in (render(load_registry(example)).text, render(load_registry_text(reg("{}"))).text):
        conf = tmp_path / "d.conf"
        conf.write_text(text)
        proc = subprocess.run(
            [dnsmasq, "--test", f"--conf-file={conf}"], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0 and "syntax check OK" in proc.stderr, proc.stderr


# -- the real dnsmasq in namespaces -------------------------------------------------------
@pytest.fixture
def netlab(tmp_path: Path) -> Iterator[NetLab]:
    need_netns()
    with NetLab(tmp_path) as lab:
        yield lab


FULL = "{mode: full, range: [10.77.0.100, 10.77.0.199], interface: br0}"


def wait_for(cond: object, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_dnsmasq_answers_known_macs_and_is_reloaded_on_registry_change(
    netlab: NetLab, tmp_path: Path
) -> None:
    registry = tmp_path / "registry.yaml"
    registry.write_text(reg(FULL))
    netlab.add_node("n1", "52:54:00:77:00:01")
    netlab.add_node("x", "52:54:00:77:00:99")  # not registered (yet)
    workdir, err = tmp_path / "dhcp", tmp_path / "dhcp.err"
    with open(err, "wb") as errf:  # the supervisor runs in the server namespace, as a process
        proc = netlab.popen(
            netlab.server, sys.executable, "-m", "slim.cli", "dhcp", "serve", "--registry", str(registry),
            "--workdir", str(workdir), stdout=subprocess.PIPE, stderr=errf,
        )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith("answering lab (full on 10.77.0.0/24)"), err.read_text()
    first = netlab.dhcp("n1")
    assert first is not None and first.startswith("10.77.0.1")
    assert netlab.resolv_conf.exists()  # the lease's name servers went to the lab, not to /etc
    assert netlab.dhcp("x", tries=2) is None  # unknown MAC: no answer
    pid_file = workdir / "dnsmasq.pid"

    def pid() -> str:
        return pid_file.read_text().strip() if pid_file.exists() else ""

    # register the stranger: the supervisor restarts dnsmasq with it
    old = pid()
    registry.write_text(reg(FULL) + '  x: {macs: ["52:54:00:77:00:99"], profile: p, environment: base}\n')
    wait_for(lambda: pid() not in ("", old), what="dnsmasq restarted with the new registry")
    assert netlab.dhcp("x") is not None
    # an invalid registry is reported; the running dnsmasq keeps serving
    live = pid()
    registry.write_text("nodes: [not, a, mapping]\n")
    wait_for(lambda: "registry not applied" in err.read_text(), what="the error to be logged")
    assert netlab.dhcp("x") is not None and pid() == live
    # dnsmasq killed: the supervisor starts it again
    os.kill(int(live), 9)
    wait_for(lambda: pid() not in ("", live), what="dnsmasq restarted after it died")
    assert netlab.dhcp("n1") is not None
    proc.terminate()
    assert proc.wait(timeout=20) == 0
    assert not pid_file.exists()
    proc.stdout.close()


def test_open_enrollment_beside_a_closed_site_tells_them_apart_by_interface() -> None:
    text = reg("{open_enrollment: true, interface: eth1}") + (
        "  n3: {macs: ['52:54:00:77:00:03'], profile: p, environment: base}\n"
    )
    text = text.replace(
        "relays:", "  other:\n    prefixes: [10.78.0.0/24]\n    dhcp: {relay: r1, interface: eth2}\nrelays:"
    )
    lines = render(load_registry_text(text)).text.splitlines()
    assert "dhcp-ignore=tag:eth2,tag:!known,tag:!legacy" in lines
    assert not any(ln.startswith("dhcp-ignore=tag:!known") for ln in lines)
    with pytest.raises(FailedPrecondition, match="give them an 'interface'"):
        render(load_registry_text(text.replace(", interface: eth2", "")))


def test_router_advertisements_need_an_interface() -> None:
    lines = render(load_registry_text(reg("{interface: br0, router_advertisements: true}"))).text.splitlines()
    assert "dhcp-range=set:site-lab,::,constructor:br0,ra-only" in lines
    assert any(ln.startswith("enable-ra") for ln in lines)
    with pytest.raises(ConfigError, match="router_advertisements"):
        load_registry_text(reg("{router_advertisements: true}"))


@pytest.mark.slow
def test_a_dnsmasq_left_by_a_killed_supervisor_is_named(netlab: NetLab, tmp_path: Path) -> None:
    registry = tmp_path / "registry.yaml"
    registry.write_text(reg(FULL))
    workdir = tmp_path / "dhcp"
    proc = netlab.popen(
        netlab.server, sys.executable, "-m", "slim.cli", "dhcp", "serve", "--registry", str(registry),
        "--workdir", str(workdir), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith(b"answering")
    proc.stdout.close()
    dnsmasq = int((workdir / "dnsmasq.pid").read_text())
    proc.kill()  # the supervisor dies; its dnsmasq (its own session) lives on
    proc.wait()
    try:
        again = subprocess.run(
            netlab.cmd(netlab.server, sys.executable, "-m", "slim.cli", "dhcp", "serve",
                       "--registry", str(registry), "--workdir", str(workdir)),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert again.returncode != 0
        assert f"dnsmasq (pid {dnsmasq}) from an earlier run" in again.stderr, again.stderr
    finally:
        os.kill(dnsmasq, 15)
