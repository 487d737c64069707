"""``slim nfs serve``: nfs-ganesha exporting the store's trees, supervised.

:class:`NfsServer` runs one ``ganesha.nfsd`` for a registry and a store in its own
work directory (:class:`slim.daemons.ganesha.GaneshaServer`), with the trees
:func:`slim.core.daemons.exports.collect_exports` finds; restarts it when it dies and
re-renders when the registry, an environment's release or the store's trees change,
making ganesha re-read its exports by SIGHUP when that is safe and restarting it
otherwise.  :class:`NfsConfig` is ``slim nfs serve``'s settings and :func:`run` runs a
server from them.  See docs/nfs.md.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from slim.config import ProcessConfig, value_error
from slim.core.daemons.exports import collect_exports
from slim.core.registry import Registry, load_registry
from slim.core.store import Store
from slim.daemons.ganesha import (
    DEFAULT_PORT,
    GANESHA,
    ExportSet,
    GaneshaServer,
    normalize_clients,
    parse_listen,
)
from slim.daemons.supervisor import file_signature

# -- settings --------------------------------------------------------------------------------------


def _listen(value: str) -> str:
    parse_listen(value)
    return value


def _clients(value: list[str] | None) -> list[str] | None:
    clients = normalize_clients(value)
    return None if clients is None else list(clients)


class NfsConfig(ProcessConfig):
    """``slim nfs serve``'s settings."""

    registry: Path = Field(Path("/etc/slim/registry.yaml"), description="the registry YAML file")
    store: Path = Field(Path("/var/lib/slim/store"), description="the content-addressed artifact store")
    workdir: Path = Field(
        Path("/var/lib/slim/nfs"),
        description="the server's own directory: ganesha.conf, log, pid file, recovery data, export ids",
    )
    listen: Annotated[str, AfterValidator(value_error(_listen))] = Field(
        f"0.0.0.0:{DEFAULT_PORT}", description="where ganesha listens: HOST:PORT, [V6]:PORT (an IP address)"
    )
    clients: Annotated[list[str] | None, AfterValidator(value_error(_clients))] = Field(
        None, description="who may mount: addresses, CIDR networks, host names, @netgroups; none: everyone"
    )

    @property
    def address(self) -> tuple[str, int]:
        """(address, port) ganesha binds."""
        return parse_listen(self.listen)


class NfsServer(GaneshaServer):
    """``slim nfs serve``: ganesha exporting the trees of a store's current releases (and,
    while they are still in the store, the trees it exported before, for nodes booted
    earlier).  It polls the registry file, every environment ref and the trees directory."""

    def __init__(
        self, registry_path: str | Path, store_root: str | Path, workdir: str | Path, **options: Any
    ) -> None:
        """``options``: :class:`~slim.daemons.ganesha.GaneshaServer`'s (bind, port, clients, ...)."""
        super().__init__(registry_path, workdir, **options)
        self.store = Store(store_root)
        self._registry: Registry | None = None
        self._registry_stat: tuple[int, int, int, int] | None = None

    def collect(self, keep_ids: Mapping[str, int], retain: Iterable[str]) -> ExportSet:
        return collect_exports(self._load_registry(), self.store, keep_ids=keep_ids, retain=retain)

    def _load_registry(self) -> Registry:
        key = file_signature(self.registry_path)
        if self._registry is None or key is None or key != self._registry_stat:
            self._registry = load_registry(self.registry_path)
            self._registry_stat = key
        return self._registry

    def watch_signature(self) -> tuple[object, ...]:
        """What is polled for changes: the registry file, every environment ref, and the
        trees directory (a tree removed from the store is unexported)."""
        try:
            refs = sorted(p.name for p in self.store.refs.iterdir())
        except OSError:
            refs = []
        return (
            file_signature(self.registry_path),
            tuple((name, file_signature(self.store.refs / name)) for name in refs),
            file_signature(self.store.trees),
        )


# -- entry points ----------------------------------------------------------------------------------


def run(
    config: NfsConfig,
    ready: Callable[[NfsServer], None] | None = None,
    *,
    stop_event: threading.Event | None = None,
) -> None:
    """``slim nfs serve`` with ``config``: see :func:`serve`."""
    bind, port = config.address
    serve(config.registry, config.store, config.workdir, bind, port, config.clients, stop_event, ready=ready)


def serve(
    registry_path: str | Path,
    store_root: str | Path,
    workdir: str | Path,
    bind: str = "0.0.0.0",  # noqa: S104
    port: int = DEFAULT_PORT,
    clients: Sequence[str] | None = None,
    stop_event: threading.Event | None = None,
    *,
    interval: float = 1.0,
    ready: Callable[[NfsServer], None] | None = None,
    ganesha: str = GANESHA,
) -> None:
    """Run and supervise ganesha until SIGTERM/SIGINT (or ``stop_event``), then stop it
    and return.  Blocks.  Called from the main thread it handles SIGTERM and SIGINT (stop)
    and SIGHUP (re-render now), restoring the previous handlers on return.  Raises
    :class:`SlimError` if ganesha cannot be started at all."""
    server = NfsServer(
        registry_path,
        store_root,
        workdir,
        bind=bind,
        port=port,
        clients=clients,
        ganesha=ganesha,
        interval=interval,
    )
    server.serve(stop_event, ready=ready)
