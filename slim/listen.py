"""``--listen`` values: ``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``:PORT``; and for
gRPC, ``unix:PATH``."""

from __future__ import annotations

import ipaddress

from slim.errors import InvalidArgument
from slim.vocabulary import HOSTNAME_RE


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


def check_host_port(value: str) -> str:
    """``value`` if it is an address to bind: IP:PORT, ``[V6]:PORT`` (port 0: any free port)."""
    parse_listen(value, 0, allow_ephemeral=True)
    return value


def check_listen(value: str) -> str:
    """``value`` if it is HOST:PORT (port 0: any free port) or ``unix:PATH`` (gRPC)."""
    if value.startswith("unix:"):
        if not value[5:].lstrip("/") or "\x00" in value:
            raise InvalidArgument(f"{value!r}: a unix socket needs a path, e.g. unix:/run/slim/core.sock")
        return value
    return check_host_port(value)


GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix-abstract:", "vsock:")  # gRPC target names


def check_address(value: str, allow_ephemeral: bool = False) -> str:
    """``value`` if it is a gRPC address: HOST:PORT (HOST a name or an IP address,
    ``[V6]:PORT`` for IPv6; port 0 only with ``allow_ephemeral``), ``unix:PATH``, or a
    gRPC target name (``dns:///core:50051``, ``ipv4:10.0.0.1:50051``, ...)."""
    if value.startswith("unix:"):
        return check_listen(value)
    if value.startswith(GRPC_SCHEMES):
        if not value.split(":", 1)[1].strip("/"):
            raise InvalidArgument(f"{value!r}: the gRPC target names no address")
        return value
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit():
        raise InvalidArgument(f"{value!r} is not HOST:PORT (or unix:PATH)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not HOSTNAME_RE.match(host):
            raise InvalidArgument(f"{value!r}: {host!r} is neither a host name nor an IP address") from None
    check_port(int(port), allow_ephemeral)
    return value
