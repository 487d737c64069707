"""Archives in parts (slim.core.build.copyset.PART_BYTES): read whole, one zstd stream and
one tar; each part a zstd frame of whole members, with a digest of its own; unpacked side by
side by the agent's processes (slim.agent.ee._extract_parts) into the tree one stream makes,
and any one process's failure is the whole unpacking's, the others stopped."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from aiohttp import web

from slim.agent import ee
from slim.agent.fetch import DigestMismatch, Relays
from slim.agent.plan import ObjectRef
from slim.agent.tree import FILE, HARDLINK, scan
from slim.agent.unpack import UnsafeEntry
from slim.core.build import copyset
from slim.core.store import Store
from tests.support import cpus, origin, serve_on_loopback, url

PART = 256 << 10  # bytes of tar per part, here (the product's are 16 MiB)


def make_tree(root: Path, seed: int = 7) -> None:
    """Directories of files of every size up to 200 kB, a read-only directory whose files
    span parts, a hard link to a file parts before it, a symlink, an empty file."""
    rng = random.Random(seed)
    for i in range(6):
        for j in range(3):
            d = root / f"d{i}" / f"e{j}"
            d.mkdir(parents=True)
            for k in range(rng.randint(2, 9)):
                size = rng.choice((0, 1, 511, 512, 4096, rng.randint(1, 200_000)))
                (d / f"f{k}").write_bytes(rng.randbytes(size // 2) + bytes(size - size // 2))
    ro = root / "d3" / "ro"
    ro.mkdir()
    for k in range(40):
        (ro / f"r{k}").write_bytes(rng.randbytes(20_000))
    (root / "z").mkdir()
    os.link(root / "d0" / "e0" / "f0", root / "z" / "linked")
    (root / "z" / "sym").symlink_to("../d1/e1/f1")
    (root / "z" / "empty").write_bytes(b"")
    ro.chmod(0o555)
    os.utime(ro, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    os.utime(root / "d1", ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001))


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for e in scan(root):
        digest = hashlib.sha256((root / e.path).read_bytes()).hexdigest() if e.kind == FILE else ""
        out[e.path] = (e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.target, e.xattrs, digest)
    return out


def archive(src: Path, part_bytes: int = PART) -> tuple[bytes, list[copyset.Part]]:
    parts: list[copyset.Part] = []
    out = io.BytesIO()
    copyset.write_archive(src, scan(src), out, parts=parts, part_bytes=part_bytes)
    return out.getvalue(), parts


def decompressed(data: bytes) -> bytes:
    """Every frame of ``data``, decompressed."""
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()


def refs(parts: list[copyset.Part]) -> tuple[ObjectRef, ...]:
    return tuple(ObjectRef(p.digest, p.size) for p in parts)


def test_an_archive_in_parts_reads_whole_as_one_tar_and_each_part_alone(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    data, parts = archive(src)
    one, single = archive(src, part_bytes=1 << 40)
    assert len(parts) >= 4 and len(single) == 1
    assert sum(p.size for p in parts) == len(data) and single[0].size == len(one)
    whole = decompressed(data)
    assert whole == decompressed(one)  # the same tar, in frames
    at, tars = 0, []
    for p in parts:
        piece = data[at : at + p.size]
        at += p.size
        assert p.digest == "sha256:" + hashlib.sha256(piece).hexdigest()
        tars.append(decompressed(piece))  # (one frame, whole)
        assert len(tars[-1]) % 512 == 0
    assert b"".join(tars) == whole
    for t in tars[1:]:  # each part after the first begins with a member's header
        assert tarfile.TarInfo.frombuf(t[:512], "utf-8", "surrogateescape").name
    assert archive(src) == (data, parts)  # the same tree: the same bytes and parts
    # what zstd and GNU tar make of it
    (tmp_path / "a.tar.zst").write_bytes(data)
    listed = subprocess.run(
        ["tar", "--zstd", "-tf", str(tmp_path / "a.tar.zst")], check=True, capture_output=True, text=True
    ).stdout.split()
    assert len(listed) == len(list(scan(src)))


def our_children() -> list[int]:
    """Processes whose parent is this one (zombies too)."""
    me, out = os.getpid(), []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                out.append(int(d.name))
    return out


async def test_parts_unpack_side_by_side_into_the_tree_one_stream_makes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, archive_check: str
) -> None:
    src = tmp_path / "src"
    make_tree(src)
    data, parts = archive(src)
    store = Store(tmp_path / "store")
    ref = store.put_bytes(data)
    whole, side = tmp_path / "whole", tmp_path / "side"
    whole.mkdir()
    side.mkdir()
    loop = asyncio.get_running_loop()
    async with origin(store) as o:
        one, three = Relays([url(o)]), Relays([url(o)])
        try:
            forked = cpus(monkeypatch, 3)
            await loop.run_in_executor(None, ee.extract, one, ObjectRef(ref.digest, ref.size), whole)
            assert forked == [] and one.stats.objects == 1  # (no parts named: one stream)
            got = await loop.run_in_executor(
                None, ee.extract, three, ObjectRef(ref.digest, ref.size), side, refs(parts)
            )
        finally:
            one.close()
            three.close()
    assert got == len(data)
    assert len(forked) == 2 and our_children() == []  # three processes, the two forked waited for
    assert three.stats.objects == len(parts) and three.stats.bytes == len(data)  # each part once, by Range
    assert tree(side) == tree(whole) == tree(src)
    linked = [e for e in scan(side) if e.kind == HARDLINK]
    assert [e.path for e in linked] == ["z/linked"]
    assert os.stat(side / "z/linked").st_ino == os.stat(side / "d0/e0/f0").st_ino


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data)
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + data + bytes(-len(data) % 512)


def _parts(*tars: bytes) -> tuple[bytes, tuple[ObjectRef, ...]]:
    """An archive of these tars, a frame each (the last given the archive's end)."""
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    frames = [cctx.compress(t) for t in (*tars[:-1], tars[-1] + bytes(1024))]
    return b"".join(frames), tuple(
        ObjectRef(f"sha256:{hashlib.sha256(f).hexdigest()}", len(f)) for f in frames
    )


# (the archive, its parts, the failure and what it says, CPUs, the parts the relay holds back)
Case = tuple[bytes, tuple[ObjectRef, ...], type[Exception], str, int, tuple[int, ...]]


def _cases() -> dict[str, Case]:
    ok = [_member(f"p{i}", kind=tarfile.DIRTYPE) + _member(f"p{i}/f", bytes([i]) * 70_000) for i in range(4)]
    bad = _member("../escaped", b"out")
    refused, refused_parts = _parts(ok[0], bad, ok[2], ok[3])  # the second: a child's (of two)
    data, good = _parts(*ok)
    other = (good[0], ObjectRef("sha256:" + "0" * 64, good[1].size), *good[2:])
    first, first_parts = _parts(bad, *ok[1:])  # this process's own
    third, third_parts = _parts(ok[0], ok[1], bad, ok[3])  # the second child's (of three processes)
    unsafe = UnsafeEntry, "'../escaped': "
    return {
        "a child's member refused": (refused, refused_parts, *unsafe, 2, ()),
        "a child's part not its digest": (data, other, DigestMismatch, "sha256:" + "0" * 64, 2, ()),
        # the other process is not waited for: its parts are held back by the relay until
        # the end of the test (past its timeout: a process waited for would wait with them)
        "this process's member refused": (first, first_parts, *unsafe, 2, (1, 3)),
        "a child's member refused while the other child's part is held": (
            third,
            third_parts,
            *unsafe,
            3,
            (1,),
        ),
    }


@pytest.mark.parametrize("case", list(_cases()))
async def test_one_process_s_failure_is_the_unpacking_s_and_stops_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, archive_check: str, case: str
) -> None:
    """The first failure comes out as its process raised it, as soon as it is known (the
    others are not waited for), nothing is written outside, no process is left."""
    data, parts, refusal, says, n, held = _cases()[case]
    whole = ObjectRef("sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    starts = [sum(p.size for p in parts[:i]) for i in held]
    hold = asyncio.Event()

    async def serve(request: web.Request) -> web.StreamResponse:
        start, end = (int(x) for x in request.headers["Range"].removeprefix("bytes=").split("-"))
        if start in starts:
            await asyncio.wait_for(hold.wait(), 600)
        return web.Response(status=206, body=data[start : end + 1])

    app = web.Application()
    app.router.add_get("/objects/sha256/{name}", serve)
    runner, relay_url = await serve_on_loopback(app)
    into = tmp_path / "stage" / "into"
    into.mkdir(parents=True)
    forked = cpus(monkeypatch, n)
    relays = Relays([relay_url], timeout=300)
    try:
        with pytest.raises(refusal) as refused:
            await asyncio.get_running_loop().run_in_executor(None, ee.extract, relays, whole, into, parts)
    finally:
        hold.set()
        relays.close()
        await runner.cleanup()
    assert says in str(refused.value)
    assert len(forked) == n - 1 and our_children() == []
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == ["into"]  # nothing outside
