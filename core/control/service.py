"""The core's domain: every answer the core gives, independent of transport.

The gRPC servicers in :mod:`slim.core.control.server` parse a request, call one
method here and map the result.  Nothing here imports grpc.

Hot paths (locate, plan, boot script) stay off the database: they read the
registry, caches of next-boot overrides and heartbeats that this class keeps
in step with the database it writes through to (the core is the only
writer), and the store's release refs.  Methods that touch SQLite (marked
*writes*, and the node and event reads) run on one dedicated thread in the
gRPC layer; they take one snapshot of the registry.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from slim.core.control.auth import Kind, NewToken, TokenBook, TokenRecord, new_code, new_token
from slim.core.control.bootscript import LOCAL, Menu, MenuEntry, render_ipxe, render_pxelinux
from slim.core.control.redirect import RankedRelay, Redirector, RelayStatus, parse_origin, relay_status
from slim.core.control.state import BootEvent, NextBoot, RelayBeat, State
from slim.core.pools import opening_at
from slim.core.registry import (
    DirectorySpec,
    Environment,
    IPAddress,
    Node,
    Registry,
    Relay,
    SecretFile,
    load_registry,
    secret_refusal,
)
from slim.core.store import Store
from slim.daemons.ganesha import pseudo_path
from slim.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from slim.release import ManifestDelta, ObjectRef, Release
from slim.signing import Endorsement, Signer
from slim.vocabulary import (
    BOOT_ID_RE,
    LOCAL_STAGE,
    PLAN_STAGE,
    SWITCH_ROOT_STAGE,
    UP_STAGE,
    Policy,
    normalize_mac,
    parse_digest,
    relay_observed,
)

log = logging.getLogger(__name__)

MAX_KERNEL_ARG_RELAYS = 4
MAX_EVENTS_LIMIT = 10_000
ACTIONS_CACHE_SIZE = 4096
MAX_NFS_TREES = 4096  # trees one relay's heartbeat may list
ORPHAN_SECONDS = 600.0  # how long an event naming only an unknown boot id waits for its node
MAX_ORPHANS = 10_000  # ... and how many may wait
DAY = 86400.0
PICKED = "slim.env"  # a plan's reason when the node's kernel named another environment (the menu's pick)
DEFAULT_TOKEN_TTL: dict[Kind, float] = {"admin": 90 * DAY, "node": 3650 * DAY, "code": DAY}
MAX_TOKEN_TTL = 3650 * DAY
MAX_CODE_TTL = 30 * DAY  # a one-time code waits at most this long to be typed
CODE_RETIRES_OTHERS = 3600.0  # a redeemed code: the node's other tokens expire this much later
MAX_ADMIN_TOKEN_TTL = 365 * DAY
AGENT_OR_EE = ("plan", SWITCH_ROOT_STAGE, UP_STAGE)  # a boot with these ran the agent
RETRY_WAIT = 4  # seconds (to twice that, jittered) a boot script waits before asking the relays again


@dataclass(frozen=True)
class NodeRef:
    """A node named by ``name`` or by ``mac`` (exactly one)."""

    name: str = ""
    mac: str = ""


@dataclass(frozen=True)
class Located:
    node: str
    site: str | None
    relays: list[RankedRelay]


@dataclass(frozen=True)
class NfsMount:
    servers: tuple[str, ...]  # every server to try, in order (docs/home.md); at least one
    export: str
    options: str
    tree: str = ""  # "sha256:<hex>" of the tree's manifest (the core's own; not in the plan)

    @property
    def server(self) -> str:
        """The first server to try (what a plan's ``server`` says, for agents that try one)."""
        return self.servers[0]


@dataclass(frozen=True, eq=False)  # identity equality: cached plans share these objects
class DirectoryAction:
    path: str
    policy: Policy
    archive: ObjectRef | None = None
    manifest: ObjectRef | None = None
    nfs: NfsMount | None = None
    tmpfs_size: str = ""
    bytes: int = 0
    files: int = 0
    manifest_raw: str = ""  # sync: "sha256:<hex>" of the manifest decompressed
    deltas: tuple[ManifestDelta, ...] = ()  # sync: the manifest from earlier ones nodes kept
    parts: tuple[ObjectRef, ...] = ()  # the archive's parts (ReleaseDirectory.parts)


@dataclass(frozen=True)
class BootPlan:
    node: str
    environment: str
    release_digest: str
    kernel: ObjectRef
    initrd: ObjectRef
    kernel_args: str
    modules: list[str]
    disk: str
    directories: tuple[DirectoryAction, ...]
    relays: list[RankedRelay]
    reason: str
    site: str | None
    secrets: int = 0  # secret files the node is to ask for (GetNodeSecrets)
    desktop: bool = False  # a harvested desktop: the agent refuses any directory on a disk


@dataclass(frozen=True)
class Secret:
    """A secret file as a node receives it."""

    path: str
    mode: int
    owner: str
    content: bytes = field(repr=False)


@dataclass(frozen=True)
class BootScript:
    node: str
    default_environment: str
    content_type: str
    script: str
    boot_id: str = ""


@dataclass(frozen=True)
class BootStatus:
    """A node's most recent boot (see :func:`boot_status`)."""

    boot_id: str
    environment: str
    state: str  # "booting", "starting", "up", "failed"
    stage: str  # the stage that failed, or the latest one
    message: str
    time: float  # of the latest event
    since: float = 0.0  # when the boot entered its state (the core's clock)
    started: float = 0.0  # when the core heard of the boot first (the core's clock)


def no_report_reason(timeout: float) -> str:
    return f"no report from the environment {timeout:g} s after switch_root"


def boot_status(
    events: list[BootEvent], now: float | None = None, up_timeout: float | None = None
) -> BootStatus | None:
    """The state of one boot from its events (in the order they arrived):

    - ``failed`` if a stage of the agent's failed, or if the environment has not reported ``up``
      ``up_timeout`` seconds after switch_root (the core's clock, from ``now``);
    - ``up`` once the running environment reported in (stage "up");
    - ``starting`` after switch_root: the environment's init runs, it has not reported;
    - ``booting`` until then (firmware, loader, the agent building the environment);
    - ``local`` when the boot menu went to the local disk (the node's own OS: SLIM sees no more).
    """
    if not events:
        return None
    status = _boot_status(events, now, up_timeout)
    return replace(status, started=events[0].received_at)


def _boot_status(events: list[BootEvent], now: float | None, up_timeout: float | None) -> BootStatus:
    last = events[-1]
    env = next((e.environment for e in reversed(events) if e.environment), "")
    # a relay's record of a failed attempt (a 503, a broken download) does not fail the boot:
    # the loader tries again; the agent's stages and the environment's report decide
    failed = next((e for e in events if not e.ok and not relay_observed(e.stage)), None)
    if failed is not None:
        return BootStatus(
            last.boot_id, env, "failed", failed.stage, failed.message, last.time, failed.received_at
        )
    local = next((e for e in events if e.stage == LOCAL_STAGE), None)
    if local is not None and not any(e.stage in AGENT_OR_EE for e in events):  # (a boot that ran
        # the agent did not go to the local disk, whatever a stray request says)
        return BootStatus(last.boot_id, "", "local", last.stage, local.message, last.time, local.received_at)
    up = next((e for e in events if e.stage == UP_STAGE), None)
    if up is not None:
        return BootStatus(last.boot_id, env, "up", last.stage, up.message, last.time, up.received_at)
    started = next((e for e in events if e.stage == SWITCH_ROOT_STAGE), None)
    if started is not None:
        if up_timeout is not None and now is not None and now - started.received_at > up_timeout:
            return BootStatus(
                last.boot_id, env, "failed", UP_STAGE, no_report_reason(up_timeout), last.time,
                started.received_at + up_timeout,
            )  # fmt: skip
        return BootStatus(last.boot_id, env, "starting", last.stage, "", last.time, started.received_at)
    return BootStatus(last.boot_id, env, "booting", last.stage, "", last.time, events[0].received_at)


@dataclass(frozen=True)
class NodeView:
    name: str
    node: Node
    next_boot: NextBoot | None
    next_environment: str
    last_event: BootEvent | None
    boot: BootStatus | None = None


@dataclass(frozen=True)
class EnvironmentView:
    name: str
    env: Environment
    feature: str
    directories: Mapping[str, DirectorySpec]
    release_digest: str | None


@dataclass(frozen=True)
class RelayView:
    name: str
    relay: Relay
    status: RelayStatus
    beat: RelayBeat | None
    nfs_trees: frozenset[str] = frozenset()  # the trees its own ganesha exported at its last beat


class CoreService:
    """The registry, the runtime state and the store, answering questions."""

    def __init__(
        self,
        registry: Registry,
        state: State,
        store: Store,
        redirector: Redirector | None = None,
        clock: Callable[[], float] = time.time,
        registry_path: str | Path | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.registry = registry
        self.signer = signer  # signs boot plans (None: plans go unsigned, and agents refuse them)
        self.registry_path = Path(registry_path) if registry_path else None
        self.state = state
        self.store = store
        self.redirector = redirector or Redirector()
        self.clock = clock
        self._next_boots = state.next_boots()
        self._beats = state.heartbeats()
        self._nfs_trees: dict[str, frozenset[str]] = {}  # relay -> the trees its ganesha exports
        self.tokens = TokenBook(state.tokens())
        # boot id -> (arrived, event) of events that name no node, waiting for one that does
        self._orphans: dict[str, list[tuple[float, BootEvent]]] = {}
        self._orphan_count = 0
        # directory actions per (environment, release, NFS server): the same for
        # every node that boots them, so plans share them (valid for one registry)
        self._actions: dict[tuple[str, str, str | None], tuple[DirectoryAction, ...]] = {}
        self._actions_registry = registry
        # desktop harvesting (slim.core.control.harvest sets these): why a desktop's menu boots
        # its own OS in its window (None: it may boot the EE), and its owner's pick at the menu
        self.desktop_out: Callable[[str, float], str | None] = lambda node, now: None
        self.local_picked: Callable[[str, str, float], None] = lambda node, boot_id, at: None

    # -- registry ------------------------------------------------------------
    def read_registry(self) -> Registry:
        """Load the registry file again (any thread: nothing changes until
        :meth:`use_registry`); raise if it is invalid."""
        if self.registry_path is None:
            raise FailedPrecondition("this core was started without a registry file")
        return load_registry(self.registry_path)

    def use_registry(self, registry: Registry) -> None:
        """Answer from ``registry`` from now on (on the event loop's thread)."""
        self.registry = registry
        log.info("registry reloaded from %s", self.registry_path)

    def reload_registry(self) -> Registry:
        """Load the registry file again and use it; on error keep the current one and raise."""
        registry = self.read_registry()
        self.use_registry(registry)
        return registry

    # Methods that run on the writer thread take one snapshot of the registry
    # (``reg = self.registry``) and use only it: SIGHUP swaps the registry on
    # the event loop thread.

    def _node_name(self, ref: NodeRef, reg: Registry | None = None) -> str:
        reg = reg or self.registry
        if ref.name and ref.mac:
            raise InvalidArgument("name the node by name or by MAC, not both")
        if ref.name:
            reg.node(ref.name)
            return ref.name
        if ref.mac:
            return reg.node_name_by_mac(ref.mac)
        raise InvalidArgument("a node name or MAC is required")

    def next_environment(self, node: str, reg: Registry | None = None) -> tuple[str, str]:
        """(environment the node boots next, why: "next-boot" or "default")."""
        reg = reg or self.registry
        nb = self._next_boots.get(node)
        if nb is not None and nb.environment in reg.environments:
            return nb.environment, "next-boot"
        return reg.node(node).environment, "default"

    # -- redirection ---------------------------------------------------------
    @staticmethod
    def _origin(origin: str) -> IPAddress:
        if not origin:
            raise InvalidArgument("the origin address of the node is required")
        return parse_origin(origin)

    def _rank(self, node: str, address: IPAddress, peek: bool) -> tuple[str | None, list[RankedRelay]]:
        site, relays = self.redirector.rank(
            self.registry,
            self._beats,
            address,
            self.clock(),
            self.registry.node(node).site,
            assign=not peek,
            node=node,
        )
        if not relays:
            raise Unavailable(f"no relay can serve node {node!r} from {address}: none is live")
        return site, relays

    def identify(self, node: str, address: IPAddress, token: str | None, reg: Registry | None = None) -> str:
        """Check that the caller at ``address`` may speak for ``node``: with a token, it must
        be the node's; without one, the site of ``address`` must identify nodes by MAC
        (``node_identity``; addresses of no site: ``settings.node_identity``).  Returns how
        the node was identified (``token`` or ``mac``)."""
        reg = reg or self.registry
        if token:
            self.check_node_token(node, token)
            return "token"
        site = reg.site_of_address(address)
        mode = reg.sites[site].node_identity if site else reg.settings.node_identity
        if mode == "token":
            where = f"site {site!r}" if site else "an address of no site"
            raise Unauthenticated(
                f"node {node} calling from {address} ({where}) must send its node token "
                "(slim node enroll); MAC and name are not accepted there (node_identity: token)"
            )
        return "mac"

    def locate(
        self, ref: NodeRef, origin: str, peek: bool = False, token: str | None = None, vouched: bool = False
    ) -> Located:
        """Ranked relays for the node; ``peek`` (for tools) counts no redirection.  The caller
        must speak for the node (:meth:`identify`) unless ``vouched`` (an admin)."""
        node = self._node_name(ref)
        address = self._origin(origin)
        if not vouched:
            self.identify(node, address, token)
        site, relays = self._rank(node, address, peek)
        return Located(node, site, relays)

    # -- boot plan -----------------------------------------------------------
    def _release(self, env_name: str) -> tuple[str, Release]:
        try:
            found = self.store.release(env_name)
        except (NotFound, InvalidArgument, OSError) as exc:
            # the node asked nothing wrong: the store is broken for this environment
            raise FailedPrecondition(
                f"the release of environment {env_name!r} cannot be read: {exc}"
            ) from None
        if found is None:
            raise FailedPrecondition(
                f"environment {env_name!r} has no release yet; build it with: slim ee build {env_name}"
            )
        return found

    @staticmethod
    def _require_disk(reg: Registry, node: str, env_name: str) -> None:
        needing = reg.environment(env_name).disk_paths()
        pooled = reg.pool_of(node)
        if needing and pooled is not None:
            raise FailedPrecondition(
                f"environment {env_name!r} copies {', '.join(needing)} to disk, but {node!r} is a desktop "
                f"of pool {pooled[0]!r}: its disks are never mounted, formatted or written"
            )
        if needing and not reg.node(node).disk:
            raise FailedPrecondition(
                f"environment {env_name!r} copies {', '.join(needing)} to disk, "
                f"but node {node!r} has no 'disk' partition"
            )

    def _kernel_args(
        self, node: str, env_name: str, release_digest: str, relays: list[RankedRelay], boot_id: str = ""
    ) -> str:
        node_cfg = self.registry.node(node)
        profile = self.registry.profiles[node_cfg.profile]
        env = self.registry.environments[env_name]
        urls = ",".join(r.urls[0] for r in relays[:MAX_KERNEL_ARG_RELAYS])
        parts = [
            f"slim.node={node}",
            f"slim.env={env_name}",
            f"slim.release={release_digest}",
            f"slim.relays={urls}",
            f"slim.boot={boot_id}" if boot_id else "",
            # NFSv4 tells clients apart by this string: home PCs behind one carrier NAT address
            # (and initrds that all call themselves the same) must not share a lease (docs/home.md)
            f"nfs.nfs4_unique_id={node}" if self._uses_nfs(env_name) else "",
            profile.kernel_args,
            env.kernel_args,
        ]
        return " ".join(p for p in parts if p)

    def _uses_nfs(self, env_name: str) -> bool:
        return any(spec.policy is Policy.NFS for spec in self.registry.directories(env_name).values())

    def planned_environment(
        self, node: str, requested: str = "", reg: Registry | None = None
    ) -> tuple[str, str]:
        """(the environment ``node``'s plan is for, why).  ``requested``: the one its kernel
        was booted for (``slim.env``), "" for the core's choice.  A node may boot any
        environment its menu offers (then without secrets: see :meth:`node_secrets`); a
        harvested desktop only its pool's, in its window."""
        reg = reg or self.registry
        desktop = self._desktop_default(node, reg)
        if desktop is not None and desktop[0] != LOCAL:  # in its pool's window: the pool's EE
            env_name, reason = desktop[0], desktop[1]
        else:
            env_name, reason = self.next_environment(node, reg)
        if not requested or requested == env_name:
            return env_name, reason
        if desktop is not None:
            raise FailedPrecondition(
                f"node {node} is a harvested desktop: it boots {env_name} now, not {requested[:63]!r}"
            )
        if requested not in reg.environments:
            raise NotFound(f"unknown environment {requested[:63]!r} (the node's kernel names it)")
        return requested, PICKED

    def boot_plan(
        self,
        ref: NodeRef,
        origin: str,
        peek: bool = False,
        token: str | None = None,
        vouched: bool = False,
        environment: str = "",
    ) -> BootPlan:
        """The node's boot plan; ``peek`` (for tools) counts no redirection; identified as
        :meth:`locate`.  ``environment``: the one its kernel was booted for (picked at its
        menu, which offers every built one); "" for the one the core chooses."""
        node = self._node_name(ref)
        node_cfg = self.registry.node(node)
        address = self._origin(origin)
        if not vouched:
            self.identify(node, address, token)
        env_name, reason = self.planned_environment(node, environment)
        digest, release = self._release(env_name)
        site = self.registry.site_of_address(address) or node_cfg.site
        self._require_disk(self.registry, node, env_name)
        nfs_server = self.registry.nfs_server_for(site)
        key = (env_name, digest, nfs_server)
        if self._actions_registry is not self.registry:
            self._actions.clear()
            self._actions_registry = self.registry
        actions = self._actions.get(key)
        if actions is None:
            actions = tuple(
                self._action(env_name, digest, path, spec, release, nfs_server, site)
                for path, spec in self.registry.directories(env_name).items()
            )
            if len(self._actions) >= ACTIONS_CACHE_SIZE:
                self._actions.clear()
            self._actions[key] = actions
        actions = self._nfs_at_relays(actions, site)
        _, relays = self._rank(node, address, peek)  # last: a refused plan sends nobody anywhere
        profile = self.registry.profiles[node_cfg.profile]
        # secrets go with an environment the registry or an admin gave the node, not with a pick
        secrets = self.secret_files(self.registry, node, env_name) if reason != PICKED else []
        return BootPlan(
            node=node,
            environment=env_name,
            release_digest=digest,
            kernel=release.kernel,
            initrd=release.initrd,
            kernel_args=self._kernel_args(node, env_name, digest, relays),
            modules=list(profile.modules),
            disk=node_cfg.disk or "",
            directories=actions,
            relays=relays,
            reason=reason,
            site=site,
            secrets=len(secrets),
            desktop=self.registry.pool_of(node) is not None,
        )

    def _nfs_at_relays(
        self, actions: tuple[DirectoryAction, ...], site: str | None
    ) -> tuple[DirectoryAction, ...]:
        """NFS mounts with the relays that export their trees first: the site's relays, then
        their parents (registry ``relays.NAME.nfs``), each only while it is live and its last
        heartbeat lists the tree; the site's NFS server last (docs/home.md)."""
        if site is None or not any(a.nfs is not None for a in actions):
            return actions
        reg = self.registry
        now = self.clock()
        live = []
        for name, tier in reg.relays_by_site(site):
            relay = reg.relays[name]
            if tier == "other" or relay.nfs is None:
                continue
            beat = self._beats.get(name)
            if relay_status(beat, now, reg.settings.stale_after) is RelayStatus.LIVE:
                live.append((relay.nfs, self._nfs_trees.get(name, frozenset())))
        if not live:
            return actions
        out = []
        for a in actions:
            if a.nfs is None:
                out.append(a)
                continue
            servers = [host for host, trees in live if a.nfs.tree in trees]
            if not servers:
                out.append(a)
                continue
            servers += [s for s in a.nfs.servers if s not in servers]
            out.append(replace(a, nfs=replace(a.nfs, servers=tuple(servers))))
        return tuple(out)

    # -- secrets -------------------------------------------------------------
    @staticmethod
    def secret_files(reg: Registry, node: str, env_name: str) -> list[SecretFile]:
        """The secret files ``node`` receives booting ``env_name``: the environment's, then
        the node's (a node's file replaces the environment's at the same path)."""
        env = reg.environments[env_name]
        files = {s.path: s for s in env.secrets}
        for secret in reg.node(node).secrets:
            why = secret_refusal(env, secret.path)
            if why:
                raise FailedPrecondition(f"node {node}'s secret cannot go into {env_name}: {why}")
            files[secret.path] = secret
        return list(files.values())

    def node_secrets(
        self, ref: NodeRef, origin: str, token: str | None, environment: str, secure: bool
    ) -> list[Secret]:
        """*reads files* The node's secrets, for the node only (see GetNodeSecrets): with its
        token over TLS, or where its site allows MAC identity for secrets."""
        reg = self.registry
        node = self._node_name(ref, reg)
        address = self._origin(origin)
        how = self.identify(node, address, token, reg)
        env_name = self.planned_environment(node, "", reg)[0]  # the core's choice, never a menu pick
        if environment and environment != env_name:
            raise PermissionDenied(
                f"node {node} boots {env_name}: the secrets of {environment[:63]!r} go only to nodes "
                "given it (the registry, a next boot or a pool; not a pick at the menu)"
            )
        files = self.secret_files(reg, node, env_name)
        if not files:
            return []
        site = reg.site_of_address(address)
        if how == "token" and not secure:
            raise PermissionDenied(
                f"node {node}'s secrets go over TLS only: ask the relay over https:// (this request "
                "came over plain HTTP)"
            )
        if how == "mac" and not (site and reg.sites[site].secrets_without_token):
            where = f"site {site!r}" if site else "an address of no site"
            raise PermissionDenied(
                f"node {node} was identified by its name or MAC at {where}: its secrets go only to a "
                "node that sends its token, unless the site allows it (secrets_without_token: true)"
            )
        out = []
        for f in files:
            try:
                content = Path(f.source).read_bytes()
            except OSError as exc:
                raise FailedPrecondition(
                    f"the secret for {f.path} cannot be read on the core's host ({f.source}: {exc.strerror})"
                ) from None
            out.append(Secret(f.path, int(f.mode, 8), f.owner, content))
        log.info("%d secret file(s) sent to %s (%s, %s)", len(out), node, env_name, how)
        return out

    def _action(
        self,
        env_name: str,
        digest: str,
        path: str,
        spec: DirectorySpec,
        release: Release,
        nfs_server: str | None,
        site: str | None,
    ) -> DirectoryAction:
        """What the agent does with one directory, with the release's objects."""
        built = release.directories.get(path)
        size = (built.bytes, built.files) if built else (0, 0)
        policy = spec.policy
        if policy is Policy.NFS:
            if not nfs_server:
                raise FailedPrecondition(
                    f"{env_name!r} shares {path} over NFS but no NFS server is configured for site "
                    f"{site or '(none)'}; set sites.<site>.nfs_server or settings.nfs_server"
                )
            if built is None or built.manifest is None or built.policy is not Policy.NFS:
                raise self._stale(env_name, digest, path, "NFS tree")
            export = pseudo_path(self.registry.settings.nfs_export_root, built.manifest.digest)
            # relays that export the tree are put first when a plan is made (_nfs_at_relays)
            nfs = NfsMount((nfs_server,), export, spec.nfs_options, built.manifest.digest)
            return DirectoryAction(path, policy, nfs=nfs, bytes=size[0], files=size[1])
        obj = None if built is None else built.archive
        if obj is None:
            raise self._stale(env_name, digest, path, "archive")
        if policy is Policy.SYNC:
            if built is None or built.manifest is None:
                raise self._stale(env_name, digest, path, "manifest")
            # the archive fills an empty disk in one transfer; the manifest brings a
            # filled one up to date file by file
            return DirectoryAction(
                path, policy, archive=obj, manifest=built.manifest, bytes=size[0], files=size[1],
                manifest_raw=built.manifest_raw, deltas=built.deltas, parts=built.parts,
            )  # fmt: skip
        tmpfs = spec.size or "" if policy is Policy.RAM else ""
        return DirectoryAction(
            path,
            policy,
            archive=obj,
            tmpfs_size=tmpfs,
            bytes=size[0],
            files=size[1],
            parts=built.parts if built is not None else (),
        )

    @staticmethod
    def _stale(env_name: str, digest: str, path: str, what: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"release {digest[:19]} of {env_name!r} has no {what} for {path}; "
            f"the registry changed since the build: slim ee build {env_name}"
        )

    def key_endorsements(self) -> list[Endorsement]:
        """The signing key's chain of rotations (boot media follow it): see slim.signing."""
        return self.signer.endorsements() if self.signer else []

    def sign_plan(self, plan: BootPlan, nonce: str) -> tuple[bytes, str]:
        """(the plan's document, the core's signature of it; "" without a key): see
        :mod:`slim.core.control.plandoc`."""
        from slim.core.control.plandoc import plan_document

        if nonce and not BOOT_ID_RE.fullmatch(nonce):
            raise InvalidArgument(f"nonce {nonce[:80]!r} is not 1 to 64 hex digits")
        document = plan_document(plan, nonce, self.clock())
        return document, self.signer.sign(document, f"plan for {plan.node}") if self.signer else ""

    def _desktop_default(self, node: str, reg: Registry | None = None) -> tuple[str, str, float] | None:
        """For a harvested desktop, what its menu boots by default, why, and how long its menu
        waits: its own OS with no menu outside its pool's window (or when SLIM sent it back or
        its owner opted out), else the pool's EE with the pool's short timeout (the owner may
        still pick their own OS).  Its plan follows the same default.  None: not pooled."""
        pooled = (reg or self.registry).pool_of(node)
        if pooled is None:
            return None
        name, pool = pooled
        now = self.clock()
        if opening_at(pool, dt.datetime.fromtimestamp(now, dt.UTC)) is None:
            return LOCAL, f"outside pool {name}'s window", 0.0
        out = self.desktop_out(node, now)
        if out is not None:
            return LOCAL, out, 0.0
        return pool.environment, f"pool {name}'s window", pool.menu_timeout

    # -- boot script ---------------------------------------------------------
    def boot_script(
        self,
        mac: str,
        origin: str,
        fmt: str = "ipxe",
        peek: bool = False,
        token: str | None = None,
        vouched: bool = False,
    ) -> BootScript:
        """The node's boot menu; ``peek`` (for tools) counts no redirection; identified as
        :meth:`locate`."""
        if fmt not in ("ipxe", "pxelinux"):
            raise InvalidArgument(f"unknown boot script format {fmt!r} (ipxe or pxelinux)")
        node = self._node_name(NodeRef(mac=mac))
        node_cfg = self.registry.node(node)
        address = self._origin(origin)
        if not vouched:
            self.identify(node, address, token)
        default, reason = self.next_environment(node)
        timeout = node_cfg.boot_menu_timeout
        desktop = self._desktop_default(node)
        if desktop is not None:  # a harvested desktop: its own OS, but in its pool's window
            default, reason, timeout = desktop
        # the default must be bootable
        releases = {} if default == LOCAL else {default: self._release(default)}
        unbuilt = []
        for env_name in sorted(n for n in self.registry.environments if n != default):
            if desktop is not None:
                break  # a harvested desktop's menu: its pool's EE in the window, and its own OS
            try:
                releases[env_name] = self._release(env_name)
            except FailedPrecondition:
                unbuilt.append(env_name)
        _, relays = self._rank(node, address, peek)
        # the boot this script starts: its kernel, initrd and agent name it (tools peeking: none)
        boot_id = "" if peek else secrets.token_hex(8)
        entries = []
        for env_name, (digest, release) in releases.items():
            title = env_name + (" (next boot)" if env_name == default and reason == "next-boot" else "")
            desc = self.registry.environments[env_name].description
            entries.append(
                MenuEntry(
                    env_name,
                    f"{title} - {desc}" if desc else title,
                    release.kernel.digest,
                    release.initrd.digest,
                    self._kernel_args(node, env_name, digest, relays, boot_id),
                )
            )
        menu = Menu(
            node=node,
            mac=normalize_mac(mac),
            default=default,
            timeout=self.registry.settings.boot_menu_timeout if timeout is None else timeout,
            entries=tuple(entries),
            relay_urls=tuple(r.urls[0] for r in relays),
            unbuilt=tuple(unbuilt),
            boot_id=boot_id,
            retry_wait=RETRY_WAIT + secrets.randbelow(RETRY_WAIT + 1),  # jitter: a storm spreads out
        )
        if fmt == "ipxe":
            return BootScript(node, default, "text/plain; charset=utf-8", render_ipxe(menu), boot_id)
        return BootScript(node, default, "text/plain; charset=utf-8", render_pxelinux(menu), boot_id)

    # -- writes --------------------------------------------------------------
    def set_next_boot(self, node: str, environment: str, set_by: str) -> NodeView:
        """*writes* Make ``environment`` (a name or a feature like ``ee:jdk14``) the
        node's next boot; an empty environment clears the override."""
        reg = self.registry
        reg.node(node)
        if not environment:
            self.state.clear_next_boot(node)
            self._next_boots.pop(node, None)
            return self.node_view(node, reg)
        env_name = reg.resolve_environment(environment)
        self._require_disk(reg, node, env_name)
        self._release(env_name)  # a node must not be sent to an EE that cannot boot
        nb = self.state.set_next_boot(node, env_name, set_by, self.clock())
        self._next_boots[node] = nb
        return self.node_view(node, reg)

    def report_events(
        self,
        events: Iterable[BootEvent],
        tokens: Mapping[int, str] | None = None,
        origins: Mapping[int, str] | None = None,
        from_relay: bool = False,
        keys: Mapping[int, str] | None = None,
    ) -> int:
        """*writes* Record boot events; the number taken.  Every named node must exist.

        An event with a boot id and no node (a relay saw an object URL of that boot
        fetched) joins that boot's node.  When no event names that boot yet (the relay
        that sent the script has not reported it), it waits, in memory, up to
        ``ORPHAN_SECONDS`` for one that does; then it is dropped (anyone can put
        ``?boot=`` on a URL)."""
        reg = self.registry
        now = self.clock()
        self._expire_orphans(now)
        batch: list[BootEvent] = []
        taken = 0
        tokens, origins, keys = tokens or {}, origins or {}, keys or {}
        for index, e in enumerate(events):
            agents = e.stage == PLAN_STAGE and (index in tokens or index in origins)
            if e.boot_key_sha256 and not agents:
                raise InvalidArgument(f"event {index + 1}: only the agent's own plan event registers a key")
            if index in origins or index in tokens or index in keys:  # a node's own: is it that node?
                if not e.node:
                    raise InvalidArgument(f"event {index + 1}: a node's own event must name the node")
                reg.node(e.node)
                if index in tokens:
                    self.check_node_token(e.node, tokens[index])
                elif index in keys:  # the running environment's own report, proved by its boot key
                    if e.stage != UP_STAGE:
                        raise PermissionDenied(
                            f"event {index + 1}: a boot key proves only the environment's report that "
                            f"it is up, not a {e.stage[:40]!r} event"
                        )
                    try:
                        self.check_boot_key(e.node, e.boot_id, keys[index])
                    except Unauthenticated:  # a lost registration: where the site's rule allows, that
                        if index not in origins:
                            raise
                        self.identify(e.node, self._origin(origins[index]), None, reg)
                else:
                    self.identify(e.node, self._origin(origins[index]), None, reg)
                if e.boot_key_sha256:  # the agent's plan event: a boot of this node, keyed once
                    self._may_key(index, e)
            elif from_relay and not relay_observed(e.stage):
                raise InvalidArgument(
                    f"event {index + 1}: stage {e.stage[:40]!r} is a node's, and comes with the node's "
                    "address or token: a relay vouches only for what it saw itself (tftp, script, "
                    "kernel, initrd)"
                )
            if not e.node and e.boot_id:
                node = self.state.node_of_boot(e.boot_id) or next(
                    (b.node for b in batch if b.boot_id == e.boot_id), None
                )
                if node is None:
                    if self._orphan_count < MAX_ORPHANS:
                        self._orphans.setdefault(e.boot_id, []).append((now, e))
                        self._orphan_count += 1
                        taken += 1
                    continue
                e = replace(e, node=node)
            reg.node(e.node)
            batch.append(e)
        for e in list(batch):  # events that waited for their boot's node
            waiting = self._orphans.pop(e.boot_id, None) if e.boot_id else None
            if waiting:
                self._orphan_count -= len(waiting)
                batch.extend(replace(o, node=e.node) for _, o in waiting)
        if batch:
            self.state.add_boot_events(batch, now)
            for e in batch:
                if e.stage == LOCAL_STAGE and e.node and not self._ran_agent(e.boot_id):
                    self.local_picked(e.node, e.boot_id, now)
        return taken + len(batch)

    def node_boot(
        self, ref: NodeRef, origin: str, token: str | None, boot_id: str, secure: bool, boot_key: str = ""
    ) -> tuple[str, str]:
        """(node, boot id) of a running environment asking for its order, identified by its
        boot key, or as for a plan (its token over TLS, or its MAC and address where the site
        allows)."""
        reg = self.registry
        node = self._node_name(ref, reg)
        if not BOOT_ID_RE.fullmatch(boot_id):
            raise InvalidArgument("the running boot's id (slim.boot=) is required: 1 to 64 hex digits")
        if token and not secure:
            raise InvalidArgument("a node's token goes to its relay over HTTPS only")
        if boot_key:  # the running environment proves its boot (its token stayed in the initrd)
            try:
                self.check_boot_key(node, boot_id, boot_key)
                return node, boot_id
            except Unauthenticated:  # a lost registration: where the site's rule allows, that
                if token:
                    raise
        self.identify(node, self._origin(origin), token, reg)
        return node, boot_id

    def _ran_agent(self, boot_id: str) -> bool:
        """Whether the boot got as far as the agent (its menu did not go to the local disk)."""
        return any(e.stage in AGENT_OR_EE for e in self.state.boot(boot_id))

    def pooled_boots(self) -> dict[str, BootStatus | None]:
        """Every pooled desktop's latest boot (reads the database)."""
        reg = self.registry
        boots = self.state.latest_boots()
        return {n: self._status(reg, boots.get(n, [])) for n in reg.nodes if reg.pool_of(n) is not None}

    # -- tokens --------------------------------------------------------------
    def issue_token(
        self, kind: Kind, name: str, ttl: float | None, retire_others_after: float = 0
    ) -> NewToken:
        """*writes* A new ``kind`` token for ``name`` (a node of the registry, for a node
        token); ``ttl`` seconds (None: the default).  With ``retire_others_after``, the
        name's other tokens of that kind expire that many seconds from now (rotation)."""
        if kind in ("node", "code"):
            self.registry.node(name)
        elif not name or len(name) > 63 or not name.isprintable():
            raise InvalidArgument(f"admin name {name[:80]!r}: give 1 to 63 printable characters")
        longest = {"admin": MAX_ADMIN_TOKEN_TTL, "node": MAX_TOKEN_TTL, "code": MAX_CODE_TTL}[kind]
        if ttl is None:
            ttl = DEFAULT_TOKEN_TTL[kind]
        elif not 0 < ttl <= longest:
            raise InvalidArgument(
                f"a {kind} token's lifetime must be between 0 and {longest:g} s, not {ttl:g}"
            )
        if not 0 <= retire_others_after <= MAX_TOKEN_TTL:  # NaN fails too
            raise InvalidArgument(f"retire_others_after {retire_others_after:g} s is out of range")
        now = self.clock()
        new = new_code(name, now, ttl) if kind == "code" else new_token(kind, name, now, ttl)
        self.state.add_token(new.record)
        self.tokens.put(new.record)
        if retire_others_after:
            until = now + retire_others_after
            for r in self.tokens.records():
                mine = r.kind == kind and r.name == name and r.id != new.record.id and r.revoked_at is None
                if mine and (r.expires is None or r.expires > until):
                    self.state.expire_token(r.id, until)
                    self.tokens.put(replace(r, expires=until))
        return new

    def redeem_code(self, code: str) -> tuple[str, NewToken]:
        """*writes* A generic boot medium's first boot (docs/home.md): the one-time ``code``
        becomes a node token for the node it was issued for; the code is used up.  (node,
        the new token); UNAUTHENTICATED for a code that is unknown, used or expired."""
        record = self.tokens.code(code, self.clock())
        self.registry.node(record.name)  # a node the registry no longer has: NotFound
        now = self.clock()
        self.state.revoke_tokens([record.id], now)
        self.tokens.put(replace(record, revoked_at=now))
        # a new medium for the node: its other tokens expire within the hour (slim node enroll --rotate)
        token = self.issue_token("node", record.name, None, retire_others_after=CODE_RETIRES_OTHERS)
        log.info("one-time code %s of %s used: node token %s issued", record.id, record.name, token.record.id)
        return record.name, token

    def list_tokens(self, kind: Kind | None = None, name: str = "") -> list[TokenRecord]:
        return [r for r in self.tokens.records() if kind in (None, r.kind) and name in ("", r.name)]

    def revoke_tokens(
        self, token_id: str = "", kind: Kind | None = None, name: str = ""
    ) -> list[TokenRecord]:
        """*writes* Revoke one token (by id) or every token of ``kind`` and ``name``; a node's
        one-time codes go with its node tokens."""
        kinds = {kind, "code"} if kind == "node" else {kind}
        if token_id:
            hit = [r for r in self.tokens.records() if r.id == token_id and (kind is None or r.kind in kinds)]
        elif kind and name:
            hit = [r for r in self.tokens.records() if r.kind in kinds and r.name == name]
        else:
            raise InvalidArgument("name the token by id, or by kind and name")
        hit = [r for r in hit if r.revoked_at is None]
        if not hit:
            raise NotFound(f"no unrevoked token {token_id or f'{kind}:{name}'}")
        now = self.clock()
        self.state.revoke_tokens([r.id for r in hit], now)
        revoked = [replace(r, revoked_at=now) for r in hit]
        for r in revoked:
            self.tokens.put(r)
        return revoked

    def _may_key(self, index: int, e: BootEvent) -> None:
        """PERMISSION_DENIED unless event ``e`` may register its boot key: the boot is no other
        node's, and has no other key (the same one again is the agent sending its event again)."""
        owner = self.state.node_of_boot(e.boot_id)
        if owner not in (None, e.node):
            raise PermissionDenied(f"event {index + 1}: boot {e.boot_id[:64]} is another node's")
        known = self.state.boot_key_sha256(e.boot_id, e.node)
        if known and known != e.boot_key_sha256:
            raise PermissionDenied(f"event {index + 1}: boot {e.boot_id[:64]} has its key already")

    def check_boot_key(self, node: str, boot_id: str, key: str) -> None:
        """Raise UNAUTHENTICATED unless ``key`` is the boot key ``node``'s agent registered for
        boot ``boot_id`` (its plan event: :attr:`BootEvent.boot_key_sha256`), and that boot is
        the newest the node's agent registered a key for: an environment the node has since
        booted out of proves nothing."""
        found = self.state.boot_key_sha256(boot_id, node) if BOOT_ID_RE.fullmatch(boot_id) else ""
        digest = hashlib.sha256(key.encode()).hexdigest()
        if not found or not hmac.compare_digest(found, digest):
            raise Unauthenticated(f"the boot key does not prove boot {boot_id[:64]} of node {node}")
        if self.state.newest_keyed_boot(node) != boot_id:
            raise Unauthenticated(f"boot {boot_id[:64]} is no longer node {node}'s: it has booted since")

    def check_node_token(self, node: str, token: str) -> None:
        """Raise unless ``token`` is a valid token of ``node`` (UNAUTHENTICATED, or
        PERMISSION_DENIED for another node's token)."""
        record = self.tokens.check(token, "node", self.clock())
        if record.name != node:
            raise PermissionDenied(f"node token {record.id} is {record.name}'s, not {node}'s")

    def _expire_orphans(self, now: float) -> None:
        for boot_id in [b for b, waiting in self._orphans.items() if now - waiting[0][0] > ORPHAN_SECONDS]:
            gone = self._orphans.pop(boot_id)
            self._orphan_count -= len(gone)
            log.info("dropped %d boot event(s) of boot %s: no event named its node", len(gone), boot_id[:16])

    def heartbeat(
        self,
        relay: str,
        load: float,
        active: int,
        egress: float,
        cache: int,
        healthy: bool,
        message: str,
        nfs_trees: Sequence[str] = (),
    ) -> float:
        """*writes* Record a relay's beat; return the interval until the next one.
        ``nfs_trees``: the trees its own ganesha exports now (kept in memory only)."""
        if relay not in self.registry.relays:
            raise NotFound(f"unknown relay {relay!r}; add it to the registry's relays")
        if len(nfs_trees) > MAX_NFS_TREES:
            raise InvalidArgument(
                f"a heartbeat lists at most {MAX_NFS_TREES} NFS trees, not {len(nfs_trees)}"
            )
        trees = frozenset(f"sha256:{parse_digest(t)}" for t in nfs_trees)
        for name, value in (("load", load), ("egress_bytes_per_second", egress)):
            if not (value >= 0 and value < float("inf")):
                raise InvalidArgument(f"heartbeat {name} must be a finite number >= 0, not {value}")
        beat = RelayBeat(relay, load, active, egress, min(cache, 2**63 - 1), healthy, message, self.clock())
        self.state.record_heartbeat(beat)
        self._beats[relay] = beat
        self._nfs_trees[relay] = trees
        return self.registry.settings.heartbeat_interval

    # -- relays: pins and prefetch -------------------------------------------
    def release_signatures(self) -> dict[str, str]:
        """Every environment's current release: digest -> the core's signature of it ("" if
        the build did not sign it: relays then neither pin nor warm it)."""
        out = {}
        for name in sorted(self.registry.environments):
            digest = self.store.release_digest(name)
            if digest is not None:
                out[digest] = self.store.release_signature(name)
        return out

    def prefetch_targets(
        self, environment: str, relays: Iterable[str], nodes: Iterable[str]
    ) -> tuple[str, str, list[str]]:
        """(current release digest of ``environment``, the core's signature of it, relays to
        warm it).

        Named relays; plus, for each node, its site's relays (for a site without
        relays: the site's parents, else every relay); with neither, every relay."""
        reg = self.registry
        relays, nodes = list(relays), list(nodes)
        reg.environment(environment)
        digest = self.store.release_digest(environment)
        if digest is None:
            raise FailedPrecondition(
                f"environment {environment!r} has no release yet; run slim ee build {environment}"
            )
        chosen: list[str] = []
        for name in relays:
            if name not in reg.relays:
                raise NotFound(f"unknown relay {name!r}")
            chosen.append(name)
        for node in nodes:
            site = reg.node(node).site
            tiers = reg.relays_by_site(site)
            for tier in ("site", "parent", "other"):
                names = [n for n, t in tiers if t == tier]
                if names:
                    chosen.extend(names)
                    break
        if not relays and not nodes:
            chosen = sorted(reg.relays)
        return digest, self.store.release_signature(environment), list(dict.fromkeys(chosen))

    # -- admin reads ---------------------------------------------------------
    def node_view(self, node: str, reg: Registry | None = None) -> NodeView:
        reg = reg or self.registry
        cfg = reg.node(node)
        env, _ = self.next_environment(node, reg)
        boot = self.state.latest_boots(node).get(node, [])
        return NodeView(
            node, cfg, self._next_boots.get(node), env, boot[-1] if boot else None, self._status(reg, boot)
        )

    def _status(self, reg: Registry, events: list[BootEvent]) -> BootStatus | None:
        """:func:`boot_status` with the environment's time to report ``up``."""
        env = next((e.environment for e in reversed(events) if e.environment), "")
        return boot_status(events, self.clock(), reg.up_timeout(env))

    def list_nodes(self, group: str = "") -> list[NodeView]:
        reg = self.registry
        boots = self.state.latest_boots()
        out = []
        for name, cfg in sorted(reg.nodes.items()):
            if group and group not in cfg.groups:
                continue
            env, _ = self.next_environment(name, reg)
            boot = boots.get(name, [])
            last = boot[-1] if boot else None
            out.append(NodeView(name, cfg, self._next_boots.get(name), env, last, self._status(reg, boot)))
        return out

    def get_node(self, ref: NodeRef) -> NodeView:
        reg = self.registry
        return self.node_view(self._node_name(ref, reg), reg)

    def environment_view(self, name: str) -> EnvironmentView:
        env = self.registry.environment(name)
        return EnvironmentView(
            name,
            env,
            self.registry.feature_of(name),
            self.registry.directories(name),
            self.store.release_digest(name),
        )

    def list_environments(self) -> list[EnvironmentView]:
        return [self.environment_view(n) for n in sorted(self.registry.environments)]

    def list_relays(self) -> list[RelayView]:
        now = self.clock()
        stale_after = self.registry.settings.stale_after
        return [
            RelayView(
                name,
                relay,
                relay_status(self._beats.get(name), now, stale_after),
                self._beats.get(name),
                self._nfs_trees.get(name, frozenset()),
            )
            for name, relay in sorted(self.registry.relays.items())
        ]

    def list_events(self, node: str = "", limit: int = 0, boot_id: str = "") -> list[BootEvent]:
        """The newest events (of one node, or all), newest first; or with ``boot_id`` every
        event of one boot, oldest first (``latest``: the node's latest boot)."""
        if node:
            self.registry.node(node)
        if limit > MAX_EVENTS_LIMIT:
            raise InvalidArgument(f"limit {limit} is above the maximum of {MAX_EVENTS_LIMIT}")
        if boot_id == "latest":
            if not node:
                raise InvalidArgument("boot id 'latest' needs a node")
            latest = self.state.latest_boots(node).get(node, [])
            return [e for e in self.state.boot(latest[-1].boot_id) if e.node == node] if latest else []
        if boot_id:
            events = self.state.boot(boot_id)
            if node:
                events = [e for e in events if e.node == node]
            return events[: limit or MAX_EVENTS_LIMIT]
        return self.state.boot_events(node or None, limit or 100)
