"""The Slurm lab (labs/slurmlab.py) with a desktop pool: d1..d3 in their own partition, with
simulated power (tests/test_slurm_harvest.py).

A desktop here is a MAC, a root ``roots/dX`` and, while it runs the pool's EE, a ``slurmd -N
dX``.  Its power is simulated:

* **power on**: the relay's magic packets go to a :class:`labs.wakelab.MagicPacketListener` on
  127.0.0.1 (the registry's ``relays.r1.wake_to``), whose callback boots the desktop as its
  firmware would: its boot script from the relay (``GET /boot/MAC.ipxe``), then the agent in
  no-reboot mode builds its root for the pool's EE, ``slurmd -b`` starts and the boot's
  ``switch_root`` and ``up`` are reported on the environment's behalf (labs/onbehalf.py);
* **power off**: while in the EE, the desktop asks the relay for its order every second
  (``POST /v1/nodes/dX/order`` with its boot id, as the EE's order script does); told
  ``poweroff`` or ``reboot``, it stops its slurmd: it is back in its own OS;
* **its owner's pick** (:meth:`HarvestLab.owner_picks_own_os`): the owner restarts the desktop
  (slurmd stops) and picks their own OS at the menu: ``GET /boot/local?boot=ID``, the boot id
  taken from the boot script.

The pool's window is on the wall clock (Slurm cannot be given another clock): it opens ``lead``
seconds after the lab is up (to the second: the registry's ``HH:MM:SS``; until then it is
hours away, and the core takes the new one on SIGHUP), for ``length`` seconds.  140 s is
about the shortest that proves what the test proves: Slurm's time limits are whole minutes,
a one-minute job must fit before the blackout (end - ``GRACE``) with ``BOOT_TIME`` added, as
Slurm adds it, and the partition's MaxTime (the window less the grace, in whole minutes) must
still admit the two-minute job that does not fit.
Everything started here is stopped by :meth:`close`, by PID.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labs.host import free_port
from labs.slurmlab import SLIM, SlurmLab, stop_pid_file
from labs.wakelab import MagicPacketListener
from slim.agent.ee import run_dir

log = logging.getLogger(__name__)
DESKTOPS = ("d1", "d2", "d3")
PARTITION = "harvest"
POOL = "night"
ENVIRONMENT = "jdk14"  # base plus /opt/jdk14/release: a job proves it ran in the pool's EE
GRACE = 20
BOOT_TIME = 10  # helpers.conf BootTime: the lab's simulated boots take seconds
SUSPEND_TIMEOUT = 5


def mac_of(node: str) -> str:
    return f"52:54:00:66:00:{int(node[1:]):02x}"


@dataclass
class Desktop:
    name: str
    mac: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    boot_id: str = ""  # of its boot into the EE, while it runs it
    events: list[str] = field(default_factory=list)  # what happened to it, for the test's messages


class HarvestLab(SlurmLab):
    def __init__(self, tmp: Path, lead: float = 20.0, length: float = 140.0) -> None:
        super().__init__(tmp, nodes=1)
        self.listener = MagicPacketListener([mac_of(d) for d in DESKTOPS], self._woken, ("127.0.0.1", 0))
        self.desktops = {d: Desktop(d, mac_of(d)) for d in DESKTOPS}
        self.ports = {d: free_port() for d in DESKTOPS}
        self.lead, self.length = lead, length
        self._place_window(dt.timedelta(hours=6))  # far away while the lab starts (start() moves it)
        self.harvest_log = tmp / "harvest.log"
        self._harvest: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- the SlurmLab's hooks -------------------------------------------------------------
    def registry_nodes(self) -> str:
        return "".join(
            f"\n  {d}: {{macs: ['{mac_of(d)}'], profile: p, environment: base, site: lo}}" for d in DESKTOPS
        )

    def registry_pools(self) -> str:
        return f"""pools:
  {POOL}:
    nodes: [{", ".join(DESKTOPS)}]
    environment: {ENVIRONMENT}
    partition: {PARTITION}
    time_zone: UTC
    {self._windows_line()}
    grace: {GRACE}
    wake_timeout: 30
    wakes_per_minute: 600
    menu_timeout: 1
    prefetch_lead: 0
"""

    def registry_relay(self) -> str:
        return f", wake_to: 127.0.0.1:{self.listener.port}"

    def slurm_nodes(self) -> dict[str, int]:
        return dict(self.ports)

    def slurm_extra(self) -> str:
        # the lab's windows are minutes: the power-save thread works every second (default 10 s),
        # the scheduler tries pending jobs every 5 s (default 60 s; backfill 30 s)
        power = "SlurmctldParameters=power_save_interval=1"
        return f"{power}\nSchedulerParameters=sched_interval=5,bf_interval=5\n"

    def config_args(self) -> list[str]:
        return ["--power-log", str(self.tmp / "slurm" / "power.log"), "--idle-return", "600",
                "--suspend-timeout", str(SUSPEND_TIMEOUT),
                "--boot-time", str(BOOT_TIME)]  # fmt: skip

    # -- start ---------------------------------------------------------------------------
    def start(self) -> HarvestLab:
        self.listener.start()
        super().start()
        # the lab is up: the window opens ``lead`` seconds from now (however long starting took)
        before = self._windows_line()
        self._place_window(dt.timedelta(seconds=self.lead))
        self.registry.write_text(self.registry.read_text().replace(before, self._windows_line()))
        assert self._serve is not None
        self._serve.send_signal(signal.SIGHUP)
        self.wait("the core took the window", lambda: self._core_window() == self.window_start, 20, 0.2)
        self.start_harvest()
        return self

    def _place_window(self, ahead: dt.timedelta) -> None:
        first = dt.datetime.now(dt.UTC) + ahead
        self.window_start = (first + dt.timedelta(seconds=1)).replace(microsecond=0)
        self.window_end = self.window_start + dt.timedelta(seconds=self.length)

    def _windows_line(self) -> str:
        return f'windows: [{{start: "{self.window_start:%H:%M:%S}", end: "{self.window_end:%H:%M:%S}"}}]'

    def _core_window(self) -> dt.datetime | None:
        pools = self._status()
        start = pools[0].get("window_start", "") if pools else ""
        return dt.datetime.fromisoformat(start) if start else None

    def start_harvest(self) -> None:
        with open(self.harvest_log, "ab") as out:
            self._harvest = subprocess.Popen(
                [*SLIM, "slurm", "harvest", "--core", self.core, "--interval", "2"],
                env=self.env, stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip

    # -- a desktop's power -----------------------------------------------------------------
    def _woken(self, mac: str) -> None:
        node = next(d for d in self.desktops.values() if d.mac == mac)
        t = threading.Thread(target=self._power_on, args=(node,), name=f"power-on-{node.name}", daemon=True)
        self._threads.append(t)
        t.start()

    def _get(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.relay}{path}", timeout=10) as r:  # noqa: S310 - the lab's relay
            return str(r.read().decode())

    def boot_script(self, node: str) -> str:
        return self._get(f"/boot/{mac_of(node)}.ipxe")

    def _power_on(self, d: Desktop) -> None:
        with d.lock:
            if d.boot_id or self._stopping.is_set():
                d.events.append(f"{time.strftime('%T')} magic packet: already on")
                return
            d.events.append(f"{time.strftime('%T')} magic packet: powering on")
            try:
                script = self.boot_script(d.name)  # the firmware's PXE: the menu, EE by default
                if "slim.boot=" not in script:
                    d.events.append("its menu boots its own OS: stays there")
                    return
                target = self.roots / d.name
                shutil.rmtree(target, ignore_errors=True)
                self.boot(d.name)  # the agent builds its root; switch_root and up reported
                d.boot_id = json.loads((run_dir(target, no_reboot=True) / "ee").read_text())["boot_id"]
                self._run("slurmd", "-b", "-N", d.name, "-f", str(self.conf))
                d.events.append(f"{time.strftime('%T')} in the EE (boot {d.boot_id}), slurmd started")
            except Exception as exc:  # noqa: BLE001 - a failed boot leaves the desktop in its own OS
                d.events.append(f"{time.strftime('%T')} boot failed: {exc}")
                return
        t = threading.Thread(
            target=self._poll_orders, args=(d, d.boot_id), name=f"orders-{d.name}", daemon=True
        )
        self._threads.append(t)
        t.start()

    def _poll_orders(self, d: Desktop, boot_id: str) -> None:
        """The EE's order script: ask every second until told to go back."""
        while not self._stopping.wait(1.0):
            if d.boot_id != boot_id:
                return  # this boot is over
            try:
                request = urllib.request.Request(  # noqa: S310 - the lab's relay
                    f"{self.relay}/v1/nodes/{d.name}/order", data=json.dumps({"boot_id": boot_id}).encode(),
                    headers={"Content-Type": "application/json"},
                )  # fmt: skip
                with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310
                    action = r.read().decode().split()[0]
            except OSError as exc:
                d.events.append(f"{time.strftime('%T')} order: {exc}")
                continue
            if action in ("poweroff", "reboot"):
                with d.lock:
                    if d.boot_id == boot_id:
                        self.stop_slurmd(d.name)
                        d.boot_id = ""
                        d.events.append(f"{time.strftime('%T')} told to {action}: back in its own OS")
                return

    def stop_slurmd(self, node: str) -> None:
        stop_pid_file(self.tmp / "slurm" / f"slurmd-{node}.pid")

    def slurmd_running(self, node: str) -> bool:
        pid_file = self.tmp / "slurm" / f"slurmd-{node}.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError):
            return False
        return Path(f"/proc/{pid}").exists()

    def owner_picks_own_os(self, node: str) -> None:
        """The desktop's owner restarts it and picks their own OS at the menu."""
        d = self.desktops[node]
        with d.lock:
            self.stop_slurmd(node)
            d.boot_id = ""
            script = self.boot_script(node)
            found = re.search(r" local\?boot=([\w-]+)", script) or re.search(r"slim\.boot=([\w-]+)", script)
            assert found is not None, script
            self._get(f"/boot/local?boot={found.group(1)}")
            d.events.append(f"{time.strftime('%T')} its owner picked their own OS")

    # -- Slurm and the core, as the test sees them ----------------------------------------------
    def node(self, node: str) -> dict[str, str]:
        out = self.slurm("scontrol", "show", "node", "-o", node).stdout
        line, _, reason = out.partition(" Reason=")
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        fields["Reason"] = reason.strip()
        return fields

    def reservations(self) -> str:
        """``scontrol show reservation -o``, times in UTC."""
        proc = subprocess.run(
            ["scontrol", "show", "reservation", "-o"], env={**self.env, "TZ": "UTC"},
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return proc.stdout

    def _status(self) -> list[dict[str, Any]]:
        """The core's pools (`slim harvest status --json`)."""
        out = subprocess.run(
            [*SLIM, "harvest", "status", "--core", self.core, "--json"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        return list(json.loads(out).get("pools", []))

    def harvest_status(self) -> dict[str, tuple[str, str]]:
        pools = self._status()
        return {
            d["node"]: (d.get("state", ""), d.get("reason", "")) for p in pools for d in p.get("desktops", [])
        }

    def wait(self, what: str, check: object, timeout: float, every: float = 1.0) -> None:
        assert callable(check)
        began = time.monotonic()
        while not check():
            if time.monotonic() > began + timeout:
                raise TimeoutError(f"never: {what}; desktops: {self.describe()}")
            time.sleep(every)
        log.info("%s %s (waited %.1f s)", time.strftime("%T"), what, time.monotonic() - began)

    def describe(self) -> str:
        return "; ".join(f"{d.name}: {d.events[-4:]}" for d in self.desktops.values())

    # -- stop --------------------------------------------------------------------------------
    def close(self) -> None:
        self._stopping.set()
        if self._harvest is not None and self._harvest.poll() is None:
            self._harvest.terminate()
            try:
                self._harvest.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._harvest.kill()
                self._harvest.wait()
        self.listener.stop()
        for t in self._threads:
            t.join(timeout=30)
        super().close()
