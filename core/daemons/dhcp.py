"""The network configuration service: dnsmasq, rendered from the registry and supervised.

Every site with a ``dhcp`` section is one network dnsmasq answers on
(docs/dhcp.md).  What a PXE client is told depends on three things:

* **iPXE or not** (DHCP user class ``iPXE``): a plain PXE ROM gets a TFTP
  file from the site's relay; iPXE gets the relay's ``/boot/${mac}.ipxe``
  over HTTP.  That check is what breaks the chainload loop (iPXE would
  otherwise load iPXE again, forever).
* **Firmware** (DHCP option 93, client architecture): BIOS (0) gets
  ``undionly.kpxe``, x86-64 UEFI (7, 9) gets ``ipxe.efi`` — both from
  Debian's ``ipxe`` package, served by the relay's TFTP.
* **Boot loader of the node's hardware profile**: ``loader: pxelinux`` sends
  ``lpxelinux.0``, which reads ``pxelinux.cfg/01-<mac>`` from the relay (the
  legacy path for firmware that cannot run iPXE).

In **proxy** mode (the default) dnsmasq sends only boot information and the
site's own DHCP server keeps handing out addresses; in **full** mode it hands
out addresses from the site's range too (isolated networks).  Only the MACs
of registered nodes are answered, unless the site has ``open_enrollment``.

:func:`render` is pure; :class:`DhcpServer` writes the configuration into a
work directory, runs ``dnsmasq --keep-in-foreground`` and restarts it when the
rendered configuration changes (dnsmasq re-reads only some files on SIGHUP,
and a restart takes milliseconds; leases survive in the lease file).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from slim.core.daemons.supervisor import backoff_delay, file_signature, lock_workdir, stop_signals, terminate
from slim.core.registry import DhcpNetwork, Registry, load_registry
from slim.core.store import atomic_write
from slim.errors import FailedPrecondition, SlimError, Unavailable

log = logging.getLogger(__name__)

DNSMASQ = "dnsmasq"
BIOS_LOADER = "undionly.kpxe"
UEFI_LOADER = "ipxe.efi"
PXELINUX_LOADER = "lpxelinux.0"
# DHCP option 93 values (RFC 4578 and IANA "Processor Architecture Types")
EFI_ARCHES = (7, 9)  # x86-64 UEFI (9 is what some firmware sends for the same)
KNOWN, LEGACY = "known", "legacy"
_READY = "started, version"


@dataclass(frozen=True)
class DnsmasqConfig:
    text: str
    networks: tuple[DhcpNetwork, ...]
    hosts: int  # MACs answered by name


def _tag(site: str) -> str:
    return f"site-{site}"


def boot_url(net: DhcpNetwork) -> str:
    """What iPXE is told to chain to (iPXE expands ``${mac}`` itself)."""
    return f"{net.relay_url}boot/${{mac}}.ipxe"


def render(registry: Registry, source: str = "the registry", sites: list[str] | None = None) -> DnsmasqConfig:
    """The dnsmasq configuration for the registry's DHCP sites (or only ``sites``)."""
    nets = [n for n in registry.dhcp_networks if sites is None or n.site in sites]
    if sites is not None:
        missing = sorted(set(sites) - {n.site for n in nets})
        if missing:
            with_dhcp = ", ".join(n.site for n in registry.dhcp_networks) or "none"
            raise FailedPrecondition(
                f"site(s) {', '.join(missing)} have no dhcp section (sites with one: {with_dhcp})"
            )
    if not nets:
        raise FailedPrecondition(
            f"no site in {source} has a dhcp section: nothing for dnsmasq to answer (see docs/dhcp.md)"
        )
    out = [
        f"# dnsmasq configuration for SLIM, rendered from {source} by `slim dhcp config`.",
        "# Do not edit: change the registry (sites.<name>.dhcp) and re-render; docs/dhcp.md.",
        "port=0  # no DNS: DHCP and PXE only",
        "no-resolv",
        "no-hosts",
    ]
    interfaces = sorted({n.spec.interface for n in nets if n.spec.interface})
    if interfaces and all(n.spec.interface for n in nets):
        out += [f"interface={i}" for i in interfaces] + ["bind-interfaces"]
    else:
        out.append("# a site names no interface: answer on every interface")
    if any(n.spec.mode == "full" for n in nets):
        out += [
            "# full mode: the range is ours (authoritative); no ping before each offer, which",
            "# blocks dnsmasq ~3 s per new client and serializes a boot storm",
            "dhcp-authoritative",
            "no-ping",
        ]
    if any(n.spec.router_advertisements for n in nets):
        out.append("enable-ra  # IPv6 router advertisements on the interfaces that ask for them")
    out += [
        "",
        "# firmware by DHCP option 93 (client architecture); iPXE by its user class",
        *(f"dhcp-match=set:efi64,option:client-arch,{a}" for a in EFI_ARCHES),
        "dhcp-userclass=set:ipxe,iPXE",
        "",
        "# registered nodes (tag 'legacy': the hardware profile boots pxelinux)",
    ]
    any_open = any(n.spec.open_enrollment for n in nets)
    if not any_open:
        out.append(f"dhcp-ignore=tag:!{KNOWN},tag:!{LEGACY}  # nobody else")
    else:
        closed = [n.site for n in nets if not n.spec.open_enrollment and not n.spec.interface]
        if closed:
            raise FailedPrecondition(
                f"site(s) {', '.join(closed)} answer only registered MACs while another site has "
                "open_enrollment: give them an 'interface' so that dnsmasq can tell the networks apart"
            )
    hosts = 0
    for name, node in registry.nodes.items():
        profile = registry.profiles.get(node.profile)
        tag = LEGACY if profile is not None and profile.loader == "pxelinux" else KNOWN
        for mac in node.macs:
            out.append(f"dhcp-host={mac},set:{tag}  # {name}")
            hosts += 1
    for n in nets:
        t, tftp = _tag(n.site), n.tftp_server
        mask = str(n.subnet.netmask)
        out += ["", f"# site {n.site}: {n.spec.mode} DHCP on {n.subnet}, relay {n.relay} ({n.relay_url})"]
        if n.spec.mode == "proxy":
            out.append(f"dhcp-range=set:{t},{n.subnet.network_address},proxy,{mask}")
        else:
            assert n.spec.range is not None
            first, last = n.spec.range
            out.append(f"dhcp-range=set:{t},{first},{last},{mask},{n.spec.lease_time}")
            out.append(f"dhcp-option=tag:{t},option:router" + (f",{n.spec.router}" if n.spec.router else ""))
            out.append(f"dhcp-option=tag:{t},option:dns-server" + "".join(f",{d}" for d in n.spec.dns))
        if n.spec.router_advertisements:
            # iPXE configures IPv4 and IPv6 together and, with no IPv6 router, waits ~13 s
            out.append(f"dhcp-range=set:{t},::,constructor:{n.spec.interface},ra-only")
        if n.spec.open_enrollment:
            out.append("# open enrollment: unknown MACs are answered too")
        elif not any_open:
            out.append("# only registered MACs (dhcp-ignore above)")
        else:  # dnsmasq applies dhcp-ignore before it picks the range: tell sites by interface
            out.append(f"dhcp-ignore=tag:{n.spec.interface},tag:!{KNOWN},tag:!{LEGACY}")
        plain = f"tag:{t},tag:!{LEGACY},tag:!ipxe"
        if n.spec.mode == "proxy":
            # a PXE boot server menu of one item per architecture boots at once
            out += [
                f'pxe-service={plain},x86PC,"SLIM: chain to iPXE",{BIOS_LOADER},{tftp}',
                f'pxe-service={plain},X86-64_EFI,"SLIM: chain to iPXE",{UEFI_LOADER},{tftp}',
                f'pxe-service={plain},BC_EFI,"SLIM: chain to iPXE",{UEFI_LOADER},{tftp}',
                f'pxe-service=tag:{t},tag:{LEGACY},x86PC,"SLIM: pxelinux",{PXELINUX_LOADER},{tftp}',
            ]
        else:
            out += [
                f"dhcp-boot={plain},tag:!efi64,{BIOS_LOADER},,{tftp}",
                f"dhcp-boot={plain},tag:efi64,{UEFI_LOADER},,{tftp}",
                f"dhcp-boot=tag:{t},tag:{LEGACY},{PXELINUX_LOADER},,{tftp}",
            ]
        out.append(f"dhcp-boot=tag:{t},tag:!{LEGACY},tag:ipxe,{boot_url(n)}")
    return DnsmasqConfig("\n".join(out) + "\n", tuple(nets), hosts)


# -- supervision ------------------------------------------------------------------


class DhcpServer:
    """One ``dnsmasq`` for a registry, in its own work directory.

    The work directory holds ``dnsmasq.conf``, ``dnsmasq.log``, ``dnsmasq.leases`` (full mode),
    ``dnsmasq.pid`` and ``lock`` (one supervisor per work directory).  Only the
    process this object started is ever signalled, by its PID.
    """

    def __init__(
        self,
        registry_path: str | Path,
        workdir: str | Path,
        *,
        sites: list[str] | None = None,
        dnsmasq: str = DNSMASQ,
        log_dhcp: bool = False,
        interval: float = 1.0,
        start_timeout: float = 10.0,
        stop_grace: float = 5.0,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.registry_path = Path(registry_path)
        self.workdir = Path(workdir).absolute()
        self.sites = sites
        self.dnsmasq = dnsmasq
        self.log_dhcp = log_dhcp
        self.interval = min(max(interval, 0.05), 60.0)
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.backoff = backoff
        self.config_path = self.workdir / "dnsmasq.conf"
        self.log_path = self.workdir / "dnsmasq.log"
        self.lease_path = self.workdir / "dnsmasq.leases"
        self.pid_path = self.workdir / "dnsmasq.pid"
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._config: DnsmasqConfig | None = None
        self._workdir_lock: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        with self._lock:
            proc = self._proc
            return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def config(self) -> DnsmasqConfig | None:
        """The configuration dnsmasq is running."""
        return self._config

    def render(self) -> DnsmasqConfig:
        return render(load_registry(self.registry_path), str(self.registry_path), self.sites)

    # -- start / stop ---------------------------------------------------------------
    def start(self) -> None:
        """Render, write and start dnsmasq; return once it answers (raises
        :class:`Unavailable` quoting dnsmasq if it exits or stays silent)."""
        with self._lock:
            if self.pid is not None:
                return
            self._acquire_workdir()
            try:
                config = self.render()
                self._spawn(config)
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        """Stop dnsmasq (SIGTERM, then SIGKILL) and release the work directory.  Idempotent."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                self._terminate(proc)
            f, self._workdir_lock = self._workdir_lock, None
            if f is not None:
                f.close()

    def __enter__(self) -> DhcpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reload(self) -> str:
        """Re-render; restart dnsmasq if the configuration changed.  Raises (keeping the
        running dnsmasq) if the registry is invalid.  Returns "unchanged" or "restarted"."""
        with self._lock:
            config = self.render()
            if self.pid is not None and self._config is not None and config.text == self._config.text:
                return "unchanged"
            proc, self._proc = self._proc, None
            if proc is not None:
                self._terminate(proc)
            self._spawn(config)
            return "restarted"

    def _acquire_workdir(self) -> None:
        if self._workdir_lock is None:
            marker = f"--conf-file={self.config_path}"
            self._workdir_lock = lock_workdir(
                self.workdir, self.pid_path, marker, "dnsmasq", "slim dhcp serve"
            )

    def _spawn(self, config: DnsmasqConfig) -> None:
        binary = shutil.which(self.dnsmasq)
        if binary is None:
            raise FailedPrecondition(
                f"{self.dnsmasq} not found: install dnsmasq (apt-get install dnsmasq-base)"
            )
        atomic_write(self.config_path, config.text.encode())
        if self.log_path.exists():
            os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))
        self.log_path.touch()
        cmd = [
            binary,
            "--keep-in-foreground",
            f"--conf-file={self.config_path}",
            f"--pid-file={self.pid_path}",
            f"--log-facility={self.log_path}",
            f"--dhcp-leasefile={self.lease_path}",
            "--user=root",  # reads its files in the work directory, which may be private
            *(["--log-dhcp"] if self.log_dhcp else []),
        ]
        with (self.workdir / "dnsmasq.out").open("ab") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                rc: int | None = proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                rc = None
            if rc is not None:
                raise Unavailable(f"dnsmasq exited with status {rc} while starting:\n{self.log_tail()}")
            if _READY in self._read(self.log_path):
                break
            if time.monotonic() > deadline:
                self._terminate(proc)
                raise Unavailable(f"dnsmasq did not start within {self.start_timeout:g}s:\n{self.log_tail()}")
        self._proc, self._config = proc, config
        sites = ", ".join(f"{n.site} ({n.spec.mode} on {n.subnet})" for n in config.networks)
        log.info("dhcp: dnsmasq running (pid %d): %s; %d MACs known", proc.pid, sites, config.hosts)

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        terminate(proc, self.stop_grace, "dnsmasq")
        self.pid_path.unlink(missing_ok=True)

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_bytes()[-65536:].decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 12) -> str:
        text = self._read(self.workdir / "dnsmasq.out") + self._read(self.log_path)
        useful = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return "\n".join(f"  {ln}" for ln in useful[-lines:]) or "  (dnsmasq said nothing)"

    # -- supervision ----------------------------------------------------------------
    def _restart_dead(self) -> None:
        """Start dnsmasq again: with the registry as it is now, or if that is invalid,
        with the last configuration that ran."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                self._terminate(proc)
            try:
                config = self.render()
            except SlimError as exc:
                if self._config is None:
                    raise
                log.error("dhcp: restarting with the last good configuration: %s", exc)
                config = self._config
            self._spawn(config)

    def run(
        self,
        stop: threading.Event,
        *,
        reload_event: threading.Event | None = None,
        ready: Callable[[DhcpServer], None] | None = None,
    ) -> None:
        """Start dnsmasq (raising if that fails), then until ``stop`` is set: restart it
        with jittered exponential backoff if it dies; re-render when the registry file
        changes (or ``reload_event`` is set) and restart it if the result differs.  An
        invalid registry is logged and the running configuration kept."""
        reload_event = reload_event or threading.Event()
        self.start()
        try:
            if ready is not None:
                ready(self)
            failures, restart_at = 0, None
            signature, up_since = file_signature(self.registry_path), time.monotonic()
            while not stop.wait(min(self.interval, 0.25)):
                now = time.monotonic()
                if self.pid is None:
                    if restart_at is None:
                        delay = backoff_delay(self.backoff, failures)
                        log.warning("dhcp: dnsmasq died; restarting in %.1fs:\n%s", delay, self.log_tail())
                        restart_at = now + delay
                    if now >= restart_at:
                        failures += 1
                        try:
                            self._restart_dead()
                        except SlimError as exc:
                            restart_at = time.monotonic() + backoff_delay(self.backoff, failures)
                            log.error("dhcp: restart failed: %s", exc)
                        else:
                            restart_at, up_since = None, time.monotonic()
                    continue
                if failures and now - up_since > 60.0:
                    failures = 0
                current = file_signature(self.registry_path)
                if current == signature and not reload_event.is_set():
                    continue
                signature = current
                reload_event.clear()
                try:
                    outcome = self.reload()
                except SlimError as exc:
                    log.error("dhcp: registry not applied, dnsmasq keeps its configuration: %s", exc)
                    continue
                log.info("dhcp: registry changed; dnsmasq %s", outcome)
        finally:
            self.stop()


def serve(
    registry_path: str | Path,
    workdir: str | Path,
    *,
    sites: list[str] | None = None,
    log_dhcp: bool = False,
    stop_event: threading.Event | None = None,
    ready: Callable[[DhcpServer], None] | None = None,
    dnsmasq: str = DNSMASQ,
) -> None:
    """``slim dhcp serve``: run and supervise dnsmasq until SIGTERM/SIGINT (or
    ``stop_event``); SIGHUP re-renders now."""
    server = DhcpServer(registry_path, workdir, sites=sites, log_dhcp=log_dhcp, dnsmasq=dnsmasq)
    stop = stop_event if stop_event is not None else threading.Event()
    reload_event = threading.Event()
    with stop_signals(stop, reload_event):
        server.run(stop, reload_event=reload_event, ready=ready)
