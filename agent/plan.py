"""The kernel command line and the boot plan, parsed and checked.

Standard library only (this runs in the initrd).  The relay hands the plan
over as JSON (docs/relay.md); nothing in it is trusted: every directory must
be an absolute, normalised path, digests must look like digests, and the
policies must be known.  A plan that names a path outside what it manages
(``..``, a relative path, a path twice) is refused before anything is done.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from slim.agent.value import Value

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
BOOT_ID_RE = re.compile(r"[0-9a-f]{1,64}")  # copies of slim.vocabulary's (the agent: stdlib only)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MAX_NFS_SERVERS = 16
MAX_DELTAS = 8  # manifest deltas per directory (the core builds a few: slim.core.build.release)
MAX_PARTS = 1024  # parts of one archive, at most (slim.release.MAX_PARTS)
NFS_HOST_RE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9.:-]{0,252}"
)  # a host name or an address: no option can ride along
POLICIES = ("ram", "disk", "sync", "nfs")  # slim.vocabulary.Policy's names (the agent: stdlib only)
MAX_PLAN_BYTES = 4 << 20
DEFAULT_DEADLINE = 900.0  # seconds a boot's fetches may wait for busy relays (slim.deadline=)
RELAY_URL_RE = re.compile(r"https?://[^/\s]+")  # a relay's base URL (https: see slim.agent.fetch)
HTTP_SCHEMES = ("http://", "https://")
MEDIUM_ID_RE = re.compile(r"[0-9a-f]{8,32}")  # a boot medium's id (slim media build)
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TOKEN_FILE = Path("/etc/slim/node.token")  # where boot media put a node's token in its initrd


class PlanError(ValueError):
    """The plan (or command line) is unusable; the message names what is wrong."""


def read_token(path: Path | None, default: bool) -> str:
    """The node's token from ``path`` (or, on a real boot, :data:`TOKEN_FILE` if present);
    "" if none: the node is then identified by its name or MAC, where its site allows it."""
    if path is None:
        if not default or not TOKEN_FILE.exists():
            return ""
        path = TOKEN_FILE
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise PlanError(f"the node token {path}: {exc.strerror}") from None
    if not token or len(token) > 256 or not token.isascii() or not token.isprintable() or " " in token:
        raise PlanError(f"the node token in {path} is not a SLIM token (slim node enroll prints one)")
    return token


def parse_cmdline(text: str) -> dict[str, str]:
    """Linux's rules: words split on whitespace; double quotes group (anywhere in
    a word) and are removed; ``key=value`` or a bare ``key`` (value "")."""
    out: dict[str, str] = {}
    word: list[str] = []
    quoted = False
    started = False
    for ch in text + " ":
        if ch == '"':
            quoted = not quoted
            started = True
            continue
        if ch.isspace() and not quoted:
            if started:
                key, _, value = "".join(word).partition("=")
                out[key] = value
            word, started = [], False
            continue
        word.append(ch)
        started = True
    return out


class BootArgs(Value):
    """What the agent takes from the kernel command line (set by the core's boot script)."""

    __slots__ = ("boot_id", "cache", "deadline", "environment", "init", "medium", "node", "relays", "release")

    def __init__(
        self,
        node: str,
        environment: str,
        release: str,
        relays: tuple[str, ...],
        init: str = "/sbin/init",  # what switch_root starts in the EE (slim.init=)
        deadline: float = DEFAULT_DEADLINE,  # seconds for the boot's fetches (slim.deadline=)
        boot_id: str = "",  # the core's id for this boot (slim.boot=, from the boot script)
        cache: str = "",  # a boot medium's cache partition, by its filesystem UUID (slim.cache=)
        medium: str = "",  # the boot medium's id (slim.medium=): its image starts the cache's disk
    ) -> None:
        self.node = node
        self.environment = environment
        self.release = release
        self.relays = relays
        self.init = init
        self.deadline = deadline
        self.boot_id = boot_id
        self.cache = cache
        self.medium = medium

    @classmethod
    def from_cmdline(cls, text: str) -> BootArgs:
        args = parse_cmdline(text)
        missing = [k for k in ("slim.node", "slim.relays") if not args.get(k)]
        if missing:
            raise PlanError(f"kernel command line lacks {', '.join(missing)}")
        relays = tuple(u.rstrip("/") for u in args["slim.relays"].split(",") if u)
        for u in relays:
            if not RELAY_URL_RE.fullmatch(u):
                raise PlanError(f"slim.relays: {u!r} is not an http://HOST:PORT (or https://) URL")
        environment = args.get("slim.env", "")
        if environment and not NAME_RE.fullmatch(environment):
            raise PlanError(f"slim.env: {environment[:80]!r} is not an environment's name")
        release = args.get("slim.release", "")
        if release and not DIGEST_RE.fullmatch(release):
            raise PlanError(f"slim.release: {release!r} is not a sha256 digest")
        init = args.get("slim.init", "/sbin/init")
        if not init.startswith("/"):
            raise PlanError(f"slim.init: {init!r} is not an absolute path")
        deadline = _seconds(args.get("slim.deadline", ""), "slim.deadline", DEFAULT_DEADLINE)
        boot_id = args.get("slim.boot", "")
        if boot_id and not BOOT_ID_RE.fullmatch(boot_id):
            raise PlanError(f"slim.boot: {boot_id[:80]!r} is not a boot id (1 to 64 hex digits)")
        cache = args.get("slim.cache", "")
        if cache and not UUID_RE.fullmatch(cache):
            raise PlanError(f"slim.cache: {cache[:80]!r} is not a filesystem UUID")
        medium = args.get("slim.medium", "")
        if medium and not MEDIUM_ID_RE.fullmatch(medium):
            raise PlanError(f"slim.medium: {medium[:80]!r} is not a medium's id")
        return cls(args["slim.node"], environment, release, relays, init, deadline, boot_id, cache, medium)


def _seconds(text: str, key: str, default: float) -> float:
    """A positive number of seconds (``900``, ``1.5``); ``default`` when empty."""
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise PlanError(f"{key}: {text!r} is not a positive number of seconds")
    return value


class ObjectRef(Value):
    """An object by its digest (``sha256:<hex>``) and size."""

    __slots__ = ("digest", "size")

    def __init__(self, digest: str, size: int) -> None:
        self.digest = digest
        self.size = size

    @property
    def hex(self) -> str:
        return self.digest[7:]


class NfsMount(Value):
    """A read-only NFS mount in a plan: the export and the servers to try, in order."""

    __slots__ = ("export", "options", "server", "servers")

    def __init__(
        self,
        server: str,
        export: str,
        options: str,
        servers: tuple[str, ...],  # every server to try, in order (a core from before lists none: [server])
    ) -> None:
        self.server = server
        self.export = export
        self.options = options
        self.servers = servers


class ManifestDelta(Value):
    """The directory's manifest as a delta from an earlier one (``base``: "sha256:<hex>" of
    that manifest's bytes): ``zstd -d --patch-from`` of the object ``delta``."""

    __slots__ = ("base", "delta")

    def __init__(self, base: str, delta: ObjectRef) -> None:
        self.base = base
        self.delta = delta


class Directory(Value):
    """One directory of the environment in a plan: its policy and the objects it is built from."""

    __slots__ = (
        "archive",
        "bytes",
        "deltas",
        "files",
        "manifest",
        "manifest_raw",
        "nfs",
        "parts",
        "path",
        "policy",
        "tmpfs_size"
    )  # fmt: skip

    def __init__(
        self,
        path: str,  # absolute and normalised; "/" is everything no other entry covers
        policy: str,
        archive: ObjectRef | None,
        manifest: ObjectRef | None,
        nfs: NfsMount | None,
        tmpfs_size: str,
        bytes: int,
        files: int,
        manifest_raw: str = "",  # "sha256:<hex>" of the manifest's bytes (a core from before: "")
        deltas: tuple[ManifestDelta, ...] = (),
        # the archive's parts, in order (each a range of it, with its own digest), which may
        # be fetched and unpacked side by side; () when it is one stream
        parts: tuple[ObjectRef, ...] = (),
    ) -> None:
        self.path = path
        self.policy = policy
        self.archive = archive
        self.manifest = manifest
        self.nfs = nfs
        self.tmpfs_size = tmpfs_size
        self.bytes = bytes
        self.files = files
        self.manifest_raw = manifest_raw
        self.deltas = deltas
        self.parts = parts

    @property
    def rel(self) -> str:
        """The path relative to the EE's root ("" for "/")."""
        return self.path.lstrip("/")


class Plan(Value):
    """A node's plan, parsed and checked (:func:`parse_plan`): what to build and from where."""

    __slots__ = (
        "desktop",
        "directories",
        "disk",
        "environment",
        "http_relays",
        "https_relays",
        "initrd",
        "kernel",
        "kernel_args",
        "modules",
        "node",
        "relay_time",
        "relays",
        "release_digest",
        "secrets",
    )  # fmt: skip

    def __init__(
        self,
        node: str,
        environment: str,
        release_digest: str,
        kernel: ObjectRef | None,
        initrd: ObjectRef | None,
        modules: tuple[str, ...],
        disk: str,
        directories: tuple[Directory, ...],  # parents before children
        relays: tuple[str, ...],  # first URL of each ranked relay, best first
        relay_time: float | None = None,  # the relay's clock when it sent the plan
        https_relays: tuple[str, ...] = (),  # the first https:// URL of each ranked relay that has one
        http_relays: tuple[str, ...] = (),  # the first http:// URL of each ranked relay that has one
        secrets: int = 0,  # secret files to ask the relays for (GET /v1/nodes/{node}/secrets)
        desktop: bool = False,  # a harvested desktop: nothing of it goes on a disk
        kernel_args: str = "",  # the release kernel's command line (what a boot medium kexecs it with)
    ) -> None:
        self.node = node
        self.environment = environment
        self.release_digest = release_digest
        self.kernel = kernel
        self.initrd = initrd
        self.modules = modules
        self.disk = disk
        self.directories = directories
        self.relays = relays
        self.relay_time = relay_time
        self.https_relays = https_relays
        self.http_relays = http_relays
        self.secrets = secrets
        self.desktop = desktop
        self.kernel_args = kernel_args

    def object_digests(self) -> set[str]:
        """The hex digests of the objects the plan names (kernel, initrd, archives, manifests
        and their deltas)."""
        refs = [self.kernel, self.initrd, *(r for d in self.directories for r in (d.archive, d.manifest))]
        refs += [delta.delta for d in self.directories for delta in d.deltas]
        return {r.hex for r in refs if r is not None}


def _ref(value: object, where: str) -> ObjectRef | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PlanError(f"{where}: expected an object")
    digest, size = value.get("digest"), value.get("size")
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise PlanError(f"{where}: {digest!r} is not a sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise PlanError(f"{where}: size must be a whole number >= 0")
    return ObjectRef(digest, size)


def _parts(value: object, archive: ObjectRef | None, where: str) -> tuple[ObjectRef, ...]:
    """An archive's parts: ranges of it, in order, that add up to it."""
    if not isinstance(value, list) or len(value) > MAX_PARTS:
        raise PlanError(f"{where}: parts must be a list of at most {MAX_PARTS}")
    parts = []
    for j, item in enumerate(value):
        ref = _ref(item, f"{where}: part {j + 1}")
        if ref is None or ref.size == 0:
            raise PlanError(f"{where}: part {j + 1} must name a digest and a size > 0")
        parts.append(ref)
    if parts and (archive is None or sum(p.size for p in parts) != archive.size):
        raise PlanError(f"{where}: the archive's parts do not add up to its size")
    return tuple(parts)


def check_path(path: object) -> str:
    """An absolute, normalised directory path inside the EE."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise PlanError(f"directory {path!r} is not an absolute path")
    if path != "/" and (
        path.endswith("/") or any(p in ("", ".", "..") for p in path[1:].split("/")) or "\0" in path
    ):
        raise PlanError(f"directory {path!r} is not a normalised path inside the environment")
    return path


def _text(rec: dict[str, object], key: str, where: str) -> str:
    value = rec.get(key, "")
    if not isinstance(value, str):
        raise PlanError(f"{where}: {key} must be a string")
    return value


def _count(rec: dict[str, object], key: str, where: str) -> int:
    value = rec.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PlanError(f"{where}: {key} must be a whole number >= 0")
    return value


def _desktop(doc: dict[str, object], dirs: list[Directory]) -> bool:
    """Whether the plan is a harvested desktop's; such a plan with a disk or sync directory
    is refused (the core never sends one: this is the agent's own check)."""
    desktop = doc.get("desktop", False)
    if not isinstance(desktop, bool):
        raise PlanError("plan: desktop must be true or false")
    on_disk = [d.path for d in dirs if d.policy in ("disk", "sync")]
    if desktop and on_disk:
        raise PlanError(
            f"plan: this node is a harvested desktop, whose disks are never touched, but the plan "
            f"puts {', '.join(on_disk)} on its disk"
        )
    return desktop


def require_environment(plan: Plan, boot: BootArgs) -> None:
    """The plan must be for the environment the kernel was booted for (``slim.env``, the
    menu's pick), when the command line names one: its kernel and initrd are that one's."""
    if boot.environment and plan.environment != boot.environment:
        raise PlanError(
            f"the plan is for {plan.environment!r}, the kernel was booted for {boot.environment!r} (slim.env)"
        )


def parse_plan(data: bytes) -> Plan:
    """The plan in ``data`` (JSON), checked; PlanError says what is wrong."""
    if len(data) > MAX_PLAN_BYTES:
        raise PlanError(f"plan larger than {MAX_PLAN_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PlanError(f"plan is not JSON: {exc}") from None
    except RecursionError:
        raise PlanError("plan is not JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise PlanError("plan is not a JSON object")
    dirs_in = doc.get("directories")
    if not isinstance(dirs_in, list) or not dirs_in:
        raise PlanError("plan has no directories")
    dirs: list[Directory] = []
    seen: set[str] = set()
    for i, rec in enumerate(dirs_in):
        where = f"directory {i + 1}"
        if not isinstance(rec, dict):
            raise PlanError(f"{where}: expected an object")
        path = check_path(rec.get("path"))
        where = f"directory {path}"
        if path in seen:
            raise PlanError(f"{where} appears twice")
        seen.add(path)
        policy = rec.get("policy")
        if policy not in POLICIES:
            raise PlanError(f"{where}: unknown policy {policy!r}")
        archive = _ref(rec.get("archive"), f"{where}: archive")
        manifest = _ref(rec.get("manifest"), f"{where}: manifest")
        nfs_in = rec.get("nfs")
        nfs = None
        if policy == "nfs":
            if not isinstance(nfs_in, dict):
                raise PlanError(f"{where}: an nfs directory needs its mount")
            server = _text(nfs_in, "server", where)
            servers_in = nfs_in.get("servers", [server])
            if (
                not isinstance(servers_in, list)
                or not 1 <= len(servers_in) <= MAX_NFS_SERVERS
                or not all(isinstance(h, str) and NFS_HOST_RE.fullmatch(h) for h in servers_in)
            ):
                raise PlanError(
                    f"{where}: nfs servers must be a list of 1 to {MAX_NFS_SERVERS} host names or addresses"
                )
            nfs = NfsMount(
                server, _text(nfs_in, "export", where), _text(nfs_in, "options", where), tuple(servers_in)
            )
            if not NFS_HOST_RE.fullmatch(nfs.server) or not nfs.export.startswith("/"):
                raise PlanError(f"{where}: nfs mount needs a server and an absolute export path")
        elif policy in ("ram", "disk") and archive is None:
            raise PlanError(f"{where}: a {policy} directory needs its archive")
        elif policy == "sync" and manifest is None:
            raise PlanError(f"{where}: a sync directory needs its manifest")
        manifest_raw = _text(rec, "manifest_raw", where)
        if manifest_raw and not DIGEST_RE.fullmatch(manifest_raw):
            raise PlanError(f"{where}: manifest_raw {manifest_raw[:80]!r} is not a sha256 digest")
        deltas_in = rec.get("deltas", [])
        if not isinstance(deltas_in, list) or len(deltas_in) > MAX_DELTAS:
            raise PlanError(f"{where}: deltas must be a list of at most {MAX_DELTAS}")
        deltas = []
        for j, item in enumerate(deltas_in):
            base = item.get("base") if isinstance(item, dict) else None
            if not isinstance(base, str) or not DIGEST_RE.fullmatch(base):
                raise PlanError(f"{where}: delta {j + 1}: base must be a sha256 digest")
            ref = _ref(item.get("delta"), f"{where}: delta {j + 1}")
            if ref is None:
                raise PlanError(f"{where}: delta {j + 1} names no object")
            deltas.append(ManifestDelta(base, ref))
        parts = _parts(rec.get("parts", []), archive, where)
        size = _text(rec, "tmpfs_size", where)
        # the core sends slim.vocabulary.tmpfs_size's kernel spelling; checked here by a copy
        if size and not re.fullmatch(r"\d+[kmgKMG%]?", size):
            raise PlanError(f"{where}: tmpfs_size {size!r} is not a size")
        dirs.append(
            Directory(
                path,
                str(policy),
                archive,
                manifest,
                nfs,
                size,
                _count(rec, "bytes", where),
                _count(rec, "files", where),
                manifest_raw,
                tuple(deltas),
                parts,
            )
        )
    if "/" not in seen:
        raise PlanError("plan does not say what to do with / (the root)")
    dirs.sort(key=lambda d: (d.path.count("/") if d.path != "/" else 0, d.path))
    relays: list[str] = []
    https_relays: list[str] = []
    http_relays: list[str] = []
    relays_in = doc.get("relays", [])
    if not isinstance(relays_in, list):
        raise PlanError("plan: relays must be a list")
    for r in relays_in:
        urls = r.get("urls") if isinstance(r, dict) else None
        if isinstance(urls, list) and urls and isinstance(urls[0], str) and urls[0].startswith(HTTP_SCHEMES):
            relays.append(urls[0].rstrip("/"))
        for scheme, into in (("https://", https_relays), ("http://", http_relays)):
            found = (
                next((u for u in urls if isinstance(u, str) and u.startswith(scheme)), None)
                if isinstance(urls, list)
                else None
            )
            if found is not None:
                into.append(found.rstrip("/"))
    modules = doc.get("modules", [])
    if not isinstance(modules, list) or not all(
        isinstance(m, str) and re.fullmatch(r"[\w-]+", m) for m in modules
    ):
        raise PlanError("plan: modules must be a list of module names")
    node, environment = _text(doc, "node", "plan"), _text(doc, "environment", "plan")
    for key, value in (("node", node), ("environment", environment)):
        # they go into URLs, JSON and the EE's /run (the core's names never fail this)
        if value and not NAME_RE.fullmatch(value):
            raise PlanError(f"plan: {key} {value[:80]!r} is not a name (letters, digits, '_', '.', '-')")
    return Plan(
        node=node,
        environment=environment,
        release_digest=_text(doc, "release_digest", "plan"),
        kernel=_ref(doc.get("kernel"), "plan: kernel"),
        initrd=_ref(doc.get("initrd"), "plan: initrd"),
        modules=tuple(modules),
        disk=_text(doc, "disk", "plan"),
        directories=tuple(dirs),
        relays=tuple(relays),
        https_relays=tuple(https_relays),
        http_relays=tuple(http_relays),
        secrets=_count(doc, "secrets", "plan") if "secrets" in doc else 0,
        desktop=_desktop(doc, dirs),
        kernel_args=_text(doc, "kernel_args", "plan"),
    )
