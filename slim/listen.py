"""``--listen`` values: ``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``:PORT``."""

from __future__ import annotations

import ipaddress
import socket

from slim.errors import InvalidArgument


def parse_listen(value: str, default_port: int, allow_ephemeral: bool = False) -> tuple[str, int]:
    """(address, port); the host must be an IP address; defaults 0.0.0.0 and
    ``default_port``.  Port 0 (any free port) only with ``allow_ephemeral``."""
    value = value.strip()
    host, port_text = value, ""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise InvalidArgument(f"{value!r} is not HOST:PORT ([ADDRESS]:PORT for IPv6)")
        port_text = rest[1:]
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    host = host or "0.0.0.0"  # noqa: S104 - listening on every address is the default on purpose
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise InvalidArgument(f"{value!r}: port {port_text!r} is not a number") from None
    return check_bind(host), check_port(port, allow_ephemeral)


def check_bind(bind: str) -> str:
    try:
        return str(ipaddress.ip_address(bind))
    except ValueError:
        raise InvalidArgument(f"listen address {bind!r} is not an IP address") from None


def check_port(port: int, allow_ephemeral: bool = False) -> int:
    low = 0 if allow_ephemeral else 1
    if not low <= port <= 65535:
        raise InvalidArgument(f"port {port} is not between {low} and 65535")
    return port


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the kernel just handed out on ``host``, for servers that must be told a
    port before they start (labs and benchmarks; another process could take it first)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
