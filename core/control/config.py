"""The core's settings (``slim core serve``): one model, validated when built.

The CLI builds it from its options (or ``--config FILE``); ``slim serve`` builds it from
the registry's ``server`` section and hands it to its core as a JSON file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from slim.config import GrpcListen, HostPort, LogLevel, ProcessConfig

DEFAULT_LISTEN = "127.0.0.1:50051"


class CoreConfig(ProcessConfig):
    registry: Path = Field(Path("/etc/slim/registry.yaml"), description="the registry YAML file")
    state: Path = Field(
        Path("/var/lib/slim/state.db"),
        description="SQLite file for runtime state (next-boot overrides, boot events, heartbeats)",
    )
    store: Path = Field(Path("/var/lib/slim/store"), description="the content-addressed artifact store")
    keys: Path | None = Field(
        None,
        description="the signing key's directory (signing.key, signing.pub; made on first start); "
        "default: 'keys' beside the state database",
    )
    listen: GrpcListen = Field(
        DEFAULT_LISTEN,
        description="gRPC: HOST:PORT (port 0: any free port): mutual TLS, for relays and admin "
        "certificates; or unix:PATH, a local socket",
    )
    tls: bool = Field(
        True,
        description="TLS and caller authentication; false: plaintext gRPC on 'listen' and every "
        "caller trusted (only where everyone who can reach the port is)",
    )
    ca: Path | None = Field(
        None,
        description="the CA's directory (ca.key, ca.crt, issued.json; made on first start); "
        "default: 'ca' beside the state database",
    )
    tls_names: list[str] = Field(
        default_factory=list,
        description="more DNS names or addresses for the core's certificate (clients check the name "
        "slim-core, which it always carries)",
    )
    admin_listen: HostPort | None = Field(
        None, description="also take admin calls authenticated by admin token, over TLS, here"
    )
    socket: Path | None = Field(
        None,
        description="the local socket (mode 0600: root on this host may do anything); "
        "default: 'core.sock' beside the state database",
    )
    local_socket: bool = Field(True, description="open the local socket")
    objects_listen: HostPort | None = Field(
        None, description="also serve the store's objects over HTTP here (the relays' upstream)"
    )
    objects_tls: bool | None = Field(
        None,
        description="serve objects_listen over HTTPS with the core's certificate (relays check it "
        "against SLIM's CA and the name slim-core); default: when tls is on; false: plain HTTP, "
        "unauthenticated",
    )
    grace: float = Field(10.0, ge=0, description="seconds in-flight calls may take to finish on SIGTERM")
    log_level: LogLevel = "info"
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    @property
    def objects_https(self) -> bool:
        """Whether the object server speaks HTTPS: ``objects_tls``, else as ``tls``."""
        return self.tls if self.objects_tls is None else self.objects_tls

    @property
    def ca_dir(self) -> Path:
        """Where the CA is: ``ca``, else beside the state database."""
        return self.ca if self.ca is not None else self.state.parent / "ca"

    @property
    def socket_path(self) -> Path | None:
        """The local socket, if one is opened."""
        if not self.local_socket:
            return None
        return self.socket if self.socket is not None else self.state.parent / "core.sock"

    @property
    def key_dir(self) -> Path:
        """Where the signing key is: ``keys``, else beside the state database."""
        return self.keys if self.keys is not None else self.state.parent / "keys"
