"""``slim serve``: every server of one machine, from one registry file.

The registry's ``server`` section (docs/registry.md) says where each part
listens and where state lives; this module builds each part's settings model
from it, writes it to ``STATE_DIR/config/PART.json`` and starts, as child
processes, the same commands an administrator would run one by one
(``slim PART serve --config STATE_DIR/config/PART.json``):

* ``slim core serve`` — gRPC on ``core_listen``, the store over HTTPS on
  ``objects_listen`` (the relay's upstream, with the core's certificate);
* ``slim relay serve`` — this machine's relay (``server.relay``): objects,
  the node API (HTTP, and HTTPS on ``relay_https_listen`` if set), TFTP for
  stage 1;
* ``slim nfs serve`` — nfs-ganesha, when an environment shares a directory
  over NFS and ``nfs_listen`` is set;
* ``slim dhcp serve`` — dnsmasq, when a site has a ``dhcp`` section and
  ``server.dhcp`` is true.

SIGHUP is passed on (the core, NFS and DHCP re-read the registry); SIGTERM or
SIGINT stops them in reverse order, and ``slim serve`` says what it stopped and how
each ended (``slim serve stopped on SIGTERM: relay (exit 0), core (exit 0)``).  If
one of them exits, the others are stopped and ``slim serve`` exits non-zero naming
it (a service manager restarts the whole).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from slim.config import ProcessConfig
from slim.core.control.config import CoreConfig
from slim.core.daemons.dnsmasq import DhcpConfig
from slim.core.daemons.ganesha import NfsConfig
from slim.core.registry import Registry, load_registry
from slim.errors import FailedPrecondition, SlimError, Unavailable
from slim.relay.config import RelayConfig
from slim.vocabulary import Policy

log = logging.getLogger(__name__)
SLIM = [sys.executable, "-m", "slim.cli"]
START_TIMEOUT = 60.0


def local_relay_identity(ca_dir: Path, name: str, out: Path) -> Path:
    """The identity of ``slim serve``'s own relay (``out``): issued by the CA in ``ca_dir``
    (made if missing) on first start, kept while it is valid for more than 30 days."""
    from cryptography import x509

    from slim.pki import CertificateAuthority, Revocations, identity_of, read_identity

    ca = CertificateAuthority.load_or_create(ca_dir)
    try:
        files = read_identity(out)
        cert = x509.load_pem_x509_certificate(files.cert)
        who = identity_of(cert)
        left = cert.not_valid_after_utc.timestamp() - time.time()
        usable = who.name == name and files.ca == ca.cert_pem and left > 30 * 86400
        revocations = Revocations(ca_dir)
        revocations.refresh()
        if usable and revocations.refusal(who) is None:
            return out
    except SlimError:
        pass  # none yet, or not usable: a new one
    ca.enroll(name, "relay", out)
    return out


@dataclass
class Part:
    name: str
    proc: subprocess.Popen[str]
    log: Path
    lines: dict[str, str] = field(default_factory=dict)  # what it printed: prefix -> address


def _connect(address: str) -> str:
    """A HOST:PORT a local client can connect to (a wildcard bind means loopback)."""
    if address.startswith("unix:"):
        return address
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - comparing, not binding
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class AllInOne:
    def __init__(self, registry_path: Path, state_dir: Path | None = None, log_level: str = "info") -> None:
        self.registry_path = registry_path.absolute()
        self.registry: Registry = load_registry(self.registry_path)
        srv = self.registry.server
        self.state = (state_dir or Path(srv.state_dir)).absolute()
        self.log_level = log_level
        self.parts: list[Part] = []
        self.relay = srv.relay or self._only_relay()
        self.addresses: dict[str, str] = {}

    def _only_relay(self) -> str:
        relays = list(self.registry.relays)
        if len(relays) == 1:
            return relays[0]
        listed = ", ".join(relays) or "none defined"
        raise FailedPrecondition(
            f"{self.registry_path}: say which relay this server is with server.relay (relays: {listed})"
        )

    @property
    def wants_nfs(self) -> bool:
        reg = self.registry
        return self.registry.server.nfs_listen is not None and any(
            spec.policy is Policy.NFS for env in reg.environments for spec in reg.directories(env).values()
        )

    @property
    def wants_dhcp(self) -> bool:
        return self.registry.server.dhcp and bool(self.registry.dhcp_networks)

    # -- start ------------------------------------------------------------------------
    def start(self, say: Callable[[str], None] = print) -> None:
        """Start every part; return once each serves (raise, stopping what started, if one fails).

        Each part is ``slim PART serve --config STATE_DIR/config/PART.json``: its settings
        model, built here from the registry's ``server`` section and validated before
        anything starts."""
        srv, state, reg = self.registry.server, self.state, self.registry_path
        state.mkdir(parents=True, exist_ok=True)
        (state / "logs").mkdir(exist_ok=True)
        source = f"{reg}: server"
        # every part's settings, checked before any part starts; the relay's core and
        # the core's object server are known once the core listens: until then the relay's
        # settings are checked with stand-ins for them
        core_config = CoreConfig.build(
            source, registry=reg, state=state / "state.db", store=state / "store", keys=state / "keys",
            listen=srv.core_listen,
            objects_listen=srv.objects_listen, log_level=self.log_level,
        )  # fmt: skip
        identity = local_relay_identity(core_config.ca_dir, self.relay, state / "relays" / self.relay)
        relay_settings: dict[str, Any] = {
            "name": self.relay, "cache_dir": state / "cache", "max_bytes": srv.cache_max_bytes,
            "listen": srv.relay_listen, "https_listen": srv.relay_https_listen,
            "tftp_listen": srv.tftp_listen, "log_level": self.log_level, "wake_to": srv.relay_wake_to,
            "trust": [state / "keys"],  # the core's keys (made when it first starts; both during a rotation)
            "identity": identity,  # mutual TLS with the core, as any relay
        }  # fmt: skip
        # the relay's upstreams: its parent's URLs if the registry gives it one, then the core's
        # object server (known once the core listens: a stand-in until then), over HTTPS as the
        # core serves it, checked against the CA with the relay's identity
        parent = self.registry.relay_upstreams(self.relay)
        scheme = "https" if core_config.objects_https else "http"
        RelayConfig.build(
            source, core="127.0.0.1:1", upstreams=[*parent, f"{scheme}://127.0.0.1:1"], **relay_settings
        )
        nfs_config = NfsConfig.build(
            source, registry=reg, store=state / "store", listen=srv.nfs_listen, workdir=state / "nfs"
        ) if self.wants_nfs else None  # fmt: skip
        dhcp_config = (
            DhcpConfig.build(source, registry=reg, workdir=state / "dhcp") if self.wants_dhcp else None
        )
        try:
            core = self._start("core", core_config, ["listening on", "objects on"])
            self.addresses["core"] = core.lines["listening on"]
            self.addresses["objects"] = core.lines["objects on"]
            say(f"core listening on {self.addresses['core']} (objects on {self.addresses['objects']})")
            # the relay's parent in the registry first (if it has one), the core's objects last
            upstreams = [*parent, f"{scheme}://{_connect(self.addresses['objects'])}"]
            relay_config = RelayConfig.build(
                source, core=_connect(self.addresses["core"]), upstreams=upstreams, **relay_settings
            )
            relay = self._start(
                "relay",
                relay_config,
                [
                    "listening on",
                    *(["https on"] if srv.relay_https_listen else []),
                    *(["tftp on"] if srv.tftp_listen else []),
                ],
            )
            self.addresses["relay"] = relay.lines["listening on"]
            say(f"relay {self.relay} listening on {self.addresses['relay']}")
            if "https on" in relay.lines:
                self.addresses["relay_https"] = relay.lines["https on"]
                say(f"relay {self.relay} https on {self.addresses['relay_https']}")
            if "tftp on" in relay.lines:
                self.addresses["tftp"] = relay.lines["tftp on"]
                say(f"relay {self.relay} tftp on {self.addresses['tftp']}")
            if nfs_config is not None:
                nfs = self._start("nfs", nfs_config, ["listening on"])
                self.addresses["nfs"] = nfs.lines["listening on"]
                say(f"nfs listening on {self.addresses['nfs']}")
            if dhcp_config is not None:
                dhcp = self._start("dhcp", dhcp_config, ["answering"])
                self.addresses["dhcp"] = dhcp.lines["answering"]
                say(f"dhcp answering {self.addresses['dhcp']}")
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, config: ProcessConfig, expect: list[str]) -> Part:
        """``slim NAME serve --config STATE_DIR/config/NAME.json`` with ``config`` written
        there; returns once it printed each of ``expect`` (raises if it does not)."""
        settings = config.dump(self.state / "config" / f"{name}.json")
        logfile = self.state / "logs" / f"{name}.log"
        with open(logfile, "a") as err:
            proc = subprocess.Popen(
                [*SLIM, name, "serve", "--config", str(settings)],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
            )
        part = Part(name, proc, logfile)
        self.parts.append(part)
        assert proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        # readline() returns at the child's first line or at its exit (EOF); the
        # deadline bounds a child that prints other lines without the expected ones
        while any(p not in part.lines for p in expect) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            for prefix in expect:
                if line.startswith(prefix):
                    part.lines[prefix] = line[len(prefix) :].strip()
        if any(p not in part.lines for p in expect):
            raise Unavailable(f"{name} did not start (log: {logfile}):\n{self.tail(logfile)}")
        return part

    @staticmethod
    def tail(path: Path, lines: int = 15) -> str:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return "  (no log)"
        return "\n".join(f"  {ln}" for ln in text.splitlines()[-lines:])

    # -- run / stop ---------------------------------------------------------------------
    def run(self, stop: threading.Event) -> Part | None:
        """Until ``stop`` is set or a part exits; returns the part that exited."""
        while not stop.wait(0.2):
            for part in self.parts:
                if part.proc.poll() is not None:
                    log.error("%s exited with status %s; stopping the rest", part.name, part.proc.returncode)
                    return part
        return None

    def reload(self) -> None:
        for part in self.parts:
            if part.name in ("core", "nfs", "dhcp") and part.proc.poll() is None:
                part.proc.send_signal(signal.SIGHUP)

    def stop(self, grace: float = 20.0) -> list[str]:
        """Stop every part, last started first; what stopped, as ``NAME (exit STATUS)``."""
        stopped: list[str] = []
        for part in reversed(self.parts):
            if part.proc.poll() is None:
                part.proc.send_signal(signal.SIGTERM)
            try:
                part.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %gs; killing it", part.name, grace)
                part.proc.kill()
                part.proc.wait()
            if part.proc.stdout is not None:
                part.proc.stdout.close()
            stopped.append(f"{part.name} (exit {part.proc.returncode})")
        self.parts.clear()
        return stopped


READY = "ready"  # what `slim serve` prints, after where each part listens, once all are up


def await_ready(stdout: IO[bytes] | IO[str], logs: Path, most: int = 20) -> list[str]:
    """Read a started `slim serve`'s standard output up to its "ready" line and return the
    lines (where each part listens, then "ready").  If it ends first (a part did not start),
    RuntimeError with what it said and the tails of ``logs`` (a log file, or a directory of
    them)."""
    said: list[str] = []
    for _ in range(most):
        raw = stdout.readline()
        line = raw.decode() if isinstance(raw, bytes) else raw
        said.append(line.strip())
        if not line or line.startswith(READY):
            break
    if not said[-1].startswith(READY):
        files = sorted(logs.glob("*.log")) if logs.is_dir() else [logs]
        tails = "".join(p.read_text(errors="replace")[-1500:] for p in files if p.is_file())
        raise RuntimeError(f"slim serve did not start: {said}\n{tails}")
    return said


def serve(registry_path: Path, state_dir: Path | None, log_level: str = "info") -> int:
    """``slim serve``; returns the exit status."""
    server = AllInOne(registry_path, state_dir, log_level)
    stop = threading.Event()
    why: list[str] = []  # the signal that stopped it

    def on_signal(signum: int, _frame: object) -> None:
        why.append(signal.Signals(signum).name)
        stop.set()

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, on_signal),
        signal.SIGINT: signal.signal(signal.SIGINT, on_signal),
        signal.SIGHUP: signal.signal(signal.SIGHUP, lambda *_: server.reload()),
    }
    try:
        server.start(lambda line: print(line, flush=True))
        print(f"{READY} (state in {server.state}, logs in {server.state / 'logs'})", flush=True)
        dead = server.run(stop)
        if dead is not None:
            print(f"slim serve: {dead.name} exited; its log ends:\n{server.tail(dead.log)}", file=sys.stderr)
            return 1
        return 0
    finally:
        stopped = server.stop()
        if stopped:  # what it stopped, last started first (a negative status: killed by that signal)
            cause = f" on {why[0]}" if why else ""
            print(f"slim serve stopped{cause}: {', '.join(stopped)}", flush=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
