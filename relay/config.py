"""A relay's settings (``slim relay serve``): one model, validated when built.

The CLI builds it from its options (or ``--config FILE``); ``slim serve`` builds it for
its own relay from the registry and hands it over as a JSON file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from slim.config import Address, ByteSize, HostPort, LogLevel, ProcessConfig, SourceIP, value_error
from slim.daemons.ganesha import normalize_clients, parse_listen
from slim.errors import InvalidArgument
from slim.pki import CORE_NAME

DEFAULT_HTTP_PORT = 8080
_UPSTREAM_RE = re.compile(r"(https?)://([^/\s#]+)/?(?:#([A-Za-z0-9][A-Za-z0-9._-]{0,252}))?")


@dataclass(frozen=True)
class Upstream:
    """One upstream: its base URL and, over HTTPS, the name its certificate must carry.

    ``http://HOST:PORT``: plain HTTP, unauthenticated (the digests still check every byte).
    ``https://HOST:PORT``: the certificate must chain to SLIM's CA and name ``slim-core``
    (the core's object server), whatever HOST is.  ``https://HOST:PORT#NAME``: the same for
    the name NAME instead, for a parent relay ``PARENT.relay.slim`` (what the registry's
    parents become, :func:`slim.core.registry.Registry.relay_upstreams`).  The fragment is
    never sent."""

    base: str  # scheme://host:port, without a trailing slash or fragment
    peer: str  # https: the DNS name the upstream's certificate must carry; "" for http

    @property
    def tls(self) -> bool:
        return bool(self.peer)

    @classmethod
    def parse(cls, value: str) -> Upstream:
        m = _UPSTREAM_RE.fullmatch(value.strip())
        if m is None:
            raise InvalidArgument(
                f"upstream {value!r} is not an http://HOST:PORT base URL (or https://HOST:PORT[#NAME])"
            )
        scheme, host, name = m.groups()
        if scheme == "http" and name:
            raise InvalidArgument(
                f"upstream {value!r}: #{name} names the certificate to expect, which only https:// has"
            )
        return cls(f"{scheme}://{host}", (name or CORE_NAME) if scheme == "https" else "")


def _nfs_listen(value: str | None) -> str | None:
    if value is not None:
        parse_listen(value)
    return value


def _nfs_clients(value: list[str] | None) -> list[str] | None:
    clients = normalize_clients(value)
    return None if clients is None else list(clients)


def _upstream(value: str) -> str:
    Upstream.parse(value)
    return value


def _some(upstreams: list[str]) -> list[str]:
    if not upstreams:
        raise InvalidArgument(
            "a relay needs at least one upstream (a parent relay or the core's object server): "
            "give --upstream, or --registry with a relay that has a parent"
        )
    return upstreams


UpstreamUrl = Annotated[str, AfterValidator(value_error(_upstream))]


class RelayConfig(ProcessConfig):
    upstreams: Annotated[list[UpstreamUrl], AfterValidator(value_error(_some))] = Field(
        description="where missing objects come from: parent relays or the core's object server"
    )
    cache_dir: Path = Field(Path("/var/cache/slim/relay"), description="where cached objects live")
    max_bytes: ByteSize = Field(20 << 30, gt=0, description="the cache's byte budget")
    memory_bytes: ByteSize = Field(512 << 20, ge=0, description="small objects' bytes kept in memory")
    name: str = Field(
        "", description="this relay's name in the registry (default: its certificate's, from identity)"
    )
    core: Address | None = Field(None, description="the core's gRPC address; none: objects only")
    identity: Path | None = Field(
        None,
        description="the relay's identity directory (key.pem, cert.pem, ca.pem from slim relay "
        "enroll): its certificate for mutual TLS with the core",
    )
    core_insecure: bool = Field(
        False, description="plaintext gRPC to a core run with tls: false (no identity needed)"
    )
    listen: HostPort = Field(f"0.0.0.0:{DEFAULT_HTTP_PORT}", description="HTTP: HOST:PORT (0: any port)")
    https_listen: HostPort | None = Field(
        None,
        description="HTTPS, beside listen: HOST:PORT (0: any port), the same objects and node API "
        "with the identity's certificate; none: no HTTPS",
    )
    upstream_ca: Path | None = Field(
        None,
        description="the CA certificate https upstreams must chain to (a PEM file, or an identity or "
        "CA directory); default: the identity's ca.pem",
    )
    tftp_listen: HostPort | None = Field(None, description="TFTP for stage 1: HOST:PORT; none: no TFTP")
    wake_to: HostPort = Field(
        "255.255.255.255:9",
        description="where Wake-on-LAN magic packets go (UDP): the desktops' segment's broadcast, "
        "HOST:PORT (port 9 usually)",
    )
    wake_from: SourceIP | None = Field(
        None, description="send magic packets from this address of the relay's (on the desktops' segment)"
    )
    ipxe_dir: Path = Field(Path("/usr/lib/ipxe"), description="the iPXE binaries served over TFTP")
    max_transfers: int = Field(1024, ge=1, description="object responses at once (more get 503)")
    max_fetches: int = Field(16, ge=1, description="upstream fetches at once")
    max_core_calls: int = Field(256, ge=1, description="node API calls waiting on the core at once")
    prefetch_concurrency: int = Field(4, ge=1, description="objects a prefetch order fetches at once")
    io_threads: int = Field(4, ge=1, description="threads for file writes and hashing")
    access_log: bool = False
    extra_static: dict[str, Path] = Field(default_factory=dict, description="more files served over TFTP")
    grace: float = Field(10.0, ge=0, description="seconds transfers may take to finish on SIGTERM")
    trust: list[Path] = Field(
        default_factory=list,
        description="the core's public keys: signify .pub files, or directories of them (the core's "
        "key directory: both keys during a rotation), read again when they change; only releases "
        "they signed are pinned or prefetched; none: nothing is",
    )
    nfs_listen: Annotated[str | None, AfterValidator(value_error(_nfs_listen))] = Field(
        None,
        description="export the current releases' NFS trees with the relay's own nfs-ganesha, listening "
        "here (HOST:PORT, an IP address; port 2049 by default); the registry's relays.NAME.nfs tells "
        "nodes to mount it; none: no NFS",
    )
    nfs_dir: Path = Field(
        Path("/var/lib/slim/relay-nfs"),
        description="with nfs_listen: the trees (trees/<hex>) and ganesha's work directory (ganesha/)",
    )
    nfs_clients: Annotated[list[str] | None, AfterValidator(value_error(_nfs_clients))] = Field(
        None,
        description="with nfs_listen: who may mount (addresses, CIDR networks, host names, @netgroups); "
        "none: everyone who reaches the port",
    )
    nfs_keep: float = Field(
        7 * 86400.0,
        ge=0,
        description="seconds a tree no current release names stays exported (nodes booted earlier mount "
        "it), then it is removed",
    )
    log_level: LogLevel = "info"

    @model_validator(mode="after")
    def _named_with_core(self) -> RelayConfig:
        tcp = self.core is not None and not self.core.startswith("unix:")
        if tcp and not self.core_insecure and self.identity is None:
            raise ValueError(
                "a relay that talks to a core over TCP needs --identity (a directory from `slim relay "
                "enroll NAME` on the core's host): the core takes only relays with SLIM's certificates"
            )
        if self.core and not self.name and self.identity is None:
            raise ValueError("a relay that talks to a core needs --name (its name in the registry)")
        if self.https_listen is not None and self.identity is None:
            raise ValueError(
                "https_listen needs --identity: the relay serves HTTPS with its certificate "
                "(slim relay enroll NAME)"
            )
        if self.nfs_listen is not None and (self.core is None or not self.trust):
            raise ValueError(
                "nfs_listen needs --core and --trust: the relay exports the trees of the releases the "
                "core names and signed"
            )
        secure = [u for u in self.upstreams if Upstream.parse(u).tls]
        if secure and self.identity is None and self.upstream_ca is None:
            raise ValueError(
                f"upstream {secure[0]} is https: give --identity (its ca.pem) or --upstream-ca, the CA "
                "certificate the upstream's must chain to"
            )
        return self
