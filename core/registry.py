"""The registry: the paper's EE profiler tables, as one declarative YAML file.

It holds the sites (address prefixes), relays, hardware profiles, execution
environments with their per-directory sharing policy, and nodes.  It is
validated as a whole when it loads; every problem names the file, the line,
the field and what is wrong, and all problems are reported at once.

See docs/registry.md for the format and docs/registry.example.yaml for a
commented example.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
)

from slim.config import ByteSize, HostPort, Listen, SourceIP
from slim.core.pools import Pool
from slim.core.yamlsource import Loc, YamlSource, load_yaml_file, load_yaml_text
from slim.errors import ConfigError, InvalidArgument, NotFound, Problem
from slim.vocabulary import HOSTNAME_RE, NAME_RE, Policy, normalize_mac, tmpfs_size

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Slurm's node_features/helpers accepts [A-Za-z_=][A-Za-z0-9_.=]*; the shipped
# job_submit.lua turns "ee:X" into "ee=X", so both halves must fit that.
FEATURE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z0-9_.]+$")
MODULE_RE = re.compile(r"^[A-Za-z0-9_-]+$")

SITE_CACHE_SIZE = 65536  # addresses whose site is remembered
DEFAULT_NFS_OPTIONS = "ro,nolock,noatime,actimeo=600,proto=tcp"


def _check_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name (letters, digits, '_', '.', '-'; "
            "starting with a letter or digit; at most 63 characters)"
        )
    return value


def _check_abs_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not an absolute path")
    if ".." in value.split("/"):
        raise ValueError(f"{value!r} contains '..'")
    if "\x00" in value or "\n" in value:
        raise ValueError(f"{value!r} contains a control character")
    return value


def normalize_dir(value: str) -> str:
    """An environment directory: absolute, no ``..``, normalized (``/usr/`` → ``/usr``)."""
    _check_abs_path(value)
    norm = posixpath.normpath(value)
    # POSIX normpath keeps exactly two leading slashes ("//usr"); they name /usr here.
    return "/" + norm.lstrip("/") if norm.startswith("//") else norm


def _check_url(value: str) -> str:
    """A relay's base URL: ``http://`` (iPXE and PXE on a LAN) or ``https://`` (a relay with
    ``https_listen``: nodes check its certificate against SLIM's CA)."""
    if not value.isascii():  # the initrd's Python has no IDNA codec (slim.agent.fetch.ascii_host_names)
        raise ValueError(f"{value!r}: a relay URL must be ASCII; write an international host name as xn--")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// URL with a host (or https://)")
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r}: a relay URL takes no query or fragment")
    return value if value.endswith("/") else value + "/"


def relay_tls_name(relay: str) -> str:
    """The DNS name in relay ``relay``'s certificate (:mod:`slim.pki` issues it so)."""
    return f"{relay}.relay.slim"


def _parse_network(value: Any) -> IPNetwork:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a network in CIDR form (e.g. 10.1.0.0/16)")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid IPv4 or IPv6 network in CIDR form: {exc}") from None


def _mac_input(value: Any) -> Any:
    # YAML 1.1 reads an unquoted MAC made of digits only, such as 52:54:00:00:01:01,
    # as a base-60 integer; the digits are lost, so all we can do is say why.
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            'a MAC address must be quoted, e.g. "52:54:00:00:01:01" '
            "(YAML reads an unquoted MAC made of digits only as a number)"
        )
    return value


def _check_host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not HOSTNAME_RE.match(value):
            raise ValueError(f"{value!r} is neither an IP address nor a host name") from None
    return value


def _check_module(value: str) -> str:
    if not MODULE_RE.match(value):
        raise ValueError(f"{value!r} is not a kernel module name")
    return value


Name = Annotated[str, AfterValidator(_check_name)]
AbsPath = Annotated[str, AfterValidator(_check_abs_path)]
Url = Annotated[str, AfterValidator(_check_url)]
Mac = Annotated[str, BeforeValidator(_mac_input), AfterValidator(normalize_mac)]
Module = Annotated[str, AfterValidator(_check_module)]
Network = Annotated[IPNetwork, PlainValidator(_parse_network)]
Host = Annotated[str, AfterValidator(_check_host)]
KernelArgs = Annotated[str, Field(max_length=2048)]
INTERFACE_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
LEASE_RE = re.compile(r"^(\d+[smhdw]?|infinite)$")


def _check_ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None


def _check_interface(value: str) -> str:
    if not INTERFACE_RE.match(value):
        raise ValueError(f"{value!r} is not a network interface name (at most 15 of A-Z a-z 0-9 _ . : @ -)")
    return value


def _check_lease(value: str) -> str:
    if not LEASE_RE.match(value):
        raise ValueError(f"{value!r} is not a lease time (seconds, or e.g. 45m, 12h, 2d, infinite)")
    return value


IPv4 = Annotated[str, AfterValidator(_check_ipv4)]
Interface = Annotated[str, AfterValidator(_check_interface)]
LeaseTime = Annotated[
    str, BeforeValidator(lambda v: str(v) if isinstance(v, int) else v), AfterValidator(_check_lease)
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


NodeIdentity = Literal["mac", "token"]


class Settings(_Model):
    """Registry-wide settings; every field has a default."""

    heartbeat_interval: float = Field(5.0, gt=0, le=3600, description="seconds between relay heartbeats")
    stale_after: float = Field(
        20.0, gt=0, le=86400, description="seconds without a heartbeat before a relay is excluded"
    )
    boot_menu_timeout: float = Field(
        5.0, ge=0, le=3600, description="seconds the boot menu waits before its default entry"
    )
    nfs_server: Host | None = Field(None, description="NFS server for sites that name none")
    nfs_export_root: AbsPath = Field("/slim", description="NFSv4 pseudo-path under which EEs are exported")
    spread_window: float = Field(
        30.0, gt=0, le=3600, description="seconds a redirection counts toward a relay's load"
    )
    max_relays: int = Field(8, ge=1, le=1000, description="most relays in one ranked answer")
    node_identity: NodeIdentity = Field(
        "token",
        description="how a node calling from an address of no site (the internet) proves who it is: "
        "token (its node token, slim node enroll) or mac (its name or MAC, which anyone can claim)",
    )
    up_timeout: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="seconds after switch_root within which a booted environment must report 'up', "
        "or its boot is failed",
    )


class Dhcp(_Model):
    """The network configuration service of one site: what dnsmasq answers there."""

    mode: Literal["proxy", "full"] = Field(
        "proxy", description="proxy: boot information only, the site's DHCP server gives addresses"
    )
    interface: Interface | None = Field(None, description="answer only on this interface (default: all)")
    subnet: Network | None = Field(
        None, description="the network answered (default: the site's first IPv4 prefix)"
    )
    range: list[IPv4] | None = Field(
        None, min_length=2, max_length=2, description="full mode: first, last address"
    )
    router: IPv4 | None = Field(None, description="full mode: default gateway handed out")
    dns: list[IPv4] = Field(default_factory=list, description="full mode: DNS servers handed out")
    lease_time: LeaseTime = Field("1h", description="full mode: lease time")
    relay: Name | None = Field(
        None, description="relay serving TFTP and boot menus (default: the site's first)"
    )
    tftp_server: IPv4 | None = Field(None, description="TFTP address (default: the relay's URL host)")
    open_enrollment: bool = Field(False, description="answer unknown MACs too")
    router_advertisements: bool = Field(
        False, description="send IPv6 router advertisements on 'interface' (iPXE waits ~13 s without)"
    )


class Site(_Model):
    prefixes: list[Network] = Field(default_factory=list)
    nfs_server: Host | None = None
    description: str = ""
    dhcp: Dhcp | None = None
    node_identity: NodeIdentity = Field(
        "mac",
        description="how a node calling from this site's addresses proves who it is: mac (its name "
        "or MAC, as PXE gives it: anyone on the site's network can claim any node) or token (its "
        "node token, slim node enroll)",
    )
    secrets_without_token: bool = Field(
        False,
        description="give per-node secrets to this site's nodes identified by MAC, over plain HTTP "
        "(anyone on the site's network can then ask for any of its nodes' secrets)",
    )


class Server(_Model):
    """``slim serve``: the all-in-one server on one machine."""

    state_dir: AbsPath = Field("/var/lib/slim", description="state.db, store/, cache/, nfs/, dhcp/")
    core_listen: Listen = Field("127.0.0.1:50051", description="the core's gRPC (HOST:PORT or unix:PATH)")
    objects_listen: Listen = Field(
        "127.0.0.1:0", description="the core's object server (the relay's upstream)"
    )
    relay: Name | None = Field(None, description="which relay of the registry this server is")
    relay_listen: Listen = Field("0.0.0.0:8080", description="the relay's HTTP")
    relay_https_listen: Listen | None = Field(
        None, description="the relay's HTTPS, beside its HTTP (null: none), for https:// relay URLs"
    )
    tftp_listen: Listen | None = Field("0.0.0.0:69", description="the relay's TFTP (null: none)")
    cache_max_bytes: ByteSize = Field(
        20 << 30, gt=0, description="relay cache budget (a size: 20G, 500GB, ...)"
    )
    nfs_listen: Listen | None = Field("0.0.0.0:2049", description="nfs-ganesha (null: no NFS server)")
    dhcp: bool = Field(True, description="run dnsmasq for the sites that have a dhcp section")


class Relay(_Model):
    urls: list[Url] = Field(min_length=1)
    site: Name
    parent: Name | None = None
    capacity: float = Field(1.0, gt=0, le=1e6)
    wake_to: HostPort | None = Field(
        None, description="where its Wake-on-LAN packets go (slim serve's relay): the segment's broadcast"
    )
    wake_from: SourceIP | None = Field(None, description="an address of the relay's to send them from")
    nfs: Host | None = Field(
        None,
        description="the address its site's nodes (and its children's) mount the NFS trees the relay "
        "exports (slim relay serve --nfs-listen): tried first, for the trees its heartbeats list",
    )


class HardwareProfile(_Model):
    firmware: Literal["bios", "uefi"] = "bios"
    loader: Literal["ipxe", "pxelinux"] = Field(
        "ipxe", description="pxelinux: the legacy path for firmware that cannot run iPXE"
    )
    modules: list[Module] = Field(default_factory=list)
    kernel_args: KernelArgs = ""


class DirectorySpec(_Model):
    policy: Policy
    options: str | None = Field(None, description="NFS mount options (nfs policy only)")
    size: str | None = Field(None, description="tmpfs size for ram, e.g. 512M, 2G or 20% (ram only)")

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        try:
            return None if v is None else tmpfs_size(v)
        except InvalidArgument as exc:
            raise ValueError(exc.message) from None

    @field_validator("options")
    @classmethod
    def _options(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_=.,:/-]+", v):
            raise ValueError(f"{v!r} is not a mount option list (comma-separated, no spaces)")
        return v

    @property
    def nfs_options(self) -> str:
        return self.options or DEFAULT_NFS_OPTIONS


def _directory_spec(value: Any) -> Any:
    # ``/usr: nfs`` is short for ``/usr: {policy: nfs}``
    return {"policy": value} if isinstance(value, str) else value


def _check_mode(value: str) -> str:
    if not re.fullmatch(r"0?[0-7]{3}", value):
        raise ValueError(f"mode {value!r} is not an octal file mode such as 0400 or 0600")
    return value


def _check_owner(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?", value):
        raise ValueError(f"owner {value!r} is not USER or USER:GROUP (names or numbers)")
    return value


class SecretFile(_Model):
    """A per-node secret: a file on the core's host, delivered into a node's RAM at boot."""

    source: AbsPath = Field(description="the file on the core's host (read when a node asks)")
    path: AbsPath = Field(description="where it goes in the environment (in a ram directory)")
    mode: Annotated[str, AfterValidator(_check_mode)] = Field("0400", description="its file mode, octal")
    owner: Annotated[str, AfterValidator(_check_owner)] = Field(
        "root", description="USER or USER:GROUP, names (the environment's) or numbers"
    )


class Environment(_Model):
    image: AbsPath
    kernel: AbsPath = "/vmlinuz"
    kernel_args: KernelArgs = ""
    feature: str | None = None
    description: str = ""
    default_policy: Policy = Policy.RAM
    directories: dict[str, Annotated[DirectorySpec, Field()]] = Field(default_factory=dict)
    up_timeout: float | None = Field(
        None, gt=0, le=86400, description="this environment's settings.up_timeout (seconds)"
    )
    secrets: list[SecretFile] = Field(
        default_factory=list, description="secret files every node booting it receives (docs/security.md)"
    )

    def disk_paths(self) -> list[str]:
        """The directories this environment puts on the node's disk ("/" for the rest)."""
        paths = [d for d, spec in self.directories.items() if spec.policy.needs_disk]
        return ["/", *paths] if self.default_policy.needs_disk else paths

    @field_validator("directories", mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: _directory_spec(x) for k, x in v.items()}
        return v


class Node(_Model):
    macs: list[Mac] = Field(min_length=1)
    profile: Name
    environment: Name
    site: Name | None = None
    disk: AbsPath | None = Field(None, description="partition for disk and sync policies")
    secrets: list[SecretFile] = Field(
        default_factory=list, description="secret files this node receives, whatever it boots"
    )
    groups: list[Name] = Field(default_factory=list)
    boot_menu_timeout: float | None = Field(None, ge=0, le=3600)


class _Document(_Model):
    settings: Settings = Field(default_factory=Settings)
    sites: dict[Name, Site] = Field(default_factory=dict)
    relays: dict[Name, Relay] = Field(default_factory=dict)
    profiles: dict[Name, HardwareProfile] = Field(default_factory=dict)
    environments: dict[Name, Environment] = Field(default_factory=dict)
    nodes: dict[Name, Node] = Field(default_factory=dict)
    pools: dict[Name, Pool] = Field(default_factory=dict)
    server: Server = Field(default_factory=Server)


@dataclass(frozen=True)
class DhcpNetwork:
    """A site's ``dhcp`` section with its defaults worked out."""

    site: str
    spec: Dhcp
    subnet: ipaddress.IPv4Network
    relay: str
    relay_url: str  # ends with "/"
    tftp_server: str


def _resolve_dhcp(site_name: str, site: Site, relays: Mapping[str, Relay]) -> DhcpNetwork | tuple[str, str]:
    """The resolved network, or (field, problem)."""
    spec = site.dhcp
    assert spec is not None
    subnet = spec.subnet
    if subnet is None:
        subnet = next((n for n in site.prefixes if n.version == 4), None)
        if subnet is None:
            return "subnet", "no subnet given and the site has no IPv4 prefix to take it from"
    if not isinstance(subnet, ipaddress.IPv4Network):
        return "subnet", f"{subnet} is not an IPv4 network (DHCP here is IPv4)"
    if spec.mode == "full":
        if spec.range is None:
            return "range", "full mode needs a range: [first, last] address to hand out"
        first, last = (ipaddress.IPv4Address(a) for a in spec.range)
        if first not in subnet or last not in subnet:
            return "range", f"the range {first} - {last} is not inside {subnet}"
        if first > last:
            return "range", f"the range starts after it ends ({first} > {last})"
    else:
        for name in ("range", "router"):
            if getattr(spec, name) is not None:
                return name, "applies only to mode: full (in proxy mode the site's DHCP server hands it out)"
        if spec.dns:
            return "dns", "applies only to mode: full (in proxy mode the site's DHCP server hands it out)"
    if spec.router_advertisements and not spec.interface:
        return "router_advertisements", "needs 'interface': dnsmasq advertises the prefixes of that interface"
    relay = spec.relay
    if relay is None:
        relay = next((n for n, r in relays.items() if r.site == site_name), None)
        if relay is None:
            return "relay", f"site {site_name!r} has no relay; name the one that serves it with 'relay:'"
    elif relay not in relays:
        listed = ", ".join(sorted(relays)) or "none defined"
        return "relay", f"unknown relay {relay!r} (known relays: {listed})"
    url = relays[relay].urls[0]
    tftp = spec.tftp_server
    if tftp is None:
        host = urlsplit(url).hostname or ""
        try:
            tftp = str(ipaddress.IPv4Address(host))
        except ValueError:
            return "tftp_server", (
                f"relay {relay!r} is at {url}, not at an IPv4 address; "
                "give the TFTP address with 'tftp_server:'"
            )
    return DhcpNetwork(site_name, spec, subnet, relay, url, tftp)


class Registry:
    """A validated registry.  Build it with :func:`load_registry`."""

    def __init__(self, doc: _Document, source: YamlSource) -> None:
        self.source = source.file
        self._yaml = source
        self.settings = doc.settings
        self.sites: Mapping[str, Site] = doc.sites
        self.relays: Mapping[str, Relay] = doc.relays
        self.profiles: Mapping[str, HardwareProfile] = doc.profiles
        self.environments: Mapping[str, Environment] = doc.environments
        self.nodes: Mapping[str, Node] = doc.nodes
        self.pools: Mapping[str, Pool] = doc.pools
        self._pool_of = {
            n: (name, pool)
            for name, pool in doc.pools.items()
            for n, spec in doc.nodes.items()
            if n in pool.nodes or set(spec.groups) & set(pool.groups)
        }
        self._pool_members: dict[str, tuple[str, ...]] = {
            name: tuple(sorted(n for n, (p, _) in self._pool_of.items() if p == name)) for name in doc.pools
        }
        self.server = doc.server
        self.dhcp_networks: tuple[DhcpNetwork, ...] = tuple(
            net
            for name, site in doc.sites.items()
            if site.dhcp is not None and isinstance(net := _resolve_dhcp(name, site, doc.relays), DhcpNetwork)
        )
        self._by_mac = {mac: name for name, node in doc.nodes.items() for mac in node.macs}
        self._by_feature = {self.feature_of(name): name for name in doc.environments}
        self._directories: dict[str, Mapping[str, DirectorySpec]] = {}
        self._relay_tiers: dict[str | None, tuple[tuple[str, str], ...]] = {}
        self._site_cache: dict[IPAddress, str | None] = {}

    def problem(self, loc: Loc, message: str) -> Problem:
        """A problem at ``loc`` (e.g. ``("profiles", "vm", "modules", 0)``) with its file and line,
        for checks made after loading (``slim registry check`` against the images)."""
        return self._yaml.problem(loc, message)

    def relay_upstreams(self, name: str) -> list[str]:
        """Where relay ``name`` fetches missing objects: its parent's URLs, in order; empty for a
        relay without a parent (its upstream is the core's object server, which the registry
        does not name).  An https URL carries the name the parent's certificate must show
        (``URL#PARENT.relay.slim``, :class:`slim.relay.config.Upstream`)."""
        try:
            relay = self.relays[name]
        except KeyError:
            known = ", ".join(sorted(self.relays)) or "none"
            raise NotFound(f"unknown relay {name!r} (known: {known})") from None
        if relay.parent is None:
            return []
        tls = relay_tls_name(relay.parent)
        return [u + f"#{tls}" if u.startswith("https:") else u for u in self.relays[relay.parent].urls]

    # -- lookups that raise NotFound with a useful message -------------------
    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise NotFound(f"unknown node {name!r}") from None

    def node_name_by_mac(self, mac: str) -> str:
        try:
            norm = normalize_mac(mac)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        try:
            return self._by_mac[norm]
        except KeyError:
            raise NotFound(f"no node has MAC {norm}") from None

    def environment(self, name: str) -> Environment:
        try:
            return self.environments[name]
        except KeyError:
            known = ", ".join(sorted(self.environments)) or "none"
            raise NotFound(f"unknown environment {name!r} (known: {known})") from None

    def resolve_environment(self, name_or_feature: str) -> str:
        """An environment's name from its name or its feature (``ee:jdk14`` or ``ee=jdk14``)."""
        if name_or_feature in self.environments:
            return name_or_feature
        feature = name_or_feature.replace("=", ":", 1)
        if feature in self._by_feature:
            return self._by_feature[feature]
        known = ", ".join(sorted(self.environments)) or "none"
        raise NotFound(f"unknown environment {name_or_feature!r} (known: {known})")

    def up_timeout(self, env_name: str) -> float:
        """Seconds after switch_root within which ``env_name`` must report ``up`` (an
        environment no longer in the registry: the registry-wide setting)."""
        env = self.environments.get(env_name)
        if env is not None and env.up_timeout is not None:
            return env.up_timeout
        return self.settings.up_timeout

    def feature_of(self, env_name: str) -> str:
        env = self.environment(env_name)
        return env.feature or f"ee:{env_name}"

    def pool_members(self, pool: str) -> tuple[str, ...]:
        """The desktops of ``pool``, sorted (none for an unknown pool)."""
        return self._pool_members.get(pool, ())

    def pool_of(self, node: str) -> tuple[str, Pool] | None:
        """The desktop pool ``node`` is in (its name and settings), if any."""
        return self._pool_of.get(node)

    def directories(self, env_name: str) -> Mapping[str, DirectorySpec]:
        """The environment's directories, normalized and sorted, with ``/`` standing
        for the rest (computed once; read-only)."""
        cached = self._directories.get(env_name)
        if cached is None:
            env = self.environment(env_name)
            out = {"/": DirectorySpec(policy=env.default_policy)}
            for path, spec in env.directories.items():
                out[normalize_dir(path)] = spec
            cached = self._directories[env_name] = MappingProxyType(dict(sorted(out.items())))
        return cached

    def relays_by_site(self, site: str | None) -> tuple[tuple[str, str], ...]:
        """Every relay as (name, tier) seen from ``site``: the site's relays ("site"),
        their parent chains ("parent"), then the rest ("other"); computed once per site."""
        cached = self._relay_tiers.get(site)
        if cached is None:
            tiers: dict[str, str] = {}
            if site is not None:
                for name, relay in self.relays.items():
                    if relay.site == site:
                        tiers[name] = "site"
                for name in list(tiers):
                    for parent in self.parent_chain(name):
                        tiers.setdefault(parent, "parent")
            for name in self.relays:
                tiers.setdefault(name, "other")
            cached = self._relay_tiers[site] = tuple(tiers.items())
        return cached

    @property
    def relays_export_nfs(self) -> bool:
        """Some relay exports NFS trees of its own (``relays.NAME.nfs``): builds store the
        files of ``nfs`` directories as objects too, for those relays to build their trees from."""
        return any(r.nfs is not None for r in self.relays.values())

    def nfs_server_for(self, site: str | None) -> str | None:
        if site is not None and site in self.sites and self.sites[site].nfs_server:
            return self.sites[site].nfs_server
        return self.settings.nfs_server

    def site_of_address(self, address: IPAddress) -> str | None:
        """The site whose prefix is the longest match for ``address`` (remembered:
        a node asks from the same address several times per boot)."""
        try:
            return self._site_cache[address]
        except KeyError:
            pass
        site = self._match_site(address)
        if len(self._site_cache) >= SITE_CACHE_SIZE:
            self._site_cache.clear()
        self._site_cache[address] = site
        return site

    def _match_site(self, address: IPAddress) -> str | None:
        best: tuple[int, str] | None = None
        for name, site in self.sites.items():
            for prefix in site.prefixes:
                if (
                    address.version == prefix.version
                    and address in prefix
                    and (best is None or prefix.prefixlen > best[0])
                ):
                    best = (prefix.prefixlen, name)
        return best[1] if best else None

    def parent_chain(self, relay: str) -> list[str]:
        chain: list[str] = []
        parent = self.relays[relay].parent
        while parent is not None and parent not in chain:
            chain.append(parent)
            parent = self.relays[parent].parent
        return chain


def load_registry(path: str | Path) -> Registry:
    """Load and validate a registry file; raise :class:`ConfigError` listing every problem."""
    return _build(load_yaml_file(path))


def load_registry_text(text: str, file: str = "<registry>") -> Registry:
    return _build(load_yaml_text(text, file))


def _build(source: YamlSource) -> Registry:
    if not isinstance(source.data, dict):
        raise ConfigError([source.problem((), "the registry must be a mapping of sections")])
    try:
        doc = _Document.model_validate(source.data)
    except ValidationError as exc:
        raise ConfigError([_pydantic_problem(source, e) for e in exc.errors()]) from None
    problems = list(_cross_check(doc, source))
    if problems:
        raise ConfigError(problems)
    return Registry(doc, source)


def _pydantic_problem(source: YamlSource, err: Any) -> Problem:
    loc: Loc = tuple(err["loc"])
    msg: str = err["msg"]
    kind = err["type"]
    if loc and loc[-1] == "[key]":  # pydantic's marker for a bad mapping key: the key is the field
        loc = loc[:-1]
    if kind == "extra_forbidden":
        msg = "unknown field (check the spelling; see docs/registry.md)"
    elif kind == "missing":
        msg = "required field is missing"
    elif kind == "enum":
        msg = f"unknown policy {err['input']!r} (choose one of: ram, disk, sync, nfs)"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return source.problem(loc, msg)


def secret_refusal(env: Environment, path: str) -> str | None:
    """Why a secret cannot go to ``path`` in ``env`` (None if it can): it must land in RAM,
    in a directory of the ``ram`` policy (longest match), never on a disk or NFS."""
    try:
        norm = normalize_dir(path)
    except ValueError as exc:
        return f"secret path {exc}"
    if norm != path:
        return f"write the secret's path as {norm} (normalised: no '//', '.', '..' or trailing '/')"
    if norm == "/":
        return "a secret is a file, not /"
    best, policy = "/", env.default_policy
    for raw, spec in env.directories.items():
        try:
            d = normalize_dir(raw)
        except ValueError:
            continue
        if (norm == d or norm.startswith(d.rstrip("/") + "/")) and len(d) > len(best):
            best, policy = d, spec.policy
    if norm == best:
        return f"{path} is a directory of the environment, not a file in one"
    if policy is not Policy.RAM:
        return (
            f"{path} is in {best} ({policy.value}): secrets go only into RAM, a directory of the "
            "ram policy (never onto a disk or NFS)"
        )
    return None


def _cross_check(doc: _Document, source: YamlSource) -> Iterable[Problem]:
    def p(loc: Loc, msg: str) -> Problem:
        return source.problem(loc, msg)

    def known(kind: str, names: Iterable[str]) -> str:
        listed = ", ".join(sorted(names)) or "none defined"
        return f"(known {kind}: {listed})"

    # sites: one prefix in two sites is ambiguous
    owner: dict[IPNetwork, str] = {}
    for name, site in doc.sites.items():
        for i, prefix in enumerate(site.prefixes):
            if prefix in owner and owner[prefix] != name:
                yield p(
                    ("sites", name, "prefixes", i), f"{prefix} is also a prefix of site {owner[prefix]!r}"
                )
            owner.setdefault(prefix, name)

    # sites: DHCP sections resolve; two sites do not answer the same subnet
    answered: dict[ipaddress.IPv4Network, str] = {}
    for name, site in doc.sites.items():
        if site.dhcp is None:
            continue
        net = _resolve_dhcp(name, site, doc.relays)
        if isinstance(net, tuple):
            yield p(("sites", name, "dhcp", net[0]), net[1])
            continue
        other = next((o for s, o in answered.items() if s.overlaps(net.subnet)), None)
        if other is not None:
            yield p(
                ("sites", name, "dhcp", "subnet"), f"{net.subnet} overlaps the DHCP subnet of site {other!r}"
            )
        answered.setdefault(net.subnet, name)
    if doc.server.relay is not None and doc.server.relay not in doc.relays:
        yield p(("server", "relay"), f"unknown relay {doc.server.relay!r} {known('relays', doc.relays)}")

    # relays: site and parent exist; parent chains end
    for name, relay in doc.relays.items():
        if relay.site not in doc.sites:
            yield p(("relays", name, "site"), f"unknown site {relay.site!r} {known('sites', doc.sites)}")
        if relay.parent is not None and relay.parent not in doc.relays:
            yield p(
                ("relays", name, "parent"), f"unknown relay {relay.parent!r} {known('relays', doc.relays)}"
            )
    for name in doc.relays:
        chain = [name]
        parent = doc.relays[name].parent
        while parent is not None and parent in doc.relays:
            if parent in chain:
                loop = " -> ".join([*chain[chain.index(parent) :], parent])
                if parent == name:  # report each loop once, at every member
                    yield p(("relays", name, "parent"), f"parent chain loops: {loop}")
                break
            chain.append(parent)
            parent = doc.relays[parent].parent

    # secrets: only into RAM (a ram directory of the environment), one per path
    for name, env in doc.environments.items():
        paths: set[str] = set()
        for i, secret in enumerate(env.secrets):
            sloc: Loc = ("environments", name, "secrets", i, "path")
            why = secret_refusal(env, secret.path)
            if why:
                yield p(sloc, why)
            if secret.path in paths:
                yield p(sloc, f"two secrets for {secret.path}")
            paths.add(secret.path)

    # pools: their desktops exist and are in one pool; their EE never touches a disk
    pooled: dict[str, str] = {}
    groups = {g for n in doc.nodes.values() for g in n.groups}
    for name, pool in doc.pools.items():
        loc: Loc = ("pools", name)
        if not pool.nodes and not pool.groups:
            yield p(loc, "a pool needs nodes, or groups of nodes")
        for i, member in enumerate(pool.nodes):
            if member not in doc.nodes:
                yield p((*loc, "nodes", i), f"unknown node {member!r}")
        for i, group in enumerate(pool.groups):
            if group not in groups:
                yield p((*loc, "groups", i), f"no node is in group {group!r}")
        members = set(pool.nodes)
        members |= {n for n, spec in doc.nodes.items() if set(spec.groups) & set(pool.groups)}
        for member in sorted(members & set(doc.nodes)):
            if member in pooled:
                yield p(loc, f"node {member!r} is also in pool {pooled[member]!r}: a desktop is in one pool")
            pooled.setdefault(member, name)
        pool_env = doc.environments.get(pool.environment)
        if pool_env is None:
            yield p((*loc, "environment"), f"unknown environment {pool.environment!r}")
        else:
            touching = [("/", pool_env.default_policy)] if pool_env.default_policy.needs_disk else []
            touching += [(d, s.policy) for d, s in pool_env.directories.items() if s.policy.needs_disk]
            for path, policy in touching:
                yield p(
                    (*loc, "environment"),
                    f"{pool.environment} puts {path} on the node's disk ({policy.value}): a harvested "
                    "desktop's disks are never mounted, formatted or written; use ram or nfs",
                )
        for member in sorted(members & set(doc.nodes)):
            home = doc.nodes[member].site
            if not home or not any(r.site == home for r in doc.relays.values()):
                yield p(
                    loc,
                    f"desktop {member!r} has no site with a relay: a relay of its site sends its "
                    f"magic packets (they do not cross routers); set nodes.{member}.site",
                )
                break
        if pool.partition and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", pool.partition):
            yield p((*loc, "partition"), f"{pool.partition!r} is not a Slurm partition name")

    # environments: directories and features
    features: dict[str, str] = {}
    for name, env in doc.environments.items():
        seen: dict[str, str] = {}
        for raw, spec in env.directories.items():
            loc = ("environments", name, "directories", raw)
            try:
                norm = normalize_dir(raw)
            except ValueError as exc:
                yield p(loc, f"directory {exc}")
                continue
            if norm == "/":
                yield p(loc, "'/' is set with default_policy, not listed as a directory")
            elif norm in seen:
                yield p(loc, f"two policies for the same directory {norm} (also given as {seen[norm]!r})")
            seen.setdefault(norm, raw)
            if spec.options is not None and spec.policy is not Policy.NFS:
                yield p((*loc, "options"), "mount options apply only to the nfs policy")
            if spec.size is not None and spec.policy is not Policy.RAM:
                yield p((*loc, "size"), "a size applies only to the ram policy")
        feature = env.feature or f"ee:{name}"
        floc: Loc = ("environments", name, "feature") if env.feature else ("environments", name)
        if not FEATURE_RE.match(feature):
            hint = (
                ""
                if env.feature
                else "; set 'feature:' explicitly, e.g. ee:" + re.sub(r"[^A-Za-z0-9_.]", "_", name)
            )
            yield p(floc, f"{feature!r} cannot be a Slurm feature (want prefix:value of [A-Za-z0-9_.]){hint}")
        elif feature in features:
            yield p(floc, f"feature {feature!r} is also the feature of environment {features[feature]!r}")
        features.setdefault(feature, name)

    # nodes: references, MACs, disks
    macs: dict[str, str] = {}
    for name, node in doc.nodes.items():
        base = ("nodes", name)
        if node.environment not in doc.environments:
            yield p(
                (*base, "environment"),
                f"unknown environment {node.environment!r} {known('environments', doc.environments)}",
            )
        elif node.disk is None:
            needing = doc.environments[node.environment].disk_paths()
            if needing:
                yield p(
                    (*base, "disk"),
                    f"environment {node.environment!r} copies {', '.join(needing)} to disk, "
                    "but the node has no 'disk' partition",
                )
        if node.profile not in doc.profiles:
            yield p(
                (*base, "profile"),
                f"unknown hardware profile {node.profile!r} {known('profiles', doc.profiles)}",
            )
        if node.site is not None and node.site not in doc.sites:
            yield p((*base, "site"), f"unknown site {node.site!r} {known('sites', doc.sites)}")
        for i, mac in enumerate(node.macs):
            if mac in macs:
                other = "this node" if macs[mac] == name else f"node {macs[mac]!r}"
                yield p((*base, "macs", i), f"MAC {mac} is used twice (also by {other})")
            macs.setdefault(mac, name)
