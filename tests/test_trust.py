"""Who may call the core, and speak for which node (issue 17, items 3-5): mutual TLS
between relays and the core, admin certificates and tokens, the local socket, node tokens
through a relay.  Real cores and relays on loopback; certificates from real CAs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from slim.core.control.server import CoreServer, ServerTls
from slim.core.control.service import CoreService
from slim.core.store import Store
from slim.errors import InvalidArgument, NotFound, PermissionDenied, SlimError, Unauthenticated
from slim.pki import CertificateAuthority, read_issued
from slim.rpc import AsyncCoreClient, Credentials
from slim.v1 import core_pb2 as pb
from tests.support import (
    TEST_REGISTRY,
    admin_credentials,
    origin,
    pki,
    relay,
    reload_registry,
    short_socket,
    url,
)

TOKEN_REGISTRY = TEST_REGISTRY.replace("  node_identity: mac\n", "")  # the default: tokens off-site


@dataclass
class Trusted:
    server: CoreServer
    address: str  # mutual TLS
    admin_address: str  # admin tokens over TLS
    socket: str  # the local socket
    now: list[float]  # the core's clock

    def client(self, credentials: Credentials, admin_port: bool = False) -> AsyncCoreClient:
        return AsyncCoreClient(self.admin_address if admin_port else self.address, credentials=credentials)


@asynccontextmanager
async def trusted_core(service: CoreService) -> AsyncIterator[Trusted]:
    """A core with every way in: mutual TLS, admin tokens over TLS, the local socket; its
    clock is ``now[0]`` (so that tokens expire without waiting)."""
    now = [1_800_000_000.0]
    service.clock = lambda: now[0]
    tls = await asyncio.to_thread(ServerTls.from_ca, pki().ca_dir)
    sock = short_socket()
    server = CoreServer(service, "127.0.0.1:0", tls=tls, admin_listen="127.0.0.1:0", socket=sock)
    port = await server.start()
    try:
        yield Trusted(server, f"127.0.0.1:{port}", f"127.0.0.1:{server.admin_port}", sock, now)
    finally:
        await server.stop(1)
        Path(sock).unlink(missing_ok=True)
        Path(sock).parent.rmdir()


async def credentials_of(role: str, name: str) -> Credentials:
    directory = await asyncio.to_thread(pki().identity, name, role)
    return await asyncio.to_thread(Credentials.from_identity, directory)


async def ca_cert() -> bytes:
    return await asyncio.to_thread((pki().ca_dir / "ca.crt").read_bytes)


async def fails(call: Callable[[], Awaitable[Any]], kind: type[SlimError], words: str) -> None:
    with pytest.raises(kind) as caught:
        await call()
    assert words in caught.value.message, caught.value.message


def locate(client: AsyncCoreClient, peek: bool = False) -> Callable[[], Awaitable[Any]]:
    request = pb.LocateRequest(node=pb.NodeRef(name="n1"), origin="10.1.0.9", peek=peek)
    return lambda: client.call(client.core.Locate, request)


def list_nodes(client: AsyncCoreClient) -> Callable[[], Awaitable[Any]]:
    return lambda: client.call(client.admin.ListNodes, pb.ListNodesRequest())


# -- relays and mutual TLS ------------------------------------------------------------------------
async def test_only_relays_with_a_certificate_of_the_ca_can_call_the_core(
    service: CoreService, tmp_path: Path
) -> None:
    stranger = await asyncio.to_thread(CertificateAuthority.init, tmp_path / "other-ca")
    await asyncio.to_thread(stranger.enroll, "room-1", "relay", tmp_path / "forged")
    forged = await asyncio.to_thread(Credentials.from_identity, tmp_path / "forged")
    async with trusted_core(service) as core:
        ours = core.client(await credentials_of("relay", "room-1"))
        answer = await ours.call(
            ours.core.Locate, pb.LocateRequest(node=pb.NodeRef(name="n1"), origin="10.1.0.9")
        )
        assert answer.node == "n1"
        no_cert = core.client(Credentials(ca=await ca_cert()))
        # another CA's certificate, with the CA's own certificate to trust the core by
        other_ca = core.client(Credentials(ca=await ca_cert(), key=forged.key, cert=forged.cert))
        for client in (no_cert, other_ca):
            with pytest.raises(SlimError) as caught:  # the handshake fails: no call is made
                await client.call(
                    client.core.Locate, pb.LocateRequest(node=pb.NodeRef(name="n1"), origin="10.1.0.9")
                )
            assert caught.value.status == "UNAVAILABLE"
            await client.close()
        # a core whose certificate is not of the CA the client trusts is not believed either
        fooled = core.client(Credentials(ca=forged.ca, key=forged.key, cert=forged.cert))
        with pytest.raises(SlimError):
            await fooled.call(fooled.admin.ListRelays, pb.ListRelaysRequest())
        await fooled.close()
        await ours.close()


async def test_a_relay_is_the_name_in_its_certificate(service: CoreService) -> None:
    async with trusted_core(service) as core:
        client = core.client(await credentials_of("relay", "room-1"))

        async def beats(*names: str) -> list[pb.HeartbeatReply]:
            call = client.core.RelayHeartbeat(iter([pb.Heartbeat(relay=n, healthy=True) for n in names]))
            return [reply async for reply in call]

        assert len(await beats("room-1", "")) == 2  # its own name, or none (the certificate's)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await beats("room-2")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "relay:room-1 cannot heartbeat as relay 'room-2'" in str(caught.value.details())
        # events: the relay is the certificate's, whatever the event says
        sent = pb.BootEvent(node="n1", boot_id="b1", stage="kernel", relay="room-2", ok=True)
        await client.send(client.core.ReportBootEvents, [sent])
        admin = core.client(admin_credentials())
        events = await admin.call(admin.admin.ListBootEvents, pb.ListBootEventsRequest(node="n1"))
        assert [e.relay for e in events.events] == ["room-1"]
        # roles: a relay may not administer, an admin is no relay
        await fails(list_nodes(client), PermissionDenied, "relay:room-1 may not make admin calls")
        await fails(locate(admin), PermissionDenied, "admin:tester is not a relay")
        assert (await locate(admin, peek=True)()).node == "n1"  # asking what the core would answer
        for c in (client, admin):
            await c.close()


async def test_a_revoked_relay_certificate_is_refused(service: CoreService) -> None:
    async with trusted_core(service) as core:
        directory = await asyncio.to_thread(pki().identity, "lab-1", "relay")
        client = core.client(await asyncio.to_thread(Credentials.from_identity, directory))
        await locate(client)()
        ca = await asyncio.to_thread(CertificateAuthority.load, pki().ca_dir)
        revoked = await asyncio.to_thread(ca.revoke, "lab-1", "relay")
        assert [r.name for r in revoked] == ["lab-1"]
        assert all(r.revoked_at for r in read_issued(pki().ca_dir) if r.name == "lab-1")
        refused: Unauthenticated | None = None
        for _ in range(100):  # the core re-reads the CA's record within a second
            try:
                await locate(client)()
            except Unauthenticated as exc:
                refused = exc
                break
            await asyncio.sleep(0.05)
        assert refused is not None, "the revoked certificate was still accepted after 5 s"
        assert "was revoked" in refused.message
        pki()._made.pop(("relay", "lab-1"))  # later tests get a fresh one
        await client.close()


# -- admin calls ----------------------------------------------------------------------------------
async def test_admin_calls_need_a_credential(service: CoreService) -> None:
    async with trusted_core(service) as core:
        ca = await ca_cert()
        anonymous = core.client(Credentials(ca=ca), admin_port=True)
        await fails(list_nodes(anonymous), Unauthenticated, "no credential")
        # root on the core's host: the local socket, mode 0600
        assert stat.S_IMODE(os.stat(core.socket).st_mode) == 0o600
        local = AsyncCoreClient(f"unix:{core.socket}")
        issued = await local.call(
            local.admin.IssueToken,
            pb.IssueTokenRequest(kind=pb.TOKEN_KIND_ADMIN, name="ops", ttl_seconds=3600),
        )
        assert issued.token.startswith("admin.") and issued.info.name == "ops"
        ops = core.client(Credentials(ca=ca, token=issued.token), admin_port=True)
        assert len((await ops.call(ops.admin.ListNodes, pb.ListNodesRequest())).nodes) == 3
        # who did it is the credential's principal, not what the request says
        info = await ops.call(
            ops.admin.SetNextBoot, pb.SetNextBootRequest(node="n1", environment="jdk14", set_by="mallory")
        )
        assert info.next_boot.set_by == "token:ops"
        # the core keeps only the token's hash
        for path in (Path(service.state.path), Path(service.state.path + "-wal")):
            if path.exists():
                assert issued.token.split(".")[2].encode() not in await asyncio.to_thread(path.read_bytes)
        # a wrong secret, an expired token, a revoked one: refused at once
        forged = issued.token[:-4] + ("AAAA" if not issued.token.endswith("AAAA") else "BBBB")
        wrong = core.client(Credentials(ca=ca, token=forged), admin_port=True)
        await fails(list_nodes(wrong), Unauthenticated, "unknown admin token")
        core.now[0] += 3601
        await fails(list_nodes(ops), Unauthenticated, "expired")
        core.now[0] -= 3601
        await list_nodes(ops)()
        await local.call(local.admin.RevokeTokens, pb.RevokeTokensRequest(id=issued.info.id))
        await fails(list_nodes(ops), Unauthenticated, "was revoked")
        # a node's token is no admin's
        node = await local.call(
            local.admin.IssueToken, pb.IssueTokenRequest(kind=pb.TOKEN_KIND_NODE, name="n1")
        )
        as_node = core.client(Credentials(ca=ca, token=node.token), admin_port=True)
        await fails(list_nodes(as_node), PermissionDenied, "is a node token")
        for c in (anonymous, local, ops, wrong, as_node):
            await c.close()


async def test_admin_tokens_rotate(service: CoreService) -> None:
    async with trusted_core(service) as core:
        ca = await ca_cert()
        local = AsyncCoreClient(f"unix:{core.socket}")

        async def issue(retire: float = 0) -> pb.IssuedToken:
            request = pb.IssueTokenRequest(kind=pb.TOKEN_KIND_ADMIN, name="ops", retire_others_after=retire)
            return await local.call(local.admin.IssueToken, request)

        old = core.client(Credentials(ca=ca, token=(await issue()).token), admin_port=True)
        new = core.client(Credentials(ca=ca, token=(await issue(retire=600)).token), admin_port=True)
        await list_nodes(old)()  # both, during the overlap
        await list_nodes(new)()
        core.now[0] += 601
        await fails(list_nodes(old), Unauthenticated, "expired")
        await list_nodes(new)()
        listed = await local.call(local.admin.ListTokens, pb.ListTokensRequest(kind=pb.TOKEN_KIND_ADMIN))
        assert len(listed.tokens) == 2 and all(t.name == "ops" for t in listed.tokens)
        for c in (local, old, new):
            await c.close()


async def test_a_one_time_code_becomes_its_nodes_token_once(service: CoreService) -> None:
    """``slim node code``: a code for a node of the registry, taken once (RedeemCode, a relay's
    call) for a new node token; used, expired, withdrawn or never issued, it is refused saying
    which; it never passes for a token; an admin token cannot be one."""
    async with trusted_core(service) as core:
        local = AsyncCoreClient(f"unix:{core.socket}")

        async def code(name: str = "n1", ttl: float = 0) -> str:
            request = pb.IssueTokenRequest(kind=pb.TOKEN_KIND_CODE, name=name, ttl_seconds=ttl)
            return (await local.call(local.admin.IssueToken, request)).token

        def redeem(text: str) -> Callable[[], Awaitable[Any]]:
            return lambda: local.call(
                local.core.RedeemCode, pb.RedeemCodeRequest(code=text, origin="10.1.0.9")
            )

        first = await code()
        got = await redeem(first.lower())()  # as typed: any case
        assert got.node == "n1"
        assert service.tokens.check(got.token, "node", core.now[0]).name == "n1"
        await fails(redeem(first), Unauthenticated, "already used")
        await fails(redeem("ZZZZ-ZZZZ-ZZZZ-ZZZZ"), Unauthenticated, "unknown one-time code")
        await fails(redeem("node.0123456789abcdef." + "A" * 43), Unauthenticated, "not a one-time code")
        late = await code(ttl=60)
        core.now[0] += 61
        await fails(redeem(late), Unauthenticated, "has expired")
        withdrawn = await code()
        await local.call(local.admin.RevokeTokens, pb.RevokeTokensRequest(kind=pb.TOKEN_KIND_NODE, name="n1"))
        await fails(redeem(withdrawn), Unauthenticated, "already used, or withdrawn")
        with pytest.raises(Unauthenticated):  # a code is no token
            service.tokens.check(await code(), "node", core.now[0])
        await fails(lambda: code("nobody"), NotFound, "nobody")
        # only relays (and root) take codes: an admin's credential is not a relay's
        admin = core.client(await credentials_of("admin", "alice"))
        fresh = pb.RedeemCodeRequest(code=await code())
        await fails(lambda: admin.call(admin.core.RedeemCode, fresh), PermissionDenied, "")
        await admin.close()
        await fails(lambda: code(ttl=31 * 86400), InvalidArgument, "lifetime")
        await local.close()


# -- nodes and their tokens, through a relay ------------------------------------------------------
async def test_a_node_token_speaks_for_its_node_only(
    service: CoreService, store: Store, registry_file: Path, tmp_path: Path
) -> None:
    registry_file.write_text(TOKEN_REGISTRY)  # nodes at 127.0.0.1 (no site) need their token
    await reload_registry(service)
    async with trusted_core(service) as core:
        local = AsyncCoreClient(f"unix:{core.socket}")
        tokens = {}
        for node in ("n1", "n2"):
            request = pb.IssueTokenRequest(kind=pb.TOKEN_KIND_NODE, name=node)
            tokens[node] = (await local.call(local.admin.IssueToken, request)).token
        async with (
            origin(store) as o,
            relay(tmp_path / "r", [url(o)], name="room-1", core=core.address) as r,
            aiohttp.ClientSession() as s,
        ):

            async def ask(
                method: str, path: str, token: str | None, body: bytes | None = None
            ) -> tuple[int, str]:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                async with s.request(method, url(r) + path, headers=headers, data=body) as resp:
                    return resp.status, (await resp.text())

            event = b'{"boot_id": "b1", "stage": "plan"}'
            n1, n2 = tokens["n1"], tokens["n2"]
            assert (await ask("GET", "/v1/nodes/n1/plan", n1))[0] == 200
            assert (await ask("GET", "/boot/52-54-00-00-00-01.ipxe", n1))[0] == 200
            assert (await ask("POST", "/v1/nodes/n1/events", n1, event))[0] == 200
            status, text = await ask("GET", "/v1/nodes/n1/plan", None)
            assert status == 401 and "must send its node token" in text
            for method, path, body in (
                ("GET", "/v1/nodes/n2/plan", None),
                ("GET", "/v1/nodes/52:54:00:00:00:02/plan", None),
                ("GET", "/boot/52-54-00-00-00-02.ipxe", None),
                ("GET", "/v1/locate?node=n2", None),
                ("POST", "/v1/nodes/n2/events", event),
            ):
                status, text = await ask(method, path, n1, body)
                assert status == 403 and "n1's, not n2's" in text, (path, status, text)
            assert (await ask("GET", "/v1/nodes/n2/plan", n2))[0] == 200
            # a boot key: registered by the node's own plan event, for its own boot only
            key = "k" * 32

            def keyed(boot: str, secret: str) -> bytes:
                digest = hashlib.sha256(secret.encode()).hexdigest()
                return json.dumps({"boot_id": boot, "stage": "plan", "boot_key_sha256": digest}).encode()

            def up(boot: str, secret: str) -> bytes:
                return json.dumps({"events": [{"boot_id": boot, "stage": "up"}], "boot_key": secret}).encode()

            assert (await ask("POST", "/v1/nodes/n1/events", n1, keyed("b9", key)))[0] == 200
            status, text = await ask("POST", "/v1/nodes/n2/events", n2, keyed("b9", "x" * 32))
            assert status == 403 and "another node's" in text, text
            assert (await ask("POST", "/v1/nodes/n2/events", None, up("b9", key)))[0] == 401  # n1's key
            assert (await ask("POST", "/v1/nodes/n1/events", None, up("b9", "x" * 32)))[0] == 401
            assert (await ask("POST", "/v1/nodes/n1/events", None, up("b9", key)))[0] == 200
            # n1 boots again: the old boot's key proves nothing any more
            assert (await ask("POST", "/v1/nodes/n1/events", n1, keyed("c1", "y" * 32)))[0] == 200
            assert (await ask("POST", "/v1/nodes/n1/events", None, up("b9", key)))[0] == 401  # accepted above
            assert (await ask("POST", "/v1/nodes/n1/events", None, up("c1", "y" * 32)))[0] == 200
            # what a relay observes (anyone may make it: an object fetched with ?boot=b9) changes
            # nothing: only the agent's keyed events say which boot is the node's
            await r.link.report_events([pb.BootEvent(node="n1", boot_id="b9", stage="kernel")])  # type: ignore[union-attr]
            assert (await ask("POST", "/v1/nodes/n1/events", None, up("b9", key)))[0] == 401
            assert (await ask("POST", "/v1/nodes/n1/events", None, up("c1", "y" * 32)))[0] == 200
            status, text = await ask("GET", "/v1/nodes/n1/plan", "node.0123456789abcdef.x")
            assert status == 401 and "malformed" in text
            # revoked: refused on its next call
            await local.call(
                local.admin.RevokeTokens, pb.RevokeTokensRequest(kind=pb.TOKEN_KIND_NODE, name="n1")
            )
            status, text = await ask("GET", "/v1/nodes/n1/plan", n1)
            assert status == 401 and "was revoked" in text
            # the relay's own observations carry no origin: the relay vouches for them
            await r.link.report_events([pb.BootEvent(node="n2", boot_id="b2", stage="kernel")])  # type: ignore[union-attr]
        events = await local.call(local.admin.ListBootEvents, pb.ListBootEventsRequest(node="n2"))
        assert [e.stage for e in events.events] == ["kernel"]
        n1_events = await local.call(local.admin.ListBootEvents, pb.ListBootEventsRequest(node="n1"))
        # the one its token sent, and the relay's own observation of the script it served
        assert sorted(e.stage for e in n1_events.events) == [
            "kernel",
            "plan",
            "plan",
            "plan",
            "script",
            "up",
            "up",
            "up",
        ]
        await local.close()


async def test_a_site_may_identify_its_nodes_by_mac(service: CoreService, registry_file: Path) -> None:
    """LAN nodes (PXE cannot carry a token): by MAC at a site that says so, never elsewhere."""
    text = TOKEN_REGISTRY.replace(
        "  lab:\n    prefixes: [10.2.0.0/16]", "  lab:\n    prefixes: [10.2.0.0/16]\n    node_identity: token"
    )
    registry_file.write_text(text)
    await reload_registry(service)
    async with trusted_core(service) as core:
        client = AsyncCoreClient(f"unix:{core.socket}")  # as a relay would ask, not peeking

        def plan(node: str, origin: str) -> Callable[[], Awaitable[Any]]:
            request = pb.GetBootPlanRequest(node=pb.NodeRef(name=node), origin=origin)
            return lambda: client.call(client.core.GetBootPlan, request)

        assert (await plan("n1", "10.1.0.9")()).node == "n1"  # site room: mac (the default)
        await fails(plan("n2", "10.2.0.9"), Unauthenticated, "site 'lab'")
        await fails(plan("n1", "192.0.2.7"), Unauthenticated, "an address of no site")
        await client.close()


# -- the CLI --------------------------------------------------------------------------------------
def slim(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "slim.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_ca_and_enrollment_commands(tmp_path: Path, registry_file: Path) -> None:
    ca = tmp_path / "ca"
    assert slim("ca", "init", "--ca", str(ca))[0] == 0
    code, out = slim("ca", "init", "--ca", str(ca))
    assert code == 1 and "already holds a CA" in out
    assert stat.S_IMODE(os.stat(ca / "ca.key").st_mode) == 0o600
    code, out = slim(
        "relay",
        "enroll",
        "room-1",
        "--registry",
        str(registry_file),
        "--ca",
        str(ca),
        "--out",
        str(tmp_path / "r1"),
    )
    assert code == 0 and "relay:room-1" in out, out
    assert stat.S_IMODE(os.stat(tmp_path / "r1" / "key.pem").st_mode) == 0o600
    code, out = slim("relay", "enroll", "nosuch", "--registry", str(registry_file), "--ca", str(ca))
    assert code == 1 and "no relay 'nosuch'" in out
    code, out = slim(
        "relay", "enroll", "slim-core", "--registry", str(tmp_path / "none.yaml"), "--ca", str(ca)
    )
    assert code == 1 and "the core's own name" in out
    code, out = slim("ca", "list", "--ca", str(ca))
    assert "relay:room-1" in out and "valid" in out
    assert slim("relay", "revoke", "room-1", "--ca", str(ca))[0] == 0
    code, out = slim("ca", "list", "--ca", str(ca))
    assert "revoked" in out
    code, out = slim("relay", "revoke", "room-1", "--ca", str(ca))
    assert code == 1 and "no unrevoked certificate" in out


def test_the_cli_takes_its_credential_from_the_environment(served_trusted: tuple[str, str, str]) -> None:
    address, admin_address, sock = served_trusted
    code, out = slim("admin", "token", "create", "ops", "--ttl", "1h", "--core", f"unix:{sock}")
    assert code == 0, out
    token = out.split()[0]
    bare = {"SLIM_IDENTITY": ""}
    code, out = slim("node", "list", "--core", admin_address, env=bare)
    assert code == 1 and "speaks TLS" in out
    ca = str(pki().ca_dir / "ca.crt")
    code, out = slim(
        "node", "list", "--core", admin_address, env={**bare, "SLIM_TOKEN": token, "SLIM_CA": ca}
    )
    assert code == 0 and "n1" in out, out
    code, out = slim(
        "node", "list", "--core", admin_address, env={**bare, "SLIM_TOKEN": token + "x", "SLIM_CA": ca}
    )
    assert code == 1 and "UNAUTHENTICATED" in out, out
    # an admin certificate on the mutual-TLS port (what $SLIM_IDENTITY is set to in the tests)
    code, out = slim("node", "set-ee", "n1", "jdk14", "--core", address)
    assert code == 0, out
    code, out = slim("node", "show", "n1", "--core", address)
    assert "admin:tester" in out, out


@pytest.fixture
def served_trusted(tmp_path: Path, registry_file: Path, store: Store) -> object:
    from tests.support import start_core, stop

    sock = short_socket()
    proc = start_core(registry_file, tmp_path, "--admin-listen", "127.0.0.1:0", "--socket", sock)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        address = next(line.split()[-1] for line in lines if line.startswith("listening on"))
        admin = next(line.split()[-1] for line in lines if line.startswith("admin on"))
        yield address, admin, sock
    finally:
        stop(proc)
        Path(sock).parent.joinpath("core.sock").unlink(missing_ok=True)
        Path(sock).parent.rmdir()


async def test_what_a_relay_certificate_and_an_admin_token_cannot_do(
    service: CoreService, registry_file: Path
) -> None:
    """A relay vouches only for what it saw (not a node's stage without the node's address or
    token), and peeking does not spare it the node's identification; an admin token mints no
    admin token (a stolen one would outlive its revocation); a node's secrets are its
    environment's only."""
    registry_file.write_text(TOKEN_REGISTRY)
    await reload_registry(service)
    async with trusted_core(service) as core:
        relay_side = core.client(await credentials_of("relay", "room-1"))
        up = pb.BootEvent(node="n1", boot_id="b9", stage="up", ok=True)
        await fails(
            lambda: relay_side.send(relay_side.core.ReportBootEvents, [up]), InvalidArgument, "vouches only"
        )
        kernel = pb.BootEvent(node="n1", boot_id="b9", stage="kernel", ok=True)
        assert (await relay_side.send(relay_side.core.ReportBootEvents, [kernel])).accepted == 1
        up.origin = "10.1.0.9"  # a node's own, from an address of its (MAC) site: taken
        assert (await relay_side.send(relay_side.core.ReportBootEvents, [up])).accepted == 1
        peek = pb.GetBootPlanRequest(node=pb.NodeRef(name="n1"), origin="192.0.2.7", peek=True)
        await fails(lambda: relay_side.call(relay_side.core.GetBootPlan, peek), Unauthenticated, "no site")
        admin = core.client(admin_credentials())
        assert (await admin.call(admin.core.GetBootPlan, peek)).node == "n1"  # a tool, peeking
        local = AsyncCoreClient(f"unix:{core.socket}")
        issued = await local.call(
            local.admin.IssueToken, pb.IssueTokenRequest(kind=pb.TOKEN_KIND_ADMIN, name="ops")
        )
        ops = core.client(Credentials(ca=await ca_cert(), token=issued.token), admin_port=True)
        mint = pb.IssueTokenRequest(kind=pb.TOKEN_KIND_ADMIN, name="shadow")
        await fails(lambda: ops.call(ops.admin.IssueToken, mint), PermissionDenied, "admin certificate")
        long = pb.IssueTokenRequest(kind=pb.TOKEN_KIND_ADMIN, name="ops", ttl_seconds=400 * 86400)
        await fails(lambda: local.call(local.admin.IssueToken, long), InvalidArgument, "lifetime")
        other_env = pb.GetNodeSecretsRequest(
            node=pb.NodeRef(name="n1"), origin="10.1.0.9", environment="jdk14"
        )
        await fails(
            lambda: relay_side.call(relay_side.core.GetNodeSecrets, other_env), PermissionDenied, "boots base"
        )
        for c in (relay_side, admin, local, ops):
            await c.close()
