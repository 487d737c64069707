"""One error hierarchy for every SLIM component.

Each class carries its HTTP status and its gRPC status code *name* (the
transports map the name to ``grpc.StatusCode``; domain code never imports
grpc or aiohttp).  Expected errors (every subclass of :class:`SlimError`) are
logged without a traceback and answered with their status; anything else is a
bug, logged with a traceback and answered as INTERNAL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


class SlimError(Exception):
    """Base of every error SLIM raises on purpose.

    An error that came back from another SLIM process over gRPC (:mod:`slim.rpc`)
    knows where from: ``origin`` is that server's address and ``status`` the status
    code it answered with."""

    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[str] = "INTERNAL"
    origin: str = ""
    status: str = ""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @classmethod
    def from_message(cls, message: str) -> SlimError:
        """An error of this class with only its message (what travels over gRPC)."""
        return cls(message)

    def __str__(self) -> str:
        return self.message


class InvalidArgument(SlimError):
    """The request (or input file) is malformed."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class NotFound(SlimError):
    """A named thing (node, environment, relay, object) does not exist."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class AlreadyExists(SlimError):
    http_status = 409
    grpc_code = "ALREADY_EXISTS"


class Unauthenticated(SlimError):
    """The caller did not say who it is, or its credential is not valid (expired, revoked,
    unknown)."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class PermissionDenied(SlimError):
    """The caller is known but may not do this (a relay calling Admin, node A's token
    asking for node B)."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class FailedPrecondition(SlimError):
    """The request is valid but the system is not in a state to answer it
    (an environment without a built release, a node without a disk for a disk
    policy, ...)."""

    http_status = 409
    grpc_code = "FAILED_PRECONDITION"


class Unavailable(SlimError):
    """Try again later: no healthy relay, a dependency is down, overloaded."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class Overloaded(Unavailable):
    """Full right now (transfers, fetches or cache space): retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 2) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unreachable(Unavailable):
    """A server (the core) could not be reached, or did not answer in time."""

    def __init__(self, address: str, details: str) -> None:
        self.address, self.details = address, details  # where, and what gRPC said
        super().__init__(f"core at {address} unreachable: {details}")

    @classmethod
    def from_message(cls, message: str) -> SlimError:
        return Unavailable(message)


class BadGateway(SlimError):
    """An upstream (parent relay, the core's store) failed or sent bad bytes."""

    http_status = 502
    grpc_code = "UNAVAILABLE"


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a configuration file."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.field}: {self.message}"


class ConfigError(InvalidArgument):
    """A configuration file is invalid; ``problems`` lists every finding."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{len(problems)} {noun} in configuration:\n{lines}")

    @classmethod
    def from_message(cls, message: str) -> SlimError:
        return InvalidArgument(message)  # the problems themselves do not travel


def error_class(name: str) -> type[SlimError] | None:
    """The error class of this module called ``name`` (how gRPC errors name theirs)."""
    found = globals().get(name)
    return found if isinstance(found, type) and issubclass(found, SlimError) else None
