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
        DEFAULT_LISTEN, description="gRPC: HOST:PORT (port 0: any free port) or unix:PATH"
    )
    objects_listen: HostPort | None = Field(
        None, description="also serve the store's objects over HTTP here (the relays' upstream)"
    )
    grace: float = Field(10.0, ge=0, description="seconds in-flight calls may take to finish on SIGTERM")
    log_level: LogLevel = "info"
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    @property
    def key_dir(self) -> Path:
        """Where the signing key is: ``keys``, else beside the state database."""
        return self.keys if self.keys is not None else self.state.parent / "keys"
