"""What every ``slim`` command shares: output consoles, the error exit, common
options, the core's client, time stamps, JSON output and progress display.  Only
the CLI modules exit the process."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import click
from click.core import ParameterSource
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from slim.errors import ConfigError, InvalidArgument, SlimError, Unreachable

if TYPE_CHECKING:  # imported where used: `slim --help` and the Slurm helper start quicker
    from slim.config import ProcessConfig
    from slim.rpc import CoreClient

# Tables are read in terminals and in logs: when output is not a terminal, do
# not wrap at 80 columns.
# (slurmctld runs its ResumeProgram and SuspendProgram with standard output closed: None here)
console = Console(highlight=False, width=None if sys.stdout and sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr and sys.stderr.isatty() else 200)


def fail(message: str) -> None:
    # the message is plain text: "[first, last]" in it is not markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    sys.exit(1)


@contextmanager
def errors_to_exit() -> Iterator[None]:
    """Turn SLIM errors (the core's too) into a one-line message and exit 1."""
    try:
        yield
    except ConfigError as exc:
        fail(str(exc))
    except Unreachable as exc:
        fail(f"cannot reach the core at {exc.address}: {exc.details}")
    except SlimError as exc:
        # the core's answer says which status it was, as gRPC names it
        fail(f"{exc.message} ({exc.status})" if exc.origin else exc.message)


def core_client(address: str) -> CoreClient:
    """The core's client for the commands that ask it (``--core``; credentials:
    :func:`slim.rpc.credentials_from_environment`)."""
    from slim.rpc import CoreClient, credentials_from_environment

    with errors_to_exit():
        return CoreClient(address, credentials=credentials_from_environment(address))


def timestamp(ts: Any) -> str:
    """A protobuf Timestamp as ``2026-11-25 02:30:01`` (UTC); ``-`` if unset."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")


def print_json(msg: Message) -> None:
    click.echo(json.dumps(MessageToDict(msg, preserving_proto_field_name=True), indent=2, sort_keys=True))


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """Servers log to standard error, one line per record."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)


F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound="ProcessConfig")


def log_level_option(text: str = "Logging threshold (logs go to standard error).") -> Callable[[F], F]:
    option: Callable[[F], F] = click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        default="info",
        show_default=True,
        help=text,
    )
    return option


DEFAULT_CORE = "unix:/var/lib/slim/core.sock"  # the core's local socket (root on its host)
DEFAULT_CORE_LISTEN = "127.0.0.1:50051"
core_option = click.option(
    "--core",
    "core_address",
    envvar="SLIM_CORE",
    default=DEFAULT_CORE,
    show_default=True,
    help="Address of the SLIM core's gRPC service: unix:PATH (its local socket, root on its host) or "
    "HOST:PORT (TLS: credentials from $SLIM_IDENTITY, or $SLIM_TOKEN/$SLIM_TOKEN_FILE with $SLIM_CA; "
    "docs/security.md); also $SLIM_CORE.",
)
origin_option = click.option(
    "--from",
    "origin",
    required=True,
    metavar="ADDRESS",
    help="The node's address as a relay would see it (IPv4 or IPv6); picks the site.",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the answer as JSON instead of a table."
)
registry_option = click.option(
    "--registry",
    "registry_path",
    envvar="SLIM_REGISTRY",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("/etc/slim/registry.yaml"),
    show_default=True,
    help="The registry YAML file (sites, relays, profiles, environments, nodes); also $SLIM_REGISTRY.",
)
store_option = click.option(
    "--store",
    "store_path",
    envvar="SLIM_STORE",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Content-addressed artifact store holding built releases; also $SLIM_STORE "
    "(default: STATE_DIR/store, STATE_DIR being the registry's server.state_dir, /var/lib/slim "
    "unless it says otherwise: where `slim serve` keeps it).",
)
keys_option = click.option(
    "--keys",
    "keys_path",
    envvar="SLIM_KEYS",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The core's signing key directory (signing.key, signing.pub, and previous.pub during a "
    "rotation; made on first use); also $SLIM_KEYS (default: STATE_DIR/keys).",
)
DEFAULT_STATE_DIR = Path("/var/lib/slim")


def state_dir(registry_path: Path) -> Path:
    """The registry's ``server.state_dir`` (where ``slim serve`` keeps the store and the
    state database); /var/lib/slim if the registry file does not exist."""
    if not registry_path.exists():
        return DEFAULT_STATE_DIR
    from slim.core.registry import load_registry

    return Path(load_registry(registry_path).server.state_dir)


def store_path_or_default(store_path: Path | None, registry_path: Path) -> Path:
    """``--store`` as given, else STATE_DIR/store (see :func:`state_dir`)."""
    return store_path if store_path is not None else state_dir(registry_path) / "store"


def ca_option(text: str = "") -> Callable[[F], F]:
    """``--ca DIR``: SLIM's CA directory (default STATE_DIR/ca); ``text``: what else it is for."""
    option: Callable[[F], F] = click.option(
        "--ca",
        "ca_path",
        envvar="SLIM_CA_DIR",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="SLIM's CA directory (default: STATE_DIR/ca); also $SLIM_CA_DIR."
        + (f"  {text}" if text else ""),
    )
    return option


def ca_path_or_default(ca_path: Path | None, registry_path: Path) -> Path:
    """``--ca`` as given, else STATE_DIR/ca (see :func:`state_dir`)."""
    return ca_path if ca_path is not None else state_dir(registry_path) / "ca"


days_option = click.option(
    "--days",
    type=click.IntRange(1, 3650),
    default=365,
    show_default=True,
    help="How long the certificate is valid.",
)
token_out_option = click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the token to this file (mode 0600) instead of printing it.",
)


def identity_out_option(text: str) -> Callable[[F], F]:
    """``--out DIR``: where an identity directory is written."""
    option: Callable[[F], F] = click.option(
        "--out", type=click.Path(file_okay=False, path_type=Path), default=None, help=text
    )
    return option


def keys_path_or_default(keys_path: Path | None, registry_path: Path) -> Path:
    """``--keys`` as given, else STATE_DIR/keys (see :func:`state_dir`)."""
    return keys_path if keys_path is not None else state_dir(registry_path) / "keys"


def config_option(part: str) -> Callable[[F], F]:
    """``--config FILE``: every setting of a serving command from a JSON file (what
    ``slim serve`` writes), instead of its options."""
    option: Callable[[F], F] = click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=f"Take every setting from FILE (JSON, as `slim serve` writes STATE_DIR/config/{part}.json) "
        "instead of the options.",
    )
    return option


def settings(model: type[C], config_file: Path | None, **values: Any) -> C:
    """The process's settings: from ``config_file`` if given (refusing options given on
    the command line beside it), else from the options' ``values`` (model field names)."""
    ctx = click.get_current_context()
    if config_file is None:
        # a bad value is named by its option: the parameter of the field's name (or
        # NAME_path, NAME_address) that the command has
        names = {
            field: param.opts[0]
            for field in values
            for param in ctx.command.params
            if param.name in (field, f"{field}_path", f"{field}_address") and param.opts
        }
        return model.build(names=names, **values)
    given = [
        param.opts[0]
        for param in ctx.command.params
        if param.name not in (None, "config_file")
        and ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE
    ]
    if given:
        raise InvalidArgument(f"--config {config_file} holds every setting: drop {', '.join(given)}")
    return model.load(config_file)


class StageProgress:
    """Progress of long steps on standard error: a bar per step on a terminal, one
    line per step (with its size and time when it ends) otherwise.  Called as
    ``progress(what, done, total)`` with byte counts; total 0 when unknown."""

    def __init__(self, enabled: bool = True) -> None:
        self.tty = err_console.is_terminal
        self.enabled = enabled
        self._bar: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._started: dict[str, tuple[float, int]] = {}
        self._last: str | None = None

    def __enter__(self) -> StageProgress:
        if self.enabled and self.tty:
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TimeElapsedColumn(),
                console=err_console,
            )
            self._bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif kind is None:
            self._end_line()

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            task = self._tasks.get(what)
            if task is None:
                task = self._tasks[what] = self._bar.add_task(what, total=total or None)
            self._bar.update(task, completed=done, total=total or None)
            return
        if what != self._last:
            self._end_line()
            self._last = what
            self._started[what] = (time.monotonic(), 0)
            size = f" ({total / 1e6:.1f} MB)" if total else ""
            err_console.print(f"{what}{size} ...", soft_wrap=True)
        self._started[what] = (self._started[what][0], done)

    def _end_line(self) -> None:
        if self._last is None:
            return
        t0, _ = self._started[self._last]
        err_console.print(f"{self._last}: done in {time.monotonic() - t0:.1f} s", soft_wrap=True)
        self._last = None
