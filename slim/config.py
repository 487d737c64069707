"""What the processes' configuration models share: field types, and building or loading
a model with errors that name the field.

Each serving process has one pydantic model, validated when it is built: the core's
(:class:`slim.core.control.config.CoreConfig`), a relay's
(:class:`slim.relay.config.RelayConfig`), nfs-ganesha's and dnsmasq's supervisors'
(:mod:`slim.core.daemons`).  The CLI builds them from its options; ``slim serve``
builds them from the registry and hands each child process its model as a JSON file
(``--config FILE``), so a part started by ``slim serve`` and one started by hand read
the same settings the same way.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError

from slim.errors import ConfigError, Problem, SlimError
from slim.listen import check_address, check_host_port, check_listen
from slim.vocabulary import parse_size

T = TypeVar("T")
M = TypeVar("M", bound="ProcessConfig")


def value_error(check: Callable[[T], T]) -> Callable[[T], T]:
    """``check`` with its SlimError turned into the ValueError pydantic validators raise."""

    def checked(value: T) -> T:
        try:
            return check(value)
        except SlimError as exc:
            raise ValueError(exc.message) from None

    return checked


def _size(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return parse_size(value)
        except SlimError as exc:
            raise ValueError(exc.message) from None
    return value


def _ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address (one of this host's, e.g. 192.0.2.10)") from None
    return value


SourceIP = Annotated[str, AfterValidator(_ip)]  # an address of this host's, to send from
HostPort = Annotated[str, AfterValidator(value_error(check_host_port))]  # to bind: IP:PORT
Listen = Annotated[str, AfterValidator(value_error(check_listen))]  # to bind: IP:PORT or unix:PATH
Address = Annotated[str, AfterValidator(value_error(check_address))]  # to connect to: HOST:PORT or unix:PATH
# what a gRPC server binds: HOST:PORT (a name too, as gRPC resolves it; port 0: any) or unix:PATH
GrpcListen = Annotated[
    str, AfterValidator(value_error(lambda value: check_address(value, allow_ephemeral=True)))
]
ByteSize = Annotated[int, BeforeValidator(_size)]  # bytes, or a size: 20G, 500MB (slim.vocabulary)
LogLevel = Literal["debug", "info", "warning", "error"]


class ProcessConfig(BaseModel):
    """Base of the processes' models: unknown fields are errors; built once, not changed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def build(
        cls: type[M], source: str = "the command line", names: dict[str, str] | None = None, **values: Any
    ) -> M:
        """The model from ``values``; a ConfigError naming each bad field as ``source``
        spells it (``names``: field -> its option, ``--max-bytes``; by default the field)."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError([_problem(source, err, names or {}) for err in exc.errors()]) from None

    @classmethod
    def load(cls: type[M], path: Path) -> M:
        """The model from a JSON file (as ``slim serve`` writes them)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError([Problem(str(path), None, "(document)", f"cannot read it: {exc}")]) from None
        if not isinstance(data, dict):
            raise ConfigError([Problem(str(path), None, "(document)", "not a JSON object of settings")])
        return cls.build(str(path), **data)

    def dump(self, path: Path) -> Path:
        """Write the model as JSON to ``path`` (what :meth:`load` reads)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path


def _problem(source: str, err: Any, names: dict[str, str]) -> Problem:
    loc = list(err["loc"])
    if loc and loc[0] in names:  # an option: its message quotes the value (of a repeated one)
        field = names[loc[0]]
    else:  # a file: upstreams[1]
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(document)"
    msg: str = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown setting"
    elif err["type"] == "missing":
        msg = "required setting is missing"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return Problem(source, None, field, msg)
