"""The agent in no-reboot mode against a real core, object server and relay on loopback:
a built release (ram, disk, sync, nfs), copy-if-needed that fetches only what changed,
resuming from another relay, and bad digests and bad plans refused."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import zstandard
from aiohttp import web
from click.testing import CliRunner

from labs.host import free_port
from slim.agent import ee, report_up, sync
from slim.agent.__main__ import main as agent_main
from slim.agent.ee import run_dir
from slim.agent.fetch import DigestMismatch, FetchError, Relays
from slim.agent.plan import BootArgs, ObjectRef, PlanError, parse_cmdline, parse_plan, require_environment
from slim.agent.tree import scan
from slim.agent.unpack import UnsafeEntry
from slim.cli import main as cli_main
from slim.core.build import copyset
from slim.core.build.agentrt import Runtime, add_runtime, collect
from slim.core.build.image import default_cache_dir
from slim.core.build.initrd import InitrdBuilder
from slim.core.build.release import build_environment
from slim.core.control.plandoc import plan_document
from slim.core.control.redirect import Redirector
from slim.core.control.server import CoreServer, ServerTls
from slim.core.control.service import CoreService, NodeRef
from slim.core.control.state import BootEvent, State
from slim.core.registry import load_registry
from slim.core.store import Store
from slim.errors import FailedPrecondition
from slim.pki import CertificateAuthority
from slim.signing import (
    KEY_FILE,
    PUBLIC_FILE,
    KeyDirectory,
    PublicKey,
    ReloadingSigner,
    Signer,
    SigningKey,
    follow,
    verify,
)
from tests.support import (
    cpus,
    https_url,
    initrd_busybox,
    make_image,
    need,
    need_tool,
    origin,
    pki,
    relay,
    reload_registry,
    serve_on_loopback,
    start_relay_process,
    url,
)

REGISTRY = """\
settings: {{nfs_server: 10.0.0.1}}
sites:
  lab: {{prefixes: [127.0.0.0/8]}}
relays:
  r1: {{urls: ["{relay}"], site: lab}}
profiles:
  vm: {{modules: [virtio_pci, virtio_net]}}
environments:
  lite: {{image: {image}, default_policy: ram}}  # built by the test that picks it
  base:
    image: {image}
    default_policy: ram
    directories:
      /usr: nfs
      /srv: sync
      /var: disk
nodes:
  n1: {{macs: ["52:54:00:00:00:01"], profile: vm, environment: base, disk: /dev/vda2}}
"""


# -- pieces --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a=1 b c=", {"a": "1", "b": "", "c": ""}),
        ('x="two words" y=z', {"x": "two words", "y": "z"}),
        ('"q=a b" r', {"q": "a b", "r": ""}),
        ("  slim.node=n1\n", {"slim.node": "n1"}),
        ('k=a"b c"d', {"k": "ab cd"}),
    ],
)
def test_parse_cmdline(text: str, expected: dict[str, str]) -> None:
    assert parse_cmdline(text) == expected


def test_boot_args_from_cmdline() -> None:
    args = BootArgs.from_cmdline(
        "console=ttyS0 slim.node=n1 slim.env=base slim.release=sha256:"
        + "a" * 64
        + " slim.relays=http://127.0.0.1:8080/,http://127.0.0.2:8080/ quiet"
    )
    assert args.node == "n1" and args.relays == ("http://127.0.0.1:8080", "http://127.0.0.2:8080")
    for bad, words in (
        ("slim.relays=http://x:1", "slim.node"),
        ("slim.node=n1 slim.relays=ftp://x", "not an http"),
        ("slim.node=n1 slim.relays=http://x:1 slim.release=md5:1", "slim.release"),
    ):
        with pytest.raises(PlanError, match=words):
            BootArgs.from_cmdline(bad)


def test_a_plan_for_another_environment_than_the_kernels_is_refused() -> None:
    plan = parse_plan(json.dumps({"node": "n1", "environment": "base", "directories": [ROOT_DIR]}).encode())
    relays = ("http://127.0.0.1:1",)
    require_environment(plan, BootArgs("n1", "", "", relays))  # no slim.env: the core's choice
    require_environment(plan, BootArgs("n1", "base", "", relays))
    with pytest.raises(PlanError, match="the plan is for 'base', the kernel was booted for 'lite'"):
        require_environment(plan, BootArgs("n1", "lite", "", relays))
    with pytest.raises(PlanError, match=r"slim\.env: 'a b' is not an environment's name"):
        BootArgs.from_cmdline('slim.node=n1 slim.relays=http://x:1 "slim.env=a b"')


def plan_doc(*dirs: dict[str, object]) -> bytes:
    return json.dumps({"node": "n1", "environment": "e", "directories": list(dirs)}).encode()


ARCH = {"digest": "sha256:" + "b" * 64, "size": 10}
ROOT_DIR = {"path": "/", "policy": "ram", "archive": ARCH}


def PART_OF(size: int) -> dict[str, object]:
    return {"digest": "sha256:" + "c" * 64, "size": size}


@pytest.mark.parametrize(
    ("dirs", "words"),
    [
        ([{"path": "etc", "policy": "ram", "archive": ARCH}], "absolute"),
        ([ROOT_DIR, {"path": "/../etc", "policy": "ram", "archive": ARCH}], "normalised"),
        ([ROOT_DIR, {"path": "/a//b", "policy": "ram", "archive": ARCH}], "normalised"),
        ([ROOT_DIR, {"path": "/etc/", "policy": "ram", "archive": ARCH}], "normalised"),
        ([ROOT_DIR, ROOT_DIR], "twice"),
        ([{"path": "/usr", "policy": "ram", "archive": ARCH}], "root"),
        ([{"path": "/", "policy": "tape", "archive": ARCH}], "policy"),
        ([{"path": "/", "policy": "ram"}], "archive"),
        ([{"path": "/", "policy": "ram", "archive": {"digest": "sha256:xyz", "size": 1}}], "digest"),
        ([{"path": "/", "policy": "nfs", "nfs": {"server": "s", "export": "rel"}}], "export"),
        ([{**ROOT_DIR, "parts": [PART_OF(4), PART_OF(5)]}], "do not add up to its size"),
        ([{**ROOT_DIR, "parts": [PART_OF(10), PART_OF(0)]}], "part 2 must name a digest and a size > 0"),
        ([{**ROOT_DIR, "parts": {"digest": ARCH["digest"]}}], "parts must be a list"),
        ([{**ROOT_DIR, "parts": [PART_OF(10)] * 1025}], "at most 1024"),
        ([{**ROOT_DIR, "parts": [{"digest": "sha256:x", "size": 10}]}], "part 1: 'sha256:x' is not"),
        ([{"path": "/", "policy": "sync", "manifest": ARCH, "parts": [PART_OF(10)]}], "do not add up"),
    ],
)  # fmt: skip
def test_plan_refuses(dirs: list[dict[str, object]], words: str) -> None:
    with pytest.raises(PlanError, match=words):
        parse_plan(plan_doc(*dirs))


def test_plan_orders_parents_first() -> None:
    plan = parse_plan(
        plan_doc(
            {"path": "/usr/local", "policy": "ram", "archive": ARCH},
            {"path": "/", "policy": "ram", "archive": ARCH},
            {"path": "/usr", "policy": "ram", "archive": ARCH},
        )
    )
    assert [d.path for d in plan.directories] == ["/", "/usr", "/usr/local"]


# -- a cluster on loopback -----------------------------------------------------------
@dataclass
class Site:
    image: Path
    store: Store
    service: CoreService
    relay_url: str
    relay2_url: str
    trust: Path  # the core's public key file (what --trust names)
    key_id: str
    registry_file: Path
    relay_https_url: str  # r1's HTTPS listener (its certificate: r1.relay.slim, SLIM's CA)
    ca: Path  # SLIM's CA certificate (what --ca names)

    async def name_r1(self, url: str) -> None:
        """The registry names r1 by ``url`` (what plans send nodes to), as an admin would."""
        self.registry_file.write_text(REGISTRY.format(relay=url + "/", image=self.image))
        await reload_registry(self.service)

    def https_argv(self, target: Path, token_file: Path) -> tuple[str, ...]:
        """n1's agent in no-reboot mode through r1's HTTPS listener, with a token."""
        return ("--node", "n1", "--relay", self.relay_https_url, "--ca", str(self.ca),
                "--trust", str(self.trust), "--no-reboot", "--target", str(target),
                "--token-file", str(token_file))  # fmt: skip

    def cli_where(self, keys: Path) -> tuple[str, ...]:
        """What `slim keys rotate` and `slim ee build` are told: the registry, store and keys."""
        return ("--registry", str(self.registry_file), "--store", str(self.store.root), "--keys", str(keys))

    def argv(self, target: Path, node: str = "n1") -> tuple[str, ...]:
        """The agent's arguments for ``node`` in no-reboot mode through r1, building ``target``."""
        return ("--node", node, "--relay", self.relay_url, "--trust", str(self.trust), "--no-reboot",
                "--target", str(target))  # fmt: skip

    async def events(self) -> list[BootEvent]:
        """n1's boot events from the core's state (read off the event loop, as the core does)."""
        return await asyncio.to_thread(self.service.list_events, "n1")


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    image = tmp_path / "image"
    image.mkdir()
    make_image(image)
    reg_file = tmp_path / "registry.yaml"
    reg_file.write_text(REGISTRY.format(relay="http://127.0.0.1:9/", image=image))
    store = Store(tmp_path / "store")
    build_environment(load_registry(reg_file), store, "base")
    state = await asyncio.to_thread(State, tmp_path / "state.db")  # off the loop, as the core does
    signer = ReloadingSigner(tmp_path / "keys")  # as `slim core serve` signs: a new key there is taken up
    service = await asyncio.to_thread(  # it reads the state: off the loop, as the core starts
        CoreService,
        load_registry(reg_file),
        state,
        store,
        Redirector(random.Random(1)),
        registry_path=reg_file,
        signer=signer,
    )
    tls = await asyncio.to_thread(ServerTls.from_ca, pki().ca_dir)  # TLS on, as the core runs
    core = CoreServer(service, "127.0.0.1:0", tls=tls)
    port = await core.start()
    try:
        async with (
            origin(store) as o,
            relay(
                tmp_path / "cache1", [url(o)], name="r1", core=f"127.0.0.1:{port}", https_listen="127.0.0.1:0"
            ) as r1,
            relay(tmp_path / "cache2", [url(o)]) as r2,
        ):
            # now that the relay's port is known, the registry names it (as an admin would)
            reg_file.write_text(REGISTRY.format(relay=url(r1) + "/", image=image))
            await reload_registry(service)
            yield Site(
                image, store, service, url(r1), url(r2), tmp_path / "keys" / PUBLIC_FILE, signer.public.id,
                reg_file, https_url(r1), pki().ca_dir / "ca.crt",
            )  # fmt: skip
    finally:
        await core.stop(1)
        await asyncio.to_thread(state.close)


async def run_agent(*argv: str) -> int:
    return await asyncio.get_running_loop().run_in_executor(None, agent_main, list(argv))


def tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for e in scan(root):
        if any(e.path == s or e.path.startswith(s + "/") for s in skip):
            continue
        digest = hashlib.sha256((root / e.path).read_bytes()).hexdigest() if e.kind == "file" else ""
        out[e.path] = (e.kind, e.mode, e.mtime_ns if e.kind != "dir" else 0, e.target, digest)
    return out


async def test_no_reboot_builds_the_environment(site: Site, tmp_path: Path, archive_check: str) -> None:
    target = tmp_path / "node"
    code = await run_agent(*site.argv(target))
    assert code == 0
    # ram (/), disk (/var) and sync (/srv) hold exactly the image; /usr (nfs) is a mount point
    built = tree(target, skip=("usr",))
    image = tree(site.image, skip=("usr",))
    assert built == image
    assert (target / "usr").is_dir() and not any((target / "usr").iterdir())
    active = json.loads((run_dir(target, no_reboot=True) / "ee").read_text())
    assert active["node"] == "n1" and active["environment"] == "base"
    assert active["release"] == site.store.release_digest("base")
    events = list(reversed(await site.events()))
    stages = [e.stage for e in events]
    assert stages == ["plan", "ram:/", "sync:/srv", "mount:/usr", "disk:/var", "done"]  # parents first
    assert all(e.ok and e.relay == "r1" and e.boot_id == active["boot_id"] for e in events)
    assert [e.time for e in events] == sorted(e.time for e in events)


async def test_a_node_with_two_cpus_unpacks_an_archive_in_parts_side_by_side(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, archive_check: str
) -> None:
    """Parts of 16 kB here (16 MiB of tar in a product's release): the release names them, the
    plan carries them, and a node with two CPUs unpacks each directory's in two processes,
    every part asked of the relay by Range (the relay fetching the archive first), into
    what the image holds."""
    monkeypatch.setattr(copyset, "PART_BYTES", 16 << 10)
    await asyncio.to_thread(build_environment, load_registry(site.registry_file), site.store, "base")
    release = site.store.release("base")
    assert release is not None
    parted = [p for p, d in release[1].directories.items() if len(d.parts) > 1]
    assert sorted(parted) == ["/", "/srv"]  # (/var: one small file, one part)
    forked = cpus(monkeypatch, 2)
    target = tmp_path / "node"
    assert await run_agent(*site.argv(target)) == 0
    assert tree(target, skip=("usr",)) == tree(site.image, skip=("usr",))
    assert len(forked) == len(parted)  # one more process for each
    events = {e.stage: e for e in await site.events()}
    for stage, path in (("ram:/", "/"), ("sync:/srv", "/srv")):
        parts = len(release[1].directories[path].parts)
        assert events[stage].ok and f"its {parts} parts unpacked by 2 processes" in events[stage].message
    assert events["disk:/var"].ok and "parts" not in events["disk:/var"].message


async def test_the_environment_picked_at_the_menu_is_the_one_planned(site: Site, tmp_path: Path) -> None:
    """n1 boots base by default; its menu offered lite too, and lite's kernel came up
    (slim.env=lite): the plan is lite's, not the default's.  Secrets go only with what the
    registry or an admin gave n1 (base): none with a pick, and none of base's either."""
    env_secret, n1_secret = tmp_path / "munge.key", tmp_path / "n1.key"
    env_secret.write_bytes(b"base's munge key")
    n1_secret.write_bytes(b"n1's host key")
    text = _with_secrets(site.registry_file.read_text(), env_secret, n1_secret, "secrets_without_token: true")
    site.registry_file.write_text(text)
    await reload_registry(site.service)
    await asyncio.to_thread(build_environment, load_registry(site.registry_file), site.store, "lite")
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"quiet slim.node=n1 slim.env=lite slim.relays={site.relay_url}/\n")
    target = tmp_path / "node"
    args = ("--cmdline", str(cmdline), "--trust", str(site.trust), "--no-reboot", "--target")
    assert await run_agent(*args, str(target)) == 0
    active = json.loads((run_dir(target, no_reboot=True) / "ee").read_text())
    assert active["environment"] == "lite" and active["release"] == site.store.release_digest("lite")
    plan = next(e for e in await site.events() if e.stage == "plan")
    assert plan.environment == "lite" and plan.message.startswith("lite "), plan
    assert not (target / "etc/ssh/ssh_host_ed25519_key").exists()
    assert not (target / "etc/munge/munge.key").exists()
    assert not [e for e in await site.events() if e.stage == "secrets"]  # none planned, none asked
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{site.relay_url}/v1/nodes/n1/secrets?environment=lite") as r,
    ):
        assert r.status == 403 and "go only to nodes given it" in (await r.json())["error"]
    # a kernel of an environment the registry no longer has: refused by name, nothing built
    cmdline.write_text(f"slim.node=n1 slim.env=gone slim.relays={site.relay_url}/\n")
    assert await run_agent(*args, str(tmp_path / "gone")) != 0
    assert not run_dir(tmp_path / "gone", no_reboot=True).exists()


async def test_a_boot_through_an_https_relay(site: Site, tmp_path: Path) -> None:
    """A site that asks for HTTPS: the registry names r1 by its https:// URL, the node is told
    that URL; plan, objects and events all go over TLS, r1's certificate checked against
    SLIM's CA (--ca).  With another CA's certificate instead, nothing is fetched."""
    await site.name_r1(site.relay_https_url)
    https = ("--relay", site.relay_https_url, "--ca", str(site.ca))
    argv = ("--node", "n1", *https, "--trust", str(site.trust), "--no-reboot", "--target")
    assert await run_agent(*argv, str(tmp_path / "node")) == 0
    assert tree(tmp_path / "node", skip=("usr",)) == tree(site.image, skip=("usr",))
    events = await site.events()
    assert {"plan", "done"} <= {e.stage for e in events} and all(e.ok for e in events)
    other = await asyncio.to_thread(CertificateAuthority.load_or_create, tmp_path / "other-ca")
    (tmp_path / "other.pem").write_bytes(other.cert_pem)
    wrong = [a if a != str(site.ca) else str(tmp_path / "other.pem") for a in argv]
    assert await run_agent(*wrong, str(tmp_path / "node2")) == 1
    assert not (tmp_path / "node2").exists()


async def test_sync_fetches_only_what_changed(site: Site, tmp_path: Path) -> None:
    target = tmp_path / "node"
    argv = site.argv(target)
    assert await run_agent(*argv) == 0
    first = {e.stage: e.bytes for e in await site.events()}
    srv = target / "srv" / "data"
    (srv / "small").write_text("changed locally\n")
    (srv / "extra").write_text("not in the manifest\n")
    os.utime(srv / "big", ns=(1, 1))  # same bytes, other mtime: hashed, not fetched
    assert await run_agent(*argv) == 0
    second = next(e for e in await site.events() if e.stage == "sync:/srv")
    assert second.bytes < first["sync:/srv"]
    assert "1 files fetched, 1 deleted" in second.message
    assert tree(target / "srv") == tree(site.image / "srv")


async def test_sync_fetches_ahead_in_order_and_cleans_up_when_a_fetch_fails(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changed files are fetched on several connections ahead of the one being written; they
    land in tree order, and a bad object fails the boot without leaving temporary files."""
    monkeypatch.setattr(sync, "FETCH_THREADS", 2)
    monkeypatch.setattr(sync, "FETCH_AHEAD", 2)  # both changed files at once
    target = tmp_path / "node"
    argv = site.argv(target)
    assert await run_agent(*argv) == 0
    srv = target / "srv" / "data"
    size = (srv / "big").stat().st_size
    (srv / "small").write_text("changed locally, and longer\n")
    (srv / "big").write_bytes(os.urandom(size))
    assert await run_agent(*argv) == 0
    fixed = next(e for e in await site.events() if e.stage == "sync:/srv")
    assert "2 files fetched, 0 deleted" in fixed.message
    assert tree(target / "srv") == tree(site.image / "srv")
    # the relays' and the store's copies of big's first chunk go bad; small, after it in tree
    # order, is fetched ahead meanwhile: the repair must fail, and clean up small's download
    head = next(copyset.chunker().cut_buf((site.image / "srv" / "data" / "big").read_bytes())).data
    digest = hashlib.sha256(head).hexdigest()
    damaged = [p for p in tmp_path.rglob(digest) if p.is_file()] + [
        site.store.object_path(f"sha256:{digest}")
    ]
    for p in damaged:
        os.chmod(p, 0o644)
        p.write_bytes(b"damaged")
    (srv / "small").write_text("changed again\n")
    (srv / "big").write_bytes(os.urandom(size))
    assert await run_agent(*argv) == 1
    failed = [e for e in await site.events() if not e.ok]
    assert failed and failed[0].stage == "sync:/srv", failed
    assert not list(target.rglob(".slim-fetch-*"))  # nothing fetched ahead is left behind


async def test_digest_mismatch_stops_the_boot(site: Site, tmp_path: Path, archive_check: str) -> None:
    release = site.store.release("base")
    assert release is not None
    archive = release[1].directories["/"].archive
    assert archive is not None
    path = site.store.object_path(archive.digest)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    target = tmp_path / "node"
    code = await run_agent(*site.argv(target))
    assert code == 1
    failed = [e for e in await site.events() if not e.ok]
    assert (
        failed
        and failed[0].stage == "ram:/"
        and ("sha256" in failed[0].message or "short" in failed[0].message)
    )
    assert not (target / "etc").exists() and not (target / "run").exists()  # none of it is used
    assert [p.name for p in target.iterdir()] == []


def _tar_zst(*members: tuple[str, bytes], after: bytes = b"") -> bytes:
    """A tar of ``members`` (``after``: more bytes past its end), compressed by zstd."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return zstandard.ZstdCompressor().compress(raw.getvalue() + after)


async def test_an_archive_of_other_bytes_is_refused_whichever_zstd_unpacks_it(
    site: Site, tmp_path: Path, archive_check: str
) -> None:
    """A relay that sends other bytes of the archive's length (the relays check what they
    fetch; this one lies): refused.  The initrd's zstd reads to the end and says the bytes
    are not the archive's, even when what they decode to was refused first, and without
    decoding what follows (a well-made archive with an unsafe member, then 64 MiB of
    zeros in a few kB).  Bytes that are the ones named but no archive of ours are refused
    too, by what is wrong with them."""
    release = site.store.release("base")
    assert release is not None and release[1].directories["/"].archive is not None
    ref = release[1].directories["/"].archive
    data = site.store.read_object(ref.digest)
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 1
    unsafe = _tar_zst(("../escaped", b"hi"))
    bomb = unsafe + zstandard.ZstdCompressor().compress(bytes(64 << 20)) + b"\0"
    other = _ref(bomb[:-1] + b"\1")  # its size, another digest
    trailing = _tar_zst(("ok", b"fine"), after=bytes(2 << 20))  # more after its end than a tar pads
    wanted = ObjectRef(ref.digest, ref.size)
    cases: dict[str, tuple[bytes, ObjectRef, type[Exception] | tuple[type[Exception], ...], str]] = {
        "damaged": (bytes(damaged), wanted, DigestMismatch, ""),
        "bomb": (bomb, other, DigestMismatch, ""),
        "unsafe, named": (unsafe, _ref(unsafe), UnsafeEntry, "'..'"),
        "no zstd, named": (b"not zstd" * 99, _ref(b"not zstd" * 99), FetchError, "zstd could not decompress"),
        "trailing, named": (trailing, _ref(trailing), UnsafeEntry, "bytes after its end"),
        "right": (data, wanted, Exception, ""),
    }
    sent: list[bytes] = []

    async def liar(request: web.Request) -> web.Response:
        return web.Response(body=sent[-1])

    app = web.Application()
    app.router.add_get("/objects/sha256/{name}", liar)
    runner, url = await serve_on_loopback(app)
    loop = asyncio.get_running_loop()
    try:
        for name, (body, named, refusal, says) in cases.items():
            sent.append(body)
            relays = Relays([url])
            into = tmp_path / name
            into.mkdir()
            try:
                got = loop.run_in_executor(
                    None, ee.extract, relays, ObjectRef(named.digest, named.size), into
                )
                if name == "right":
                    assert await got == ref.size and (into / "etc").is_dir()
                    continue
                if name == "bomb" and archive_check == "agent":
                    refusal = (DigestMismatch, UnsafeEntry)  # which comes first: a race
                with pytest.raises(refusal) as refused:
                    await got
                assert says in str(refused.value), (name, refused.value)
                if archive_check == "zstd" and refusal is DigestMismatch:
                    assert "the bytes received are not it (its sha256 is " in str(refused.value), name
            finally:
                relays.close()
    finally:
        await runner.cleanup()


def _ref(data: bytes) -> ObjectRef:
    return ObjectRef("sha256:" + hashlib.sha256(data).hexdigest(), len(data))


# -- resuming from another relay -----------------------------------------------------
async def test_resume_from_the_next_relay(site: Site) -> None:
    """A relay that breaks off after half of an object: the rest comes from the next by Range."""
    release = site.store.release("base")
    assert release is not None
    ref = release[1].directories["/"].archive
    assert ref is not None
    data = site.store.read_object(ref.digest)

    async def half(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        assert request.transport is not None
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_get("/objects/sha256/{name}", half)
    runner, broken = await serve_on_loopback(app)
    try:
        relays = Relays([broken, site.relay2_url])
        got = bytearray()
        loop = asyncio.get_running_loop()
        used = await loop.run_in_executor(None, relays.stream, ObjectRef(ref.digest, ref.size), got.extend)
        relays.close()
        assert bytes(got) == data and used == site.relay2_url
        assert relays.stats.resumed == 1 and relays.stats.relay_failures
        # and a relay that sends wrong bytes is caught
        bad = Relays([broken])
        with pytest.raises(DigestMismatch):
            await loop.run_in_executor(
                None, bad.stream, ObjectRef("sha256:" + "0" * 64, len(data) // 2), got.extend
            )
        bad.close()
    finally:
        await runner.cleanup()


async def test_unknown_node_is_a_clear_error(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_agent(*site.argv(tmp_path, node="nosuch"))
    assert code == 1
    assert "nosuch" in capsys.readouterr().err
    assert not run_dir(tmp_path, no_reboot=True).exists()


# -- the agent's runtime in the initrd -----------------------------------------------
def unpack_initrd(tmp_path: Path, trust: Path, ca: Path | None = None) -> Path:
    """The agent's runtime as an initrd, unpacked; with ``ca``: with ssl and that CA."""
    builder = InitrdBuilder()
    runtime = collect(https=ca is not None, build_cache=default_cache_dir())  # as slim ee build
    assert runtime.warnings == []
    runtime.trust([PublicKey.from_text(trust.read_text())])
    if ca is not None:
        runtime.trust_ca(ca.read_bytes())
    add_runtime(builder, runtime)
    image = tmp_path / "initrd.zst"
    with open(image, "wb") as out:
        info = builder.write(out, level=3)
    assert info.compressed_size < 25 << 20
    root = tmp_path / "initrd"
    root.mkdir()
    subprocess.run(f"zstd -dc {image} | cpio -idm --quiet", shell=True, cwd=root, check=True)  # noqa: S602
    return root


async def test_initrd_runtime_runs_the_agent(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The initrd's own Python (only what the agent imports) builds the environment, chrooted;
    its archives in parts of 16 kB, unpacked side by side where this machine has two CPUs."""
    need(os.geteuid() == 0, "root (chroot)")
    monkeypatch.setattr(copyset, "PART_BYTES", 16 << 10)
    await asyncio.to_thread(build_environment, load_registry(site.registry_file), site.store, "base")
    for tool, package in (("cpio", "cpio"), ("zstd", "zstd"), ("busybox", "busybox-static")):
        need_tool(tool, package)
    chroot = shutil.which("chroot")
    assert chroot is not None
    loop = asyncio.get_running_loop()
    root = await loop.run_in_executor(None, unpack_initrd, tmp_path, site.trust)
    assert [p.name for p in (root / "etc" / "slim" / "keys").iterdir()] == [f"{site.key_id}.pub"]
    assert (root / "init").stat().st_mode & 0o111
    assert os.readlink(root / "bin" / "sh") == "busybox"
    assert not list(root.rglob("*_ssl*")) and not list(root.rglob("libcrypto*"))  # left out
    await boots_in_its_initrd(chroot, root, site, site.relay_url)
    unpacked = next(e for e in await site.events() if e.stage == "ram:/")
    side_by_side = "parts unpacked by 2 processes" in unpacked.message
    assert side_by_side == (len(os.sched_getaffinity(0)) >= 2), unpacked.message


async def boots_in_its_initrd(chroot: str, root: Path, site: Site, relay_url: str) -> None:
    """The initrd unpacked at ``root`` runs its own Python and agent, chrooted, against
    ``relay_url``, trusting the initrd's own keys; it builds the image under /target."""
    cmd = [
        chroot, str(root), "/usr/bin/python3", "-S", "-B", "-m", "slim.agent",
        "--node", "n1", "--relay", relay_url, "--trust", "/etc/slim/keys",  # the initrd's own
        "--no-reboot", "--target", "/target",
    ]  # fmt: skip
    env = {"PYTHONPATH": "/lib/slim", "PATH": "/bin:/usr/bin"}
    proc = await asyncio.get_running_loop().run_in_executor(
        None, lambda: subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    )
    assert proc.returncode == 0, proc.stderr
    assert tree(root / "target", skip=("usr",)) == tree(site.image, skip=("usr",))


def test_a_runtime_with_ssl_needs_the_ca(tmp_path: Path) -> None:
    runtime = Runtime(https=True)
    runtime.trust([SigningKey.load_or_create(tmp_path / "keys").public])
    with pytest.raises(FailedPrecondition, match="speaks HTTPS but holds no CA"):
        add_runtime(InitrdBuilder(), runtime)
    with pytest.raises(FailedPrecondition, match="not a PEM certificate"):
        runtime.trust_ca(b"not a certificate")


async def test_initrd_with_ssl_boots_through_an_https_relay(site: Site, tmp_path: Path) -> None:
    """Built for a registry with an https relay, the initrd carries ssl, OpenSSL's libraries and
    SLIM's CA (/etc/slim/ca.pem, the agent's default), and its own Python boots through r1's
    HTTPS listener, chrooted."""
    need(os.geteuid() == 0, "root (chroot)")
    for tool, package in (("cpio", "cpio"), ("zstd", "zstd"), ("busybox", "busybox-static")):
        need_tool(tool, package)
    chroot = shutil.which("chroot")
    assert chroot is not None
    await site.name_r1(site.relay_https_url)
    loop = asyncio.get_running_loop()
    root = await loop.run_in_executor(None, unpack_initrd, tmp_path, site.trust, site.ca)
    assert (root / "etc" / "slim" / "ca.pem").read_bytes() == site.ca.read_bytes()
    for library in ("_ssl.*.so", "libssl.so*", "libcrypto.so*"):
        assert list(root.rglob(library)), library
    await boots_in_its_initrd(chroot, root, site, site.relay_https_url)


async def test_relay_killed_mid_object_the_next_relay_finishes(site: Site, tmp_path: Path) -> None:
    """A relay process SIGKILLed in the middle of an object: the agent resumes from the next by Range."""
    data = random.Random(5).randbytes(48 << 20)  # more than socket buffers hold
    ref = site.store.put_bytes(data)
    loop = asyncio.get_running_loop()
    victim = await loop.run_in_executor(None, start_relay_process, tmp_path / "victim", site.relay2_url)
    try:
        relays = Relays([victim.url, site.relay2_url])
        got = bytearray()

        def write(chunk: bytes | memoryview) -> None:
            got.extend(chunk)
            if len(got) >= 1 << 20:
                victim.kill()  # SIGKILL, with most of the object still to come

        used = await loop.run_in_executor(None, relays.stream, ObjectRef(ref.digest, ref.size), write)
        relays.close()
        assert used == site.relay2_url and bytes(got) == data
        assert relays.stats.resumed == 1 and victim.url in relays.stats.relay_failures[0]
    finally:
        victim.kill()
        await loop.run_in_executor(None, victim.proc.communicate)


async def test_sync_into_an_empty_place_unpacks_the_archive_then_compares(
    site: Site, tmp_path: Path, archive_check: str
) -> None:
    """Copy-if-needed with nothing to compare with (a first boot, a blank disk) takes the
    directory's one compressed archive instead of a request per file, and keeps its manifest;
    the next run finds the directory as the first left it (its walk is the one recorded),
    fetching nothing and parsing no manifest; a change made on the node since is found."""
    target = tmp_path / "node"
    found = site.store.release("base")
    assert found is not None
    srv = found[1].directories["/srv"]
    assert srv.archive is not None and srv.manifest is not None
    assert await run_agent(*site.argv(target)) == 0
    first = next(e for e in await site.events() if e.stage == "sync:/srv")
    assert first.ok and first.bytes == srv.archive.size + srv.manifest.size, first
    assert tree(target / "srv") == tree(site.image / "srv")
    assert await run_agent(*site.argv(target)) == 0
    again = next(e for e in await site.events() if e.stage == "sync:/srv")
    unchanged = "0 files fetched, 0 deleted; manifest kept; as the last boot left it;"
    assert again.message.startswith(unchanged), again
    assert "decode" not in again.message and not again.bytes
    # a file's mode changed on the node: the walk is not the one recorded; compared, mended
    changed = next(p for p in sorted((target / "srv").rglob("*")) if p.is_file() and not p.is_symlink())
    changed.chmod(0o600)
    assert await run_agent(*site.argv(target)) == 0
    mended = next(e for e in await site.events() if e.stage == "sync:/srv")
    assert mended.message.startswith("0 files fetched, 0 deleted; manifest kept; look "), mended
    assert "decode" in mended.message and tree(target / "srv") == tree(site.image / "srv")
    # without the kept manifest (a node that never kept one): the whole manifest again
    shutil.rmtree(target.with_name(target.name + ".slim-state"))
    assert await run_agent(*site.argv(target)) == 0
    third = next(e for e in await site.events() if e.stage == "sync:/srv")
    assert third.message.startswith("0 files fetched, 0 deleted; manifest whole;")
    assert third.bytes == srv.manifest.size
    # a blank disk but for an empty directory (still a first boot): unpacked, then compared
    shutil.rmtree(target / "srv")
    (target / "srv" / "left-over").mkdir(parents=True)
    assert await run_agent(*site.argv(target)) == 0
    fourth = next(e for e in await site.events() if e.stage == "sync:/srv")
    assert fourth.message.startswith("2 files unpacked (empty: the archive), 1 deleted;"), fourth
    assert tree(target / "srv") == tree(site.image / "srv")


# -- the environment's own report that it is up -----------------------------------------


def _systemd_root(root: Path, target: str = "graphical.target") -> None:
    (root / "lib" / "systemd" / "system").mkdir(parents=True)
    (root / "lib" / "systemd" / "systemd").write_text("")
    (root / "sbin").mkdir()
    (root / "sbin" / "init").symlink_to("/lib/systemd/systemd")  # absolute: resolved inside root
    (root / "lib" / "systemd" / "system" / "default.target").symlink_to(target)


def test_report_up_for_a_systemd_environment_is_a_unit_in_its_ram(tmp_path: Path) -> None:
    need_tool("busybox", "busybox-static")
    root = tmp_path / "newroot"
    _systemd_root(root)
    written = report_up.install(
        root, node="n1", boot_id="ab12", environment="base", relays=["http://r1:1"], init="/sbin/init",
        nfs=True, macs=["52:54:00:12:34:56"], busybox=Path(shutil.which("busybox") or "/bin/busybox"),
    )  # fmt: skip
    assert all(p.startswith("/run/") for p in written), written  # RAM only: nothing in the image
    unit = (root / "run/systemd/system/slim-up.service").read_text()
    assert "After=graphical.target" in unit and "ExecStart=/run/slim/busybox sh /run/slim/report" in unit
    wants = root / "run/systemd/system/graphical.target.wants/slim-up.service"
    assert os.readlink(wants) == "../slim-up.service"
    network = (root / "run/systemd/network/00-slim-boot.network").read_text()
    assert "MACAddress=52:54:00:12:34:56" in network and "Unmanaged=yes" in network
    assert "mac:52:54:00:12:34:56" in (root / "run/NetworkManager/conf.d/00-slim-boot.conf").read_text()
    # systemd.unit= on the kernel command line names the target the EE boots to
    again = tmp_path / "again"
    _systemd_root(again)
    report_up.install(
        again, node="n1", boot_id="ab12", environment="base", relays=["http://r1:1"], init="/sbin/init",
        nfs=False, busybox=Path(shutil.which("busybox") or "/bin/busybox"), unit="multi-user.target",
    )  # fmt: skip
    assert "After=multi-user.target" in (again / "run/systemd/system/slim-up.service").read_text()
    assert not (again / "run/systemd/network").exists()  # nothing on NFS: the EE manages its NICs


def test_report_up_for_another_init_is_only_the_script(tmp_path: Path) -> None:
    need_tool("busybox", "busybox-static")
    root = tmp_path / "newroot"
    (root / "sbin").mkdir(parents=True)
    (root / "sbin" / "init").write_text("#!/bin/sh\n")
    written = report_up.install(
        root, node="n1", boot_id="ab12", environment="base", relays=["http://r1:1"], init="/sbin/init",
        nfs=False, busybox=Path(shutil.which("busybox") or "/bin/busybox"),
    )  # fmt: skip
    assert written == ["/run/slim/busybox", "/run/slim/report"]


def test_the_scripts_left_in_the_ee_run_only_the_applets_the_initrds_busybox_has() -> None:
    """report_up.APPLETS is what the initrd's busybox is built with, beside the boot's own:
    every `$bb APPLET` of the scripts, their shell, and the poweroff or reboot an order names."""
    used = {"sh"}  # the scripts' #!/run/slim/busybox sh, and their units' ExecStart
    for script in (report_up.REPORT_SCRIPT, report_up.ORDERS_SCRIPT):
        used |= set(re.findall(r'\$bb "?([a-z_]+)', script))
    used |= {"poweroff", "reboot"}  # `$bb "$1" -f` with the order
    assert set(report_up.APPLETS) == used - {"$1"}, sorted(used)


@pytest.mark.parametrize("which", ["initrd", "debian"])
async def test_report_script_tells_the_core_the_environment_is_up(
    site: Site, tmp_path: Path, which: str
) -> None:
    """The script the agent leaves in /run, run by busybox as the EE's init would, posts
    `up` for the boot to the relays; the first relay is down, the second takes it.  With
    the initrd's busybox (only the applets SLIM runs) and with Debian's (the initrd's when
    the build host cannot build its own)."""
    busybox = initrd_busybox() if which == "initrd" else need_tool("busybox", "busybox-static")
    root = tmp_path / "newroot"
    (root / "sbin").mkdir(parents=True)
    (root / "sbin" / "init").write_text("#!/bin/sh\n")
    await asyncio.to_thread(
        site.service.report_events, [BootEvent("n1", "beef01", "switch_root", 1.0, environment="base")]
    )
    report_up.install(
        root, node="n1", boot_id="beef01", environment="base", init="/sbin/init", nfs=False,
        relays=[f"http://127.0.0.1:{free_port()}", site.relay_url], busybox=Path(busybox),
    )  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        busybox, "sh", str(root / "run/slim/report"), 'reached "the" target\n',
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err
    assert f"reported up to {site.relay_url}" in out.decode()
    (up,) = [e for e in await site.events() if e.stage == "up"]
    assert (up.boot_id, up.ok, up.environment, up.relay) == ("beef01", True, "base", "r1")
    assert up.message == "reached the target"  # quotes and control characters dropped
    view = await asyncio.to_thread(site.service.node_view, "n1")
    assert view.boot is not None and view.boot.state == "up"


# -- plans the agent must refuse ---------------------------------------------------------
def _doctored(site: Site, nonce: str, case: str) -> dict[str, object]:
    """The relay's answer to a plan request, as someone on the path (or a relay) would forge it."""
    plan = site.service.boot_plan(NodeRef(name="n1"), "127.0.0.1", peek=True)
    signer = site.service.signer
    assert signer is not None
    issued = time.time()
    if case == "expired":
        issued -= 3 * 86400
    if case == "another node":
        plan = dataclasses.replace(plan, node="n9")
    document = plan_document(plan, "00" * 16 if case == "replayed" else nonce, issued)
    signature = (SigningKey.generate() if case == "another key" else signer).sign(document)
    if case == "one byte changed":
        document = document.replace(b'"ram"', b'"rAm"', 1)
    return {"document": document.decode(), "signature": signature, "relay_time": time.time()}


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("one byte changed", "signature does not verify against the trusted keys"),
        ("another key", "signature does not verify against the trusted keys"),
        ("expired", "the signed plan expired"),
        ("another node", "the signed plan is for node 'n9', not 'n1'"),
        ("replayed", "its nonce is not ours"),
    ],
)
async def test_a_forged_plan_is_refused_before_anything_is_fetched(
    site: Site, tmp_path: Path, case: str, why: str
) -> None:
    asked: list[str] = []
    reported: list[dict[str, object]] = []

    async def plan(request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(_doctored, site, request.query["nonce"], case))

    async def anything(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.Response(status=404)

    async def events(request: web.Request) -> web.Response:
        reported.extend((await request.json())["events"])
        return web.json_response({"accepted": 1})

    app = web.Application()
    app.router.add_get("/v1/nodes/n1/plan", plan)
    app.router.add_post("/v1/nodes/n1/events", events)
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app)
    await runner.setup()
    forger = web.TCPSite(runner, "127.0.0.1", 0)
    await forger.start()
    port = forger._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        target = tmp_path / "node"
        code = await run_agent(
            "--node", "n1", "--relay", f"http://127.0.0.1:{port}", "--trust", str(site.trust),
            "--no-reboot", "--target", str(target),
        )  # fmt: skip
    finally:
        await runner.cleanup()
    assert code == 1
    assert asked == [] and not target.exists()  # nothing fetched, nothing made
    (refused,) = reported
    assert refused["stage"] == "plan" and refused["ok"] is False
    assert why in str(refused["message"]), refused


# -- a node that proves who it is with its token ------------------------------------------
async def test_a_node_with_a_token_boots_where_its_site_asks_for_one(site: Site, tmp_path: Path) -> None:
    """At a site with node_identity: token, the agent's plan request needs the node's token
    (slim node enroll); with it the node builds and its events count.  The up report it
    leaves in RAM (root's only) proves its boot with the boot key the agent registered, never
    with the token, even over plain HTTP."""
    registry = Path(str(site.service.registry_path))
    text = registry.read_text().replace(
        "prefixes: [127.0.0.0/8]", "prefixes: [127.0.0.0/8], node_identity: token"
    )
    registry.write_text(text)
    await reload_registry(site.service)
    code = await run_agent(*site.argv(tmp_path / "no-token"))
    assert code == 1
    assert not (tmp_path / "no-token").exists()  # refused before anything was fetched
    issued = await asyncio.to_thread(site.service.issue_token, "node", "n1", None)
    token_file = tmp_path / "node.token"
    token_file.write_text(issued.text + "\n")
    # a token goes only over TLS: given only http:// relays, the agent refuses to send it
    assert await run_agent(*site.argv(tmp_path / "http"), "--token-file", str(token_file)) == 1
    assert not (tmp_path / "http").exists()
    assert await run_agent(*site.https_argv(tmp_path / "ee", token_file)) == 0
    stages = [e.stage for e in await site.events()]
    assert "plan" in stages and "done" in stages
    # the up report: only root on the node may run it; it proves its boot with the boot key the
    # agent registered at switch_root (over TLS, with the token), never with the token
    busybox = initrd_busybox()
    root = tmp_path / "newroot"
    (root / "sbin").mkdir(parents=True)
    (root / "sbin" / "init").write_text("#!/bin/sh\n")
    boot_key = secrets.token_urlsafe(24)
    report_up.install(
        root, node="n1", boot_id="cafe01", environment="base", init="/sbin/init", nfs=False,
        relays=[site.relay_url], busybox=Path(busybox), boot_key=boot_key,
    )  # fmt: skip
    assert stat.S_IMODE((root / "run/slim/report").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "run/slim/boot_key").stat().st_mode) == 0o600
    assert issued.text not in "".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())

    def up(key: str, stage: str = "up") -> int:
        """POST an event of boot cafe01 with ``key`` over plain HTTP; the status."""
        body = {"events": [{"boot_id": "cafe01", "stage": stage}], "boot_key": key}
        relays = Relays([site.relay_url], rounds=1)
        try:
            relays.call("POST", "/v1/nodes/n1/events", body)
        except FetchError as exc:
            return int(str(exc).split(": ")[1])
        finally:
            relays.close()
        return 200

    assert await asyncio.to_thread(up, boot_key) == 401  # not registered yet
    reporter = ee.Reporter(Relays([site.relay_https_url], token=issued.text, ca=site.ca), "n1", "base")
    reporter.boot_id = "cafe01"
    digest = hashlib.sha256(boot_key.encode()).hexdigest()

    def send(stage: str, key: str) -> bool:
        reporter(stage, boot_key_sha256=key)
        return reporter.drain(tries=0)  # the relay took it

    assert await asyncio.to_thread(send, "plan", digest)
    assert await asyncio.to_thread(send, "plan", digest)  # sent again: the same key is fine
    other = hashlib.sha256(b"another key").hexdigest()
    assert not await asyncio.to_thread(send, "plan", other)  # a second key for the boot: refused
    reporter._unsent.clear()
    assert not await asyncio.to_thread(send, "ram:/", digest)  # only the plan event registers
    await asyncio.to_thread(reporter.close)
    reporter.relays.close()
    assert await asyncio.to_thread(up, "x" + boot_key[1:]) == 401  # another key
    assert await asyncio.to_thread(up, boot_key, "plan") == 403  # it proves only the up report
    proc = await asyncio.create_subprocess_exec(
        busybox,
        "sh",
        str(root / "run/slim/report"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err
    assert [e.boot_id for e in await site.events() if e.stage == "up"] == ["cafe01"]
    # revoked: refused on its next call
    await asyncio.to_thread(site.service.revoke_tokens, issued.record.id)
    assert await run_agent(*site.https_argv(tmp_path / "revoked", token_file)) == 1


# -- per-node secrets ----------------------------------------------------------------------
SECRETS = """\
    secrets:
      - {{source: {env_secret}, path: /etc/munge/munge.key, mode: "0400"}}
nodes:
  n1:
    macs: ["52:54:00:00:00:01"]
    profile: vm
    environment: base
    disk: /dev/vda2
    secrets: [{{source: {n1_secret}, path: /etc/ssh/ssh_host_ed25519_key, mode: "0600"}}]
  n2:
    macs: ["52:54:00:00:00:02"]
    profile: vm
    environment: base
    disk: /dev/vda2
"""


def _with_secrets(text: str, env_secret: Path, n1_secret: Path, site: str) -> str:
    head, _, _ = text.partition("nodes:\n")
    head = head.replace("lab: {prefixes: [127.0.0.0/8]}", f"lab: {{prefixes: [127.0.0.0/8], {site}}}")
    return head + SECRETS.format(env_secret=env_secret, n1_secret=n1_secret)


def _everything_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                yield path


async def test_a_node_secret_reaches_its_node_only_and_nothing_else_keeps_it(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A secret of the environment and one of n1: both arrive in n1's EE at their paths and
    modes; n2 gets the environment's only; their bytes are in no store object, relay cache
    file, state database, event or log line.  At a MAC site that has not opted in, or for
    a token over plain HTTP, nothing is sent and the boot fails saying why."""
    caplog.set_level(logging.DEBUG)
    env_bytes, n1_bytes = secrets.token_hex(24).encode(), secrets.token_hex(24).encode()
    env_secret, n1_secret = tmp_path / "munge.key", tmp_path / "n1.key"
    env_secret.write_bytes(env_bytes)
    n1_secret.write_bytes(n1_bytes)
    registry = Path(str(site.service.registry_path))
    plain = registry.read_text()

    async def use(site_settings: str, text: str = plain) -> None:
        registry.write_text(_with_secrets(text, env_secret, n1_secret, site_settings))
        await reload_registry(site.service)

    # a MAC site that has not said secrets may go to MAC-identified nodes: refused
    await use("node_identity: mac")
    assert await run_agent(*site.argv(tmp_path / "refused")) == 1
    (failed,) = [e for e in await site.events() if e.stage == "secrets"]
    assert not failed.ok and "secrets_without_token: true" in failed.message
    # a token over plain HTTP: refused too (secrets go to token nodes over TLS only)
    await use("node_identity: token")
    issued = await asyncio.to_thread(site.service.issue_token, "node", "n1", None)
    (tmp_path / "n1.token").write_text(issued.text)
    argv = (*site.argv(tmp_path / "plain-http"), "--token-file", str(tmp_path / "n1.token"))
    assert await run_agent(*argv) == 1  # our agent never sends its token in clear
    assert not (tmp_path / "plain-http").exists()
    # ... and a client that would is refused its secrets by the core (asked over plain HTTP)
    headers = {"Authorization": f"Bearer {issued.text}"}
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{site.relay_url}/v1/nodes/n1/secrets", headers=headers) as r,
    ):
        assert r.status == 403 and "over TLS only" in (await r.json())["error"]
        assert n1_bytes.decode() not in await r.text()
    # ... and over HTTPS, they arrive (the relay's HTTPS listener, checked against SLIM's CA)
    argv = site.https_argv(tmp_path / "https", tmp_path / "n1.token")
    # the plan's relays: r1 over https
    await use("node_identity: token", plain.replace(site.relay_url + "/", site.relay_https_url + "/"))
    assert await run_agent(*argv) == 0
    assert (tmp_path / "https" / "etc/ssh/ssh_host_ed25519_key").read_bytes() == n1_bytes
    # the site opts in, in writing: n1 gets both, n2 only the environment's
    await use("secrets_without_token: true")
    assert await run_agent(*site.argv(tmp_path / "n1")) == 0
    assert await run_agent(*site.argv(tmp_path / "n2", node="n2")) == 0
    for root, expected in (
        (
            tmp_path / "n1",
            {"/etc/munge/munge.key": (env_bytes, 0o400), "/etc/ssh/ssh_host_ed25519_key": (n1_bytes, 0o600)},
        ),
        (tmp_path / "n2", {"/etc/munge/munge.key": (env_bytes, 0o400)}),
    ):
        for path, (content, mode) in expected.items():
            f = root / path.lstrip("/")
            assert (
                f.read_bytes() == content and stat.S_IMODE(f.stat().st_mode) == mode and f.stat().st_uid == 0
            )
    assert not (tmp_path / "n2" / "etc/ssh/ssh_host_ed25519_key").exists()
    # nowhere else: the store, the relays' caches, the core's state, events, logs
    state = Path(site.service.state.path)
    kept = [tmp_path / "store", tmp_path / "cache1", tmp_path / "cache2"]
    for stored in [*_everything_under(*kept), *state.parent.glob(state.name + "*")]:
        data = stored.read_bytes()
        assert env_bytes not in data and n1_bytes not in data, stored
    events = [*await site.events(), *await asyncio.to_thread(site.service.list_events, "n2")]
    assert any(e.stage == "secrets" and e.ok and e.message == "2 file(s)" for e in events)
    for e in events:
        assert env_bytes.decode() not in e.message and n1_bytes.decode() not in e.message
    assert env_bytes.decode() not in caplog.text and n1_bytes.decode() not in caplog.text


# -- a key rotation ------------------------------------------------------------------------
def initrd_keys(store: Store, into: Path) -> list[str]:
    """The ids of the public keys the initrd of base's current release trusts (its
    /etc/slim/keys, unpacked under ``into``: what --trust then names, as the initrd's agent
    uses it)."""
    found = store.release("base")
    assert found is not None
    archive = zstandard.ZstdDecompressor().stream_reader(store.read_object(found[1].initrd.digest)).read()
    into.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "etc/slim/keys/*"], input=archive, cwd=into, check=True)
    return sorted(p.name.removesuffix(".pub") for p in (into / "etc" / "slim" / "keys").iterdir())


@asynccontextmanager
async def plan_signed_by(
    site: Site, signer: Signer, endorsements: list[dict[str, str]] | None = None
) -> AsyncIterator[tuple[str, list[dict[str, object]]]]:
    """A relay that answers n1's plan (the core's own, for the agent's nonce) signed by
    ``signer``, with ``endorsements``, and records the events posted to it: (its URL, the
    events).  The plan names the real relay, so an agent that accepts it boots through that one."""
    reported: list[dict[str, object]] = []

    def answer(nonce: str) -> dict[str, object]:
        plan = site.service.boot_plan(NodeRef(name="n1"), "127.0.0.1", peek=True)
        document = plan_document(plan, nonce, time.time())
        return {"document": document.decode(), "signature": signer.sign(document), "relay_time": time.time(),
                "endorsements": endorsements or []}  # fmt: skip

    async def plan(request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(answer, request.query["nonce"]))

    async def events(request: web.Request) -> web.Response:
        reported.extend((await request.json())["events"])
        return web.json_response({"accepted": 1})

    app = web.Application()
    app.router.add_get("/v1/nodes/n1/plan", plan)
    app.router.add_post("/v1/nodes/n1/events", events)
    runner = web.AppRunner(app)
    await runner.setup()
    server = web.TCPSite(runner, "127.0.0.1", 0)
    await server.start()
    try:
        yield f"http://127.0.0.1:{server._server.sockets[0].getsockname()[1]}", reported  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def last_plan_event(site: Site) -> BootEvent:
    return next(e for e in await site.events() if e.stage == "plan")


async def slim_cli(*args: str) -> str:
    """``slim ARGS`` (off the event loop, as a command runs beside the core); its standard output."""
    result = await asyncio.to_thread(CliRunner().invoke, cli_main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.slow
async def test_key_rotation_boots_nodes_whose_initrd_trusts_both_then_refuses_the_old_key(
    site: Site, tmp_path: Path
) -> None:
    """slim keys rotate, without a VM: the rebuilt initrd trusts both keys, and a node that
    trusts what it trusts boots from the plans the running core now signs with the new key
    (and from one the old key signed); after --finish, the next initrd trusts the new key
    alone, and a plan the old key signed is refused before anything is fetched, saying why."""
    need_tool("cpio", "cpio")
    keys = tmp_path / "keys"
    where = site.cli_where(keys)
    old = SigningKey.load(keys / KEY_FILE)  # kept by the test: the rotation deletes it
    began = json.loads(await slim_cli("keys", "rotate", "--json", *where))
    new = SigningKey.load(keys / KEY_FILE).public
    assert (began["signing"], began["previous"]) == (new.id, old.public.id)
    digest = site.store.release_digest("base")
    assert digest is not None and [(r["environment"], r["release"]) for r in began["rebuilt"]] == [
        ("base", digest)
    ]
    assert await asyncio.to_thread(initrd_keys, site.store, tmp_path / "during") == sorted(
        [old.public.id, new.id]
    )
    assert (
        verify(site.store.read_object(digest), site.store.release_signature("base"), [new], "release") == new
    )
    # a build during the rotation makes the same initrd (both keys), signed with the new key
    (rebuilt,) = json.loads(await slim_cli("ee", "build", "base", "--json", *where))
    assert rebuilt["unchanged"] and site.store.release_digest("base") == digest
    trust = str(tmp_path / "during" / "etc" / "slim" / "keys")

    def argv(relay: str, target: Path) -> tuple[str, ...]:
        return ("--node", "n1", "--relay", relay, "--trust", trust, "--no-reboot", "--target", str(target))

    # the running core signs with the new key: the node boots
    assert await run_agent(*argv(site.relay_url, tmp_path / "a")) == 0
    event = await last_plan_event(site)
    assert event.ok and event.message.endswith(f"signed: {new.id}.pub"), event
    assert (run_dir(tmp_path / "a", no_reboot=True) / "ee").is_file()
    # a plan the old key signed (one on its way when the rotation began) boots it too
    async with plan_signed_by(site, old) as (relay_url, _):
        assert await run_agent(*argv(relay_url, tmp_path / "b")) == 0
    event = await last_plan_event(site)
    assert event.ok and event.message.endswith(f"signed: {old.public.id}.pub"), event

    finished = await slim_cli("keys", "rotate", "--finish", *where)
    assert f"rotation finished: key {old.public.id} is no longer trusted" in finished
    after = site.store.release_digest("base")
    assert f"base: release {after} rebuilt; its initrd trusts {new.id}\n" in finished
    assert await asyncio.to_thread(initrd_keys, site.store, tmp_path / "after") == [new.id]
    trust = str(tmp_path / "after" / "etc" / "slim" / "keys")
    async with plan_signed_by(site, old) as (relay_url, reported):
        assert await run_agent(*argv(relay_url, tmp_path / "c")) == 1
    (refused,) = reported
    assert refused["stage"] == "plan" and refused["ok"] is False
    assert f"does not verify against the trusted keys ({new.id}.pub)" in str(refused["message"]), refused
    assert not (tmp_path / "c").exists()  # nothing fetched, nothing made
    assert await run_agent(*argv(site.relay_url, tmp_path / "d")) == 0
    assert (await last_plan_event(site)).message.endswith(f"signed: {new.id}.pub")


async def test_a_boot_medium_follows_the_key_rotations_from_the_key_it_carries(
    site: Site, tmp_path: Path
) -> None:
    """A medium made before two rotations carries the first key only: with
    --follow-endorsements it trusts the keys each rotation endorsed (the core hands the chain
    with the plan) and boots; a release's initrd (no flag) does not; an endorsement no trusted
    key signed adds nothing."""
    keys = tmp_path / "keys"
    medium = tmp_path / "medium.pub"
    shutil.copy(keys / PUBLIC_FILE, medium)  # what the medium carries
    first = PublicKey.from_text(medium.read_text())
    where = site.cli_where(keys)
    for _ in range(2):
        await slim_cli("keys", "rotate", *where)
        await slim_cli("keys", "rotate", "--finish", *where)
    now = SigningKey.load(keys / KEY_FILE).public
    chain = KeyDirectory(keys).endorsements()
    assert len(chain) == 2 and follow([first], chain)[-1] == now

    def argv(target: Path, *more: str) -> tuple[str, ...]:
        return ("--node", "n1", "--relay", site.relay_url, "--trust", str(medium), "--no-reboot",
                "--target", str(target), *more)  # fmt: skip

    assert await run_agent(*argv(tmp_path / "initrd")) == 1  # no flag: the first key alone
    assert await run_agent(*argv(tmp_path / "medium", "--follow-endorsements")) == 0
    event = await last_plan_event(site)
    assert event.ok and event.message.endswith("signed: endorsed-1.pub"), event
    # a stranger's key, endorsed by itself: not followed, its plan refused
    stranger = SigningKey.generate()
    text = stranger.public.text()
    forged = [{"key": text, "signature": stranger.sign(text.encode())}]
    async with plan_signed_by(site, stranger, forged) as (relay_url, reported):
        medium_argv = argv(tmp_path / "forged", "--follow-endorsements")
        assert await run_agent(*medium_argv[:2], "--relay", relay_url, *medium_argv[4:]) == 1
    assert not (tmp_path / "forged").exists() and "does not verify" in str(reported[0]["message"])


def test_secrets_never_go_through_a_symbolic_link(tmp_path: Path) -> None:
    """An environment whose path to a secret holds a symbolic link (here, out of the root):
    refused, and nothing is made outside the root; a secret is written whole, with its mode."""
    from slim.agent import secrets as node_secrets

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "etc").mkdir(parents=True)
    outside.mkdir()
    (root / "etc" / "munge").symlink_to(outside)
    secret = node_secrets.Secret("/etc/munge/sub/munge.key", 0o400, "root", b"k" * 100_000)
    with pytest.raises(PlanError, match="symbolic link"):
        node_secrets.install(root, [secret])
    assert list(outside.iterdir()) == []
    ok = node_secrets.Secret("/etc/slim/k", 0o440, "0:0", b"k" * 100_000)
    assert node_secrets.install(root, [ok]) == ["/etc/slim/k"]
    assert (root / "etc/slim/k").read_bytes() == ok.content
    assert stat.S_IMODE((root / "etc/slim/k").stat().st_mode) == 0o440


# -- a boot medium's first stage ------------------------------------------------------------
async def run_medium(*argv: str) -> tuple[int, str, str]:
    """The medium's agent (slim.agent.medium) in its own process; (exit, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "slim.agent.medium", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_boot_medium_fetches_the_verified_release_and_hands_on_its_token(
    site: Site, tmp_path: Path
) -> None:
    """The medium asks its relays for n1's plan with its token (the first relay is down: the
    next answers), checks it, fetches the release's kernel and initrd by the plan's digests,
    appends its token to the initrd (a cpio archive the kernel unpacks over the release's),
    and starts the kernel with the plan's arguments, the relays it reached and the boot's id.
    A revoked token stops it with a message that says so, before anything is fetched."""
    issued = await asyncio.to_thread(site.service.issue_token, "node", "n1", None)
    token_file = tmp_path / "node.token"
    token_file.write_text(issued.text + "\n")
    down = f"https://127.0.0.1:{free_port()}"
    medium = tmp_path / "medium.json"
    medium.write_text(json.dumps({"id": "0123abcd", "node": "n1", "relays": [down, site.relay_https_url]}))
    (tmp_path / "cmdline").write_text("slim.medium=0123abcd console=ttyS0\n")
    argv = ("--medium", str(medium), "--cmdline", str(tmp_path / "cmdline"), "--trust", str(site.trust),
            "--ca", str(site.ca), "--token-file", str(token_file), "--work", str(tmp_path / "work"),
            "--follow-endorsements", "--no-kexec")  # fmt: skip
    code, out, err = await run_medium(*argv)
    assert code == 0, err
    started = json.loads(out)
    found = site.store.release("base")
    assert found is not None
    release = found[1]
    assert Path(started["kernel"]).read_bytes() == site.store.object_path(release.kernel.digest).read_bytes()
    release_initrd = site.store.object_path(release.initrd.digest).read_bytes()
    initrd = Path(started["initrd"]).read_bytes()
    assert initrd.startswith(release_initrd)
    cpio = ["cpio", "-i", "--quiet", "--to-stdout", "etc/slim/node.token"]
    start = len(release_initrd) + (-len(release_initrd) % 4)  # where the kernel looks for it
    assert initrd[len(release_initrd) : start] == b"\0" * (start - len(release_initrd))
    assert initrd[start : start + 6] == b"070701"
    tail = initrd[start:]
    done = await asyncio.to_thread(subprocess.run, cpio, input=tail, capture_output=True, check=True)
    assert done.stdout == issued.text.encode() + b"\n"
    args = parse_cmdline(started["cmdline"])
    assert args["slim.node"] == "n1" and args["slim.env"] == "base"
    assert args["slim.relays"].split(",")[0] == site.relay_https_url  # the one that answered
    assert issued.text not in started["cmdline"]
    events = sorted((e for e in await site.events() if e.boot_id == args["slim.boot"]), key=lambda e: e.time)
    assert [e.stage for e in events] == ["medium", "medium:kernel", "medium:initrd", "kexec"]
    assert all(e.ok for e in events)
    assert events[1].bytes == release.kernel.size
    # revoked: stopped at a message that says so, nothing fetched
    await asyncio.to_thread(site.service.revoke_tokens, issued.record.id)
    shutil.rmtree(tmp_path / "work")
    code, out, err = await run_medium(*argv)
    assert code == 1 and out == ""
    assert "refused this medium's token" in err, err
    assert not (tmp_path / "work").exists()
    # a token the core never issued: the same
    token_file.write_text(f"node.{secrets.token_hex(8)}.{'A' * 43}\n")
    code, out, err = await run_medium(*argv)
    assert code == 1 and "refused this medium's token" in err, err


async def run_medium_typing(typed: str, *argv: str) -> tuple[int, str, str]:
    """The medium's agent with ``typed`` on its standard input (the console, on a real boot)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "slim.agent.medium", *argv,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(typed.encode()), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_generic_medium_trades_a_one_time_code_for_the_nodes_token(
    site: Site, tmp_path: Path
) -> None:
    """A generic medium (no node, no token) asks for a one-time code, trades it with the relay over
    HTTPS for the node's token, keeps that in its cache, and boots the node's release with it;
    its next boot asks nothing.  A code mistyped may be typed again; a used or an expired code
    stops it with a message that says so; over plain HTTP the relay takes no code."""
    code = await asyncio.to_thread(site.service.issue_token, "code", "n1", None)
    assert re.fullmatch(r"([0-9A-Z]{4}-){3}[0-9A-Z]{4}", code.text) and code.record.kind == "code"
    medium = tmp_path / "medium.json"
    medium.write_text(json.dumps({"id": "0123abcd", "node": "", "relays": [site.relay_https_url]}))
    (tmp_path / "cmdline").write_text("console=ttyS0\n")
    cache = tmp_path / "cache"
    argv = ("--medium", str(medium), "--cmdline", str(tmp_path / "cmdline"), "--trust", str(site.trust),
            "--ca", str(site.ca), "--work", str(tmp_path / "work"), "--cache-dir", str(cache),
            "--no-kexec")  # fmt: skip
    typed = (
        f"{'0' * 16}\n{code.text.lower().replace('-', ' ')}\n"  # a wrong code, then the right one, as typed
    )
    rc, out, err = await run_medium_typing(typed, *argv)
    assert rc == 0, err
    assert err.count("type the one-time code") == 2 and "do not know that code" in err
    assert "this PC is node n1" in err
    kept = json.loads((cache / "node.json").read_text())
    assert kept["node"] == "n1" and stat.S_IMODE((cache / "node.json").stat().st_mode) == 0o600
    started = json.loads(out)
    assert parse_cmdline(started["cmdline"])["slim.node"] == "n1"
    assert site.service.tokens.check(kept["token"], "node", time.time()).name == "n1"  # n1's own token
    # the next boot: the kept token, nothing asked
    rc, out, err = await run_medium_typing("", *argv)
    assert rc == 0 and "one-time code" not in err, err
    # the kept token revoked: the medium asks for a new code, and keeps the new token
    await asyncio.to_thread(site.service.revoke_tokens, "", "node", "n1")
    second = await asyncio.to_thread(site.service.issue_token, "code", "n1", None)
    rc, out, err = await run_medium_typing(second.text + "\n", *argv)
    assert rc == 0 and "the token this medium kept was refused" in err, err
    renewed = json.loads((cache / "node.json").read_text())
    assert renewed["token"] != kept["token"]
    assert site.service.tokens.check(renewed["token"], "node", time.time()).name == "n1"
    # a used code, and an expired one, stop the medium where it asks
    fresh = tmp_path / "fresh"
    again = (*argv[:-3], "--cache-dir", str(fresh), "--no-kexec")
    rc, out, err = await run_medium_typing(code.text + "\n", *again)
    assert rc == 1 and "refused this one-time code" in err and "already used" in err, err
    expired = await asyncio.to_thread(site.service.issue_token, "code", "n1", 0.001)
    await asyncio.sleep(0.01)
    rc, out, err = await run_medium_typing(expired.text + "\n", *again)
    assert (
        rc == 1 and "has expired" in err and "Ask your SLIM administrator for a new one-time code" in err
    ), err
    assert not (fresh / "node.json").exists()
    # the relay takes codes over HTTPS only
    other = await asyncio.to_thread(site.service.issue_token, "code", "n1", None)
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{site.relay_url}/v1/redeem", json={"code": other.text}) as resp,
    ):
        assert resp.status == 403 and "HTTPS only" in (await resp.json())["error"]


async def test_a_medium_cache_keeps_the_boots_objects_and_checks_them(site: Site, tmp_path: Path) -> None:
    """With a local cache (a boot medium's, here a directory), the first boot fetches and keeps
    what it fetched; the next fetches nothing; a damaged copy is fetched again, never used; and
    after a boot the cache holds only that boot's objects."""
    cache = tmp_path / "cache"
    stale = cache / "objects" / "sha256" / ("0" * 64)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an object of an older release")

    async def boot(name: str) -> tuple[int, str]:
        assert await run_agent(*site.argv(tmp_path / name), "--cache-dir", str(cache)) == 0
        done = max((e for e in await site.events() if e.stage == "done"), key=lambda e: e.time)
        return done.bytes, done.message

    fetched, said = await boot("first")
    assert fetched > 0 and "0 objects (0 bytes) read" in said and "1 removed" in said, said
    assert not stale.exists()
    kept = sorted(p.name for p in stale.parent.iterdir())
    assert kept and all(len(k) == 64 for k in kept)
    fetched, said = await boot("second")
    assert fetched == 0 and f"{len(kept)} objects" in said and "0 kept" in said, said
    assert tree(tmp_path / "first") == tree(tmp_path / "second")
    damaged = stale.parent / kept[0]
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    fetched, said = await boot("third")
    assert fetched > 0 and "1 kept" in said, said
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == kept[0]
    assert tree(tmp_path / "first") == tree(tmp_path / "third")
