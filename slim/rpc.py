"""Speaking the core's gRPC contract (``protos/slim/v1/core.proto``): the one place that
opens channels and stubs, and that maps statuses to SLIM's errors both ways.

* **Clients** — the CLI, the Slurm plugin and the labs use :class:`CoreClient`
  (blocking); a relay's link to the core uses :class:`AsyncCoreClient` (asyncio).
  Every failed call raises a :class:`~slim.errors.SlimError` (:func:`error_from_rpc`),
  never a ``grpc.RpcError``.
* **Errors** — a servicer aborts with the error class's status code *and* the class
  name in the trailing metadata (:func:`error_metadata`), because several classes
  share a code (``Overloaded`` and ``BadGateway`` are both UNAVAILABLE).  A client
  rebuilds that class; a status without the name (from a proxy, or no server at all)
  falls back to the code: NOT_FOUND is :class:`~slim.errors.NotFound`, UNAVAILABLE
  (no server answered) :class:`~slim.errors.Unreachable`, any other
  :class:`~slim.errors.Unavailable`; the error keeps the status (``status``).
* **Names** — the contract's enums and the vocabulary's: :data:`POLICY_TO_PB`,
  :data:`TIER_TO_PB` and their inverses.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc

from slim.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SlimError,
    Unauthenticated,
    Unavailable,
    Unreachable,
    error_class,
)
from slim.v1 import core_pb2 as pb
from slim.v1 import core_pb2_grpc as pb_grpc
from slim.vocabulary import Policy, Tier

T = TypeVar("T")
CALL_TIMEOUT = 15.0  # seconds a unary call may take, unless the caller says otherwise
ERROR_KEY = "slim-error"  # trailing metadata: the name of the SlimError class
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# For channels that live as long as the process (a relay's): notice a dead core within
# half a minute even while no call is running.
KEEPALIVE = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
)

POLICY_TO_PB = {
    Policy.RAM: pb.POLICY_RAM,
    Policy.DISK: pb.POLICY_DISK,
    Policy.SYNC: pb.POLICY_SYNC,
    Policy.NFS: pb.POLICY_NFS,
}
POLICY_FROM_PB = {v: k for k, v in POLICY_TO_PB.items()}
TIER_TO_PB = {
    Tier.SITE: pb.RELAY_TIER_SITE,
    Tier.PARENT: pb.RELAY_TIER_PARENT,
    Tier.OTHER: pb.RELAY_TIER_OTHER,
}
TIER_FROM_PB = {v: k for k, v in TIER_TO_PB.items()}

_BY_CODE: dict[grpc.StatusCode, type[SlimError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def policy_name(value: int, unknown: str = "?") -> str:
    """A DirectoryPolicy of the contract as the vocabulary spells it (``unknown`` if none)."""
    found = POLICY_FROM_PB.get(value)  # type: ignore[call-overload]
    return str(found) if found is not None else unknown


def tier_name(value: int) -> str:
    """A RelayTier of the contract as the vocabulary spells it (``other`` if unknown)."""
    return TIER_FROM_PB.get(value, Tier.OTHER).label  # type: ignore[call-overload, no-any-return]


# -- errors -------------------------------------------------------------------------------------
def status_code(exc: SlimError) -> grpc.StatusCode:
    return grpc.StatusCode[exc.grpc_code]


def error_metadata(exc: SlimError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata a servicer aborts with, naming ``exc``'s class."""
    return ((ERROR_KEY, type(exc).__name__),)


def error_from_rpc(exc: grpc.RpcError, address: str) -> SlimError:
    """The SlimError a failed call stands for (see the module's docstring)."""
    call: Any = exc  # a grpc.Call or an AioRpcError: both have these
    code: grpc.StatusCode = call.code()
    details: str = call.details() or code.name
    name = ""
    for key, value in call.trailing_metadata() or ():  # (key, value) pairs in both
        if key == ERROR_KEY:
            name = value.decode() if isinstance(value, bytes) else str(value)
    cls = error_class(name) or _BY_CODE.get(code)
    err: SlimError
    if cls is not None:
        err = cls.from_message(details)
    elif code is grpc.StatusCode.UNAVAILABLE:  # and no class name: no server answered
        err = Unreachable(address, details)
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
        err = Unavailable(f"the core at {address} did not answer in time: {details}")
    else:  # INTERNAL, CANCELLED, UNKNOWN, ...: the status is said beside the message
        err = Unavailable(f"the core at {address} failed: {details}")
    err.origin, err.status = address, code.name
    return err


# -- channels -------------------------------------------------------------------------------------
def _options(keepalive: bool) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    return options + list(KEEPALIVE) if keepalive else options


@dataclass(frozen=True)
class Credentials:
    """How a client proves who it is to the core, and knows the core is the core.

    * a ``unix:`` address: the local socket (no credential: the socket's mode is the check);
    * ``key`` and ``cert`` (an identity of SLIM's CA, :mod:`slim.pki`): mutual TLS;
    * ``token``: an admin token over TLS (the core's ``admin_listen``);
    * ``ca``: the CA the core's certificate must chain to (needed for both; the name
      checked is :data:`slim.pki.CORE_NAME`, whatever address is dialled);
    * ``insecure``: plaintext, for a core run with ``tls: false``.
    """

    ca: bytes | None = None
    key: bytes | None = field(default=None, repr=False)
    cert: bytes | None = None
    token: str | None = field(default=None, repr=False)
    insecure: bool = False

    @classmethod
    def from_identity(cls, directory: Path) -> Credentials:
        """The identity directory ``slim relay enroll`` or ``slim admin enroll`` wrote."""
        from slim.pki import read_identity

        files = read_identity(directory)
        return cls(ca=files.ca, key=files.key, cert=files.cert)


NONE = Credentials()


def credentials_from_environment(address: str) -> Credentials:
    """How the CLI (and the Slurm plugin) proves who it is to the core at ``address``, from
    the environment: ``$SLIM_IDENTITY`` (an identity directory: mutual TLS), else
    ``$SLIM_TOKEN`` or ``$SLIM_TOKEN_FILE`` (an admin token) with ``$SLIM_CA`` (the CA's
    certificate, a file or directory), else ``$SLIM_INSECURE=1`` (a core run with tls:
    false).  A ``unix:`` address needs none (the local socket)."""
    from slim.pki import read_ca

    if address.startswith("unix:"):
        return NONE
    if os.environ.get("SLIM_INSECURE", "") in ("1", "true", "yes"):
        return Credentials(insecure=True)
    identity = os.environ.get("SLIM_IDENTITY")
    if identity:
        return Credentials.from_identity(Path(identity))
    token = os.environ.get("SLIM_TOKEN", "")
    token_file = os.environ.get("SLIM_TOKEN_FILE", "")
    if not token and token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise InvalidArgument(f"$SLIM_TOKEN_FILE {token_file}: {exc.strerror}") from None
    ca = os.environ.get("SLIM_CA", "")
    if token and not ca:
        raise InvalidArgument(
            "an admin token needs $SLIM_CA (the CA's certificate, ca.crt) to check the core by"
        )
    return Credentials(ca=read_ca(Path(ca)) if ca else None, token=token or None)


def _tls(address: str, credentials: Credentials) -> tuple[grpc.ChannelCredentials, list[tuple[str, Any]]]:
    from slim.pki import CORE_NAME

    if credentials.ca is None:
        raise InvalidArgument(
            f"the core at {address} speaks TLS: give an identity (--identity DIR, $SLIM_IDENTITY), "
            "or a token with the CA's certificate ($SLIM_TOKEN_FILE and $SLIM_CA), or use its "
            "local socket (unix:PATH)"
        )
    tls = grpc.ssl_channel_credentials(credentials.ca, credentials.key, credentials.cert)
    if credentials.token:
        tls = grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(credentials.token))
    return tls, [("grpc.ssl_target_name_override", CORE_NAME)]


def channel(address: str, credentials: Credentials = NONE, *, keepalive: bool = False) -> grpc.Channel:
    """A blocking channel to ``address`` (``HOST:PORT`` or ``unix:PATH``)."""
    options = _options(keepalive)
    if address.startswith("unix:"):
        return grpc.secure_channel(
            address, grpc.local_channel_credentials(grpc.LocalConnectionType.UDS), options
        )
    if credentials.insecure:
        return grpc.insecure_channel(address, options=options)
    tls, more = _tls(address, credentials)
    return grpc.secure_channel(address, tls, options + more)


def aio_channel(
    address: str, credentials: Credentials = NONE, *, keepalive: bool = False
) -> grpc.aio.Channel:
    """An asyncio channel to ``address``; ``keepalive`` for a channel kept for the
    process's life."""
    options = _options(keepalive)
    if address.startswith("unix:"):
        return grpc.aio.secure_channel(
            address, grpc.local_channel_credentials(grpc.LocalConnectionType.UDS), options
        )
    if credentials.insecure:
        return grpc.aio.insecure_channel(address, options=options)
    tls, more = _tls(address, credentials)
    return grpc.aio.secure_channel(address, tls, options + more)


class CoreClient:
    """The core's two services on one blocking channel: ``core`` (what relays ask for
    nodes) and ``admin`` (what tools ask).  Use it as a context manager, or close it."""

    def __init__(self, address: str, timeout: float = CALL_TIMEOUT, credentials: Credentials = NONE) -> None:
        self.address = address
        self.timeout = timeout
        self.channel = channel(address, credentials)
        self.core = pb_grpc.CoreStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def call(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        """A unary call, e.g. ``client.call(client.admin.GetNode, request)``."""
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.address) from None

    def stream(self, method: Callable[..., Any], request: Any, timeout: float) -> Iterator[Any]:
        """The answers of a server-streaming call (e.g. Prefetch) until it ends or
        ``timeout`` passes; stopping early (``break``) cancels the call."""
        call = method(request, timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.address) from None
        finally:
            call.cancel()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CoreClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncCoreClient:
    """The same on an asyncio channel (``keepalive`` for one kept for the process's life)."""

    def __init__(
        self,
        address: str,
        timeout: float = CALL_TIMEOUT,
        *,
        keepalive: bool = False,
        credentials: Credentials = NONE,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.channel = aio_channel(address, credentials, keepalive=keepalive)
        self.core = pb_grpc.CoreStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    async def call(
        self, method: Callable[..., Awaitable[T]], request: Any, deadline: float | None = None
    ) -> T:
        """A unary call; ``deadline``: seconds it may take (default: the client's)."""
        try:
            return await method(request, timeout=deadline or self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.address) from None

    async def send(
        self, method: Callable[..., Awaitable[T]], requests: Iterable[Any], deadline: float | None = None
    ) -> T:
        return await self.call(method, iter(requests), deadline)

    async def close(self) -> None:
        await self.channel.close(grace=None)

    async def __aenter__(self) -> AsyncCoreClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
