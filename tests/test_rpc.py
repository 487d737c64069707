"""slim.rpc: an error raised in a servicer comes back to the client as the same class, even
where classes share a status code; a status without a class name falls back to the code;
no server at all is Unreachable.  On a real grpc.aio server on 127.0.0.1, port 0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from slim.errors import (
    BadGateway,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Overloaded,
    SlimError,
    Unavailable,
    Unreachable,
)
from slim.rpc import AsyncCoreClient, CoreClient, Credentials, error_metadata, status_code
from slim.v1 import core_pb2 as pb
from slim.v1 import core_pb2_grpc as pb_grpc

PLAIN = Credentials(insecure=True)  # the stand-in servers below speak plaintext gRPC

RAISED: dict[str, SlimError] = {
    "overloaded": Overloaded("too busy"),
    "bad-gateway": BadGateway("upstream sent bad bytes"),
    "unavailable": Unavailable("no live relay"),
    "not-found": NotFound("unknown node 'x'"),
}


def abort_args(name: str) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """How a servicer aborts for the node ``name``: as the core's do, or not SLIM at all."""
    if name == "plain":  # a status from something that is not SLIM: no class name
        return grpc.StatusCode.FAILED_PRECONDITION, "not now", ()
    if name == "internal":
        return grpc.StatusCode.INTERNAL, "boom", ()
    exc = RAISED[name]
    return status_code(exc), exc.message, error_metadata(exc)


class AsyncServicer(pb_grpc.CoreServicer):
    async def Locate(self, request: pb.LocateRequest, context: Any) -> pb.LocateResponse:
        if request.node.name == "slow":  # past the client's deadline
            await asyncio.sleep(5)
        code, details, metadata = abort_args(request.node.name)
        await context.abort(code, details, trailing_metadata=metadata)
        raise AssertionError("abort returned")


class Servicer(pb_grpc.CoreServicer):
    def Locate(self, request: pb.LocateRequest, context: Any) -> pb.LocateResponse:
        code, details, metadata = abort_args(request.node.name)
        context.set_trailing_metadata(metadata)  # the blocking API: metadata first, then abort
        context.abort(code, details)
        raise AssertionError("abort returned")


@pytest.fixture
async def address() -> AsyncIterator[str]:
    server = grpc.aio.server()
    pb_grpc.add_CoreServicer_to_server(AsyncServicer(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@pytest.fixture
def sync_address() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CoreServicer_to_server(Servicer(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


def locate(name: str) -> pb.LocateRequest:
    return pb.LocateRequest(node=pb.NodeRef(name=name), origin="10.0.0.1")


@pytest.mark.parametrize(
    ("name", "cls", "status"),
    [
        ("overloaded", Overloaded, "UNAVAILABLE"),
        ("bad-gateway", BadGateway, "UNAVAILABLE"),
        ("unavailable", Unavailable, "UNAVAILABLE"),
        ("not-found", NotFound, "NOT_FOUND"),
        ("plain", FailedPrecondition, "FAILED_PRECONDITION"),
    ],
)
async def test_the_class_comes_back(address: str, name: str, cls: type[SlimError], status: str) -> None:
    async with AsyncCoreClient(address, credentials=PLAIN) as client:
        with pytest.raises(SlimError) as info:
            await client.call(client.core.Locate, locate(name))
    assert type(info.value) is cls
    assert info.value.origin == address and info.value.status == status
    assert info.value.message == (RAISED[name].message if name in RAISED else "not now")


async def test_an_unknown_status_is_the_core_failing(address: str) -> None:
    async with AsyncCoreClient(address, credentials=PLAIN) as client:
        with pytest.raises(Unavailable, match=f"the core at {address} failed: boom") as info:
            await client.call(client.core.Locate, locate("internal"))
    assert info.value.status == "INTERNAL" and not isinstance(info.value, Unreachable)


async def test_a_core_too_slow_is_not_unreachable(address: str) -> None:
    async with AsyncCoreClient(address, timeout=0.2, credentials=PLAIN) as client:
        with pytest.raises(Unavailable, match="did not answer in time") as info:
            await client.call(client.core.Locate, locate("slow"))
    assert info.value.status == "DEADLINE_EXCEEDED" and not isinstance(info.value, Unreachable)


def test_blocking_client_and_no_server(sync_address: str, unused_tcp_port: int) -> None:
    with CoreClient(sync_address, credentials=PLAIN) as client, pytest.raises(Overloaded, match="too busy"):
        client.call(client.core.Locate, locate("overloaded"))
    nobody = f"127.0.0.1:{unused_tcp_port}"
    with CoreClient(nobody, timeout=5, credentials=PLAIN) as client, pytest.raises(Unreachable) as info:
        client.call(client.core.Locate, locate("x"))
    assert info.value.address == nobody and "unreachable" in info.value.message
    assert InvalidArgument("a local error").origin == ""
