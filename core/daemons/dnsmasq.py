"""``slim dhcp serve``: dnsmasq with the configuration rendered from the registry, supervised.

:class:`DhcpServer` writes the configuration :func:`slim.core.daemons.dhcp.render`
makes into a work directory, runs ``dnsmasq --keep-in-foreground`` and restarts it
when it dies and when the rendered configuration changes (dnsmasq re-reads only some
files on SIGHUP, and a restart takes milliseconds; leases survive in the lease file).
:class:`DhcpConfig` is ``slim dhcp serve``'s settings and :func:`run` runs a server
from them.  See docs/dhcp.md.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from pydantic import Field

from slim.config import ProcessConfig
from slim.core.daemons.dhcp import DnsmasqConfig, render
from slim.core.registry import load_registry
from slim.daemons.supervisor import Supervisor

log = logging.getLogger(__name__)

DNSMASQ = "dnsmasq"
_READY = "started, version"  # what dnsmasq logs once it runs


class DhcpConfig(ProcessConfig):
    """``slim dhcp serve``'s settings."""

    registry: Path = Field(Path("/etc/slim/registry.yaml"), description="the registry YAML file")
    workdir: Path = Field(
        Path("/var/lib/slim/dhcp"),
        description="dnsmasq's directory: dnsmasq.conf, dnsmasq.log, dnsmasq.leases, dnsmasq.pid",
    )
    sites: list[str] | None = Field(
        None, description="only these sites' networks; none: every site with a dhcp section"
    )
    log_dhcp: bool = Field(False, description="have dnsmasq log every DHCP exchange in detail")


class DhcpServer(Supervisor[DnsmasqConfig]):
    """One ``dnsmasq`` for a registry, in its own work directory.

    The work directory holds ``dnsmasq.conf``, ``dnsmasq.log``, ``dnsmasq.leases`` (full
    mode), ``dnsmasq.pid``, ``dnsmasq.out`` and ``lock`` (one supervisor per work
    directory).  ``run()`` re-checks the registry file every tick and restarts dnsmasq
    when the configuration rendered from it differs.  Only the process this object
    started is ever signalled, by its PID.
    """

    tag = "dhcp"
    daemon = DNSMASQ
    stem = "dnsmasq"
    owner = "slim dhcp serve"
    install = "install dnsmasq (apt-get install dnsmasq-base)"
    quiet = "dnsmasq said nothing"
    logger = log
    start_poll = 0.02
    died_message = "%(tag)s: %(daemon)s died; restarting in %(delay).1fs:\n%(tail)s"
    restart_failed_message = "%(tag)s: restart failed: %(error)s"
    reload_failed_message = "%(tag)s: registry not applied, %(daemon)s keeps its configuration: %(error)s"

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
        super().__init__(registry_path, workdir, interval, start_timeout, stop_grace, backoff)
        self.sites = sites
        self.dnsmasq = dnsmasq
        self.log_dhcp = log_dhcp
        self.lease_path = self.workdir / "dnsmasq.leases"

    @property
    def config(self) -> DnsmasqConfig | None:
        """The configuration dnsmasq is running."""
        return self._current

    def render(self) -> DnsmasqConfig:
        return render(load_registry(self.registry_path), str(self.registry_path), self.sites)

    def _text(self, config: DnsmasqConfig) -> str:
        return config.text

    def command(self) -> list[str]:
        binary = shutil.which(self.dnsmasq)
        if binary is None:
            raise self._missing(self.dnsmasq)
        return [
            binary,
            "--keep-in-foreground",
            f"--conf-file={self.config_path}",
            f"--pid-file={self.pid_path}",
            f"--log-facility={self.log_path}",
            f"--dhcp-leasefile={self.lease_path}",
            "--user=root",  # reads its files in the work directory, which may be private
            *(["--log-dhcp"] if self.log_dhcp else []),
        ]

    def _marker(self) -> str:
        return f"--conf-file={self.config_path}"

    def _ready(self, proc: subprocess.Popen[bytes]) -> bool:
        return _READY in self._read_log()

    def _describe(self, config: DnsmasqConfig) -> str:
        sites = ", ".join(f"{n.site} ({n.spec.mode} on {n.subnet})" for n in config.networks)
        return f": {sites}; {config.hosts} MACs known"

    def _reloaded(self, outcome: str) -> None:
        log.info("dhcp: registry changed; dnsmasq %s", outcome)

    def _poll_period(self) -> float:
        return 0.0  # the registry file's signature, every tick

    def _log_text(self) -> str:
        return self._read_tail(self.out_path, 65536) + self._read_tail(self.log_path, 65536)


def run(
    config: DhcpConfig,
    ready: Callable[[DhcpServer], None] | None = None,
    *,
    stop_event: threading.Event | None = None,
) -> None:
    """``slim dhcp serve`` with ``config``: see :func:`serve`."""
    serve(
        config.registry,
        config.workdir,
        sites=config.sites,
        log_dhcp=config.log_dhcp,
        stop_event=stop_event,
        ready=ready,
    )


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
    """Run and supervise dnsmasq until SIGTERM/SIGINT (or ``stop_event``); SIGHUP
    re-renders now.  Raises :class:`SlimError` if dnsmasq cannot be started at all."""
    server = DhcpServer(registry_path, workdir, sites=sites, log_dhcp=log_dhcp, dnsmasq=dnsmasq)
    server.serve(stop_event, ready=ready)
