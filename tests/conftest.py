"""Shared fixtures: a test registry, a store with releases, a real core on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import shutil
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import uvloop
from blockbuster import blockbuster_ctx

from labs.placeholders import publish_placeholder_releases
from slim.agent import ee
from slim.core.build import unzstd
from slim.core.build.image import default_cache_dir
from slim.core.control.redirect import Redirector
from slim.core.control.server import CoreServer, ServerTls
from slim.core.control.service import CoreService
from slim.core.control.state import State
from slim.core.registry import Registry, load_registry
from slim.core.store import Store
from slim.pki import CertificateAuthority
from slim.rpc import aio_channel
from slim.signing import SigningKey
from slim.v1 import core_pb2_grpc as pb_grpc
from tests.support import (
    LOOP_BLOCKING_ALLOWED,
    PKI,
    TEST_REGISTRY,
    Core,
    Served,
    TestPki,
    admin_credentials,
    need,
    pki,
    read_address,
    short_socket,
    start_core,
    stop,
)

ROOT = Path(__file__).resolve().parent.parent
BOTH_LOOPS = ("tests.test_relay", "tests.test_relay_api")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Relay tests run on uvloop (what relays run) and on the stock loop; the rest on the stock loop."""
    module = getattr(item, "module", None)
    if module is not None and module.__name__ in BOTH_LOOPS:
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
def registry_file(tmp_path: Path) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(TEST_REGISTRY)
    return path


@pytest.fixture
def registry(registry_file: Path) -> Registry:
    return load_registry(registry_file)


@pytest.fixture
def store(tmp_path: Path, registry: Registry) -> Store:
    """A store with releases for every environment except ``unbuilt``."""
    st = Store(tmp_path / "store")
    # signed with the core's key (the service fixture's), as a build signs them
    publish_placeholder_releases(
        registry, st, only=["base", "jdk14"], signer=SigningKey.load_or_create(tmp_path / "keys")
    )
    return st


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    st = State(tmp_path / "state.db")
    yield st
    st.close()


@pytest.fixture
def service(registry: Registry, registry_file: Path, state: State, store: Store) -> CoreService:
    signer = SigningKey.load_or_create(registry_file.parent / "keys")  # the core's, as it makes it
    return CoreService(
        registry, state, store, Redirector(random.Random(7)), registry_path=registry_file, signer=signer
    )


@pytest.fixture
async def core(service: CoreService) -> AsyncIterator[Core]:
    """A real gRPC core on 127.0.0.1, port 0, with TLS on, as it runs: relay calls (``core``)
    over its local socket (which may speak as any relay), admin calls (``admin``) with an
    admin certificate of the session's CA over mutual TLS."""
    loop = asyncio.get_running_loop()
    tls = await loop.run_in_executor(None, ServerTls.from_ca, pki().ca_dir, ())
    credentials = await loop.run_in_executor(None, admin_credentials)
    sock = short_socket()
    server = CoreServer(service, "127.0.0.1:0", tls=tls, socket=sock)
    port = await server.start()
    address = f"127.0.0.1:{port}"
    local = aio_channel(f"unix:{sock}")
    admin = aio_channel(address, credentials)
    try:
        yield Core(server, address, local, pb_grpc.CoreStub(local), pb_grpc.AdminStub(admin))
    finally:
        await local.close()
        await admin.close()
        await server.stop(grace=1)
        Path(sock).unlink(missing_ok=True)
        Path(sock).parent.rmdir()


@pytest.fixture
def served(tmp_path: Path, registry_file: Path, store: Store) -> Iterator[Served]:
    proc = start_core(registry_file, tmp_path)
    try:
        yield Served(proc, read_address(proc), registry_file)
    finally:
        stop(proc)


# -- the event loop must not block ------------------------------------------------------------
# The relay's and the core's async tests run with blockbuster on: a blocking call (file or
# socket I/O, os.stat, sqlite, time.sleep, a held lock...) made on a running event loop by
# the code that runs there — the relay, the object server, the core's control plane, the
# gRPC client — or by anything it calls, fails the test.  (A test's own set-up, writing
# objects into a store say, is not checked.)  Deliberate exceptions, each with its reason,
# are in tests/support.py (LOOP_BLOCKING_ALLOWED).
LOOP_CHECKED = ("tests.test_relay", "tests.test_relay_api", "tests.test_core_grpc", "tests.test_agent")
ON_THE_LOOP = ["slim.relay", "slim.objects", "slim.core.control", "slim.rpc"]


@pytest.fixture(autouse=True)
def loop_not_blocked(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.module.__name__ not in LOOP_CHECKED:
        yield
        return
    # What earlier tests left for the garbage collector is collected now, before the check
    # begins: when the last of grpc.aio's objects goes, grpc shuts its engine down (joining
    # its poller thread, a blocking call, and leaving the poller's socket pair unclosed: a
    # ResourceWarning of grpc's own).  Collected here, neither lands in a test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    with blockbuster_ctx(ON_THE_LOOP) as bb:
        for functions, file, callers, _reason in LOOP_BLOCKING_ALLOWED:
            for function in functions:
                bb.functions[function].can_block_in(file, callers)
        yield


# What a test must never change on this machine: a lab that runs the initrd's scripts in a
# network namespace still sees this machine's /etc (an emptied resolv.conf once took apt's
# name look-ups, and a later test's download, with it).
HOST_FILES = tuple(Path(p) for p in ("/etc/resolv.conf", "/etc/hosts", "/etc/hostname"))


def _read_host_files() -> dict[Path, bytes | None]:
    return {p: p.read_bytes() if p.exists() else None for p in HOST_FILES}


@pytest.fixture(autouse=True)
def host_files_untouched() -> Iterator[None]:
    before = _read_host_files()
    yield
    changed = [p for p, data in _read_host_files().items() if data != before[p]]
    for path in changed:  # put back, so that one test's damage stays its own failure
        original = before[path]
        if original is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(original)
    assert not changed, f"the test changed this machine's {', '.join(map(str, changed))} (put back)"


@pytest.fixture(autouse=True, scope="session")
def session_ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One CA for the session (as `slim ca init` makes it): every core a test starts trusts it
    ($SLIM_CA_DIR), the CLI calls with an admin certificate of it ($SLIM_IDENTITY), relays get
    theirs from :func:`tests.support.relay_identity`.  The machine's STATE_DIR/ca is never used."""
    root = tmp_path_factory.mktemp("pki")
    CertificateAuthority.init(root / "ca")
    PKI.append(TestPki(root / "ca", root))
    saved = {k: os.environ.get(k) for k in ("SLIM_CA_DIR", "SLIM_IDENTITY")}
    os.environ["SLIM_CA_DIR"] = str(root / "ca")
    os.environ["SLIM_IDENTITY"] = str(pki().identity("tester", "admin"))
    try:
        yield
    finally:
        PKI.clear()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(autouse=True, scope="session")
def keys_never_on_the_machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A command a test runs without --keys (a build, a core) would make or read the
    machine's STATE_DIR/keys: $SLIM_KEYS points every such command at a directory of the
    session's instead, and the machine's /var/lib/slim is never touched."""
    before = os.environ.get("SLIM_KEYS")
    os.environ["SLIM_KEYS"] = str(tmp_path_factory.mktemp("keys"))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SLIM_KEYS", None)
        else:
            os.environ["SLIM_KEYS"] = before


@pytest.fixture(params=["agent", "zstd"], ids=["digest-checked-by-the-agent", "digest-checked-by-zstd"])
def archive_check(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Archives unpacked through Debian's zstd, their digest checked by the agent (the agent
    run from a checkout), or through the initrd's own (core/build/unzstd.c), which checks it."""
    if request.param == "zstd":
        need(shutil.which("gcc") is not None, "gcc (./run installs it)")
        monkeypatch.setattr(ee, "UNZSTD", str(unzstd.build(default_cache_dir())))
    else:
        monkeypatch.setattr(ee, "UNZSTD", "/nonexistent/unzstd")
    return str(request.param)
