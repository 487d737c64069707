"""Manifests: deterministic encoding, strict decoding, chunked big files; the
tree scan they are made from."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import tarfile
from pathlib import Path

import pytest
import zstandard

from slim.agent import manifest as mf
from slim.agent.tree import DIR, FILE, HARDLINK, SYMLINK, ScanReport, check_relpath, scan
from slim.core.build import copyset


def _tree(root: Path) -> None:
    (root / "b").mkdir()
    (root / "b" / "small").write_bytes(b"hello")
    (root / "a").write_bytes(b"first")
    (root / "b" / "big").write_bytes(os.urandom(mf.CHUNKED_ABOVE + 3 * mf.CHUNK_SIZE // 2))
    os.link(root / "a", root / "b" / "a-again")
    (root / "b" / "ln").symlink_to("../a")
    (root / "usr").mkdir()
    (root / "usr" / "hidden").write_text("pruned")


def test_scan_is_sorted_preorder_with_hardlinks_and_prune(tmp_path: Path) -> None:
    _tree(tmp_path)
    entries = list(scan(tmp_path, prune=["usr"]))
    assert [e.path for e in entries] == ["a", "b", "b/a-again", "b/big", "b/ln", "b/small", "usr"]
    kinds = {e.path: e.kind for e in entries}
    assert kinds == {
        "a": FILE,
        "b": DIR,
        "b/a-again": HARDLINK,
        "b/big": FILE,
        "b/ln": SYMLINK,
        "b/small": FILE,
        "usr": DIR,
    }
    assert entries[2].target == "a"


def test_scan_leaves_sockets_out_and_says_so(tmp_path: Path) -> None:
    import socket

    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s.sock"))
        report = ScanReport()
        assert list(scan(tmp_path, report=report)) == []
        assert report.sockets == ["s.sock"]
    finally:
        sock.close()


def test_manifest_round_trip_and_chunks(tmp_path: Path) -> None:
    _tree(tmp_path)
    items = copyset.hash_tree(tmp_path, scan(tmp_path))
    big = next(i for i in items if i.entry.path == "b/big")
    data = (tmp_path / "b" / "big").read_bytes()
    assert big.sha256 == hashlib.sha256(data).hexdigest()
    pieces = [bytes(c.data) for c in copyset.chunker().cut_buf(data)]  # content-defined
    assert b"".join(pieces) == data and len(pieces) > len(data) // copyset.CDC_MAX
    assert big.chunks == tuple(hashlib.sha256(p).hexdigest() for p in pieces)
    assert big.chunk_sizes == tuple(len(p) for p in pieces)
    assert all(copyset.CDC_MIN <= len(p) <= copyset.CDC_MAX for p in pieces[:-1])
    small = next(i for i in items if i.entry.path == "b/small")
    assert small.chunks == () and small.sha256 == hashlib.sha256(b"hello").hexdigest()
    manifest = mf.make("/srv", items)
    encoded = mf.encode(manifest)
    assert mf.encode(mf.decode(encoded)) == encoded
    assert mf.decode(encoded) == manifest
    assert manifest.files == 6 and manifest.bytes == 5 + 5 + len(data) + len("pruned")


def test_archive_pass_gives_the_same_manifest_as_hashing(tmp_path: Path) -> None:
    """... and the archive holds each file's bytes whole (a big one read piece by piece)."""
    _tree(tmp_path)
    out = io.BytesIO()
    assert copyset.write_archive(tmp_path, scan(tmp_path), out) == copyset.hash_tree(tmp_path, scan(tmp_path))
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(out.getvalue()))
    with tarfile.open(fileobj=raw, mode="r|") as tf:
        got = {ti.name: tf.extractfile(ti).read() for ti in tf if ti.isreg()}  # type: ignore[union-attr]
    assert got["b/big"] == (tmp_path / "b" / "big").read_bytes()
    assert got["b/small"] == b"hello"


def test_an_insertion_changes_only_the_pieces_around_it(tmp_path: Path) -> None:
    """Content-defined pieces: bytes inserted into a big file (anywhere, not at a piece's
    boundary) give new pieces only around the insertion; the rest keep their digests."""
    data = random.Random(5).randbytes(8 << 20)
    (tmp_path / "f").write_bytes(data)
    (before,) = copyset.hash_tree(tmp_path, scan(tmp_path))
    (tmp_path / "f").write_bytes(data[:3_000_017] + b"inserted" * 1000 + data[3_000_017:])
    (after,) = copyset.hash_tree(tmp_path, scan(tmp_path))
    new = [n for h, n in mf.parts(after) if h not in set(before.chunks)]
    assert 8000 <= sum(new) <= 8000 + 2 * copyset.CDC_MAX and len(new) <= 3
    assert len(after.chunks) - len(new) >= len(before.chunks) - 3


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"path":"../x","type":"dir","mode":493,"uid":0,"gid":0,"mtime_ns":0}', "'..'"),
        ('{"path":"/x","type":"dir","mode":493,"uid":0,"gid":0,"mtime_ns":0}', "absolute"),
        ('{"path":"x","type":"socket","mode":493,"uid":0,"gid":0,"mtime_ns":0}', "unknown type"),
        ('{"path":"x","type":"file","mode":420,"uid":0,"gid":0,"mtime_ns":0,"size":1}', "sha256"),
        ('{"path":"x","type":"dir","mode":99999,"uid":0,"gid":0,"mtime_ns":0}', "'mode'"),
        (
            '{"path":"x","type":"hardlink","mode":420,"uid":0,"gid":0,"mtime_ns":0,"target":"/etc/passwd"}',
            "absolute",
        ),
        ("not json", "line 2"),
    ],
)
def test_bad_manifests_name_the_line(line: str, message: str) -> None:
    header = '{"format":"slim-manifest","version":1,"directory":"/","entries":1,"chunk_size":1048576}'
    with pytest.raises(ValueError, match=message):
        mf.decode(f"{header}\n{line}\n".encode())


def test_header_must_match() -> None:
    with pytest.raises(ValueError, match="not a slim manifest"):
        mf.decode(b'{"format":"other"}\n')
    with pytest.raises(ValueError, match="version"):
        mf.decode(b'{"format":"slim-manifest","version":99}\n')


def test_check_relpath() -> None:
    for bad in ("", "/a", "a//b", "a/./b", "a/..", "a\x00b"):
        with pytest.raises(ValueError, match=r"path|component|NUL"):
            check_relpath(bad)
    assert check_relpath("a/b.c/d") == "a/b.c/d"


def _v2(**change: object) -> bytes:
    doc = {
        "format": "slim-manifest", "version": 2, "directory": "/srv", "entries": 3, "files": 2, "bytes": 7,
        "path": ["d", "d/f", "d/l"], "type": "dfl", "mode": [493, 420, 511], "uid": [0, 0, 0],
        "gid": [0, 0, 0], "mtime_ns": [1, 2, 3], "size": [7], "sha256": ["a" * 64], "target": ["f"],
        "rdev": [], "chunks": [], "xattrs": [[1, {"user.x": "eA=="}]],
    }  # fmt: skip
    doc.update(change)
    return json.dumps(doc).encode()


def test_version_2_decodes_to_columns_and_entries() -> None:
    m = mf.decode(_v2())
    assert m.paths == ["d", "d/f", "d/l"] and m.kinds == "dfl" and m.sizes == [0, 7, 0]
    assert m.digests == ["", "a" * 64, ""] and m.targets == {2: "f"} and m.xattrs == {1: (("user.x", b"x"),)}
    f = m.entries[1]
    assert f.entry.kind == FILE and f.entry.size == 7 and f.sha256 == "a" * 64
    assert m.entries[2].entry.kind == SYMLINK and m.entries[2].entry.target == "f"
    assert mf.decode(mf.encode(m)) == m and m.files == 2 and m.bytes == 7


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"path": ["d", "d/f", "d/f"]}, "listed twice"),
        ({"path": ["d", "d/../f", "d/l"]}, "'.' or '..' component"),
        ({"path": ["d", "/f", "d/l"]}, "absolute path"),
        ({"path": ["d", "d//f", "d/l"]}, "empty"),
        ({"path": ["d", "d/f\x00", "d/l"]}, "NUL"),
        ({"path": ["d", "d/f"]}, "'path' must be a list of 3 items"),
        ({"type": "dfz"}, "'type' must be 3 letters"),
        ({"mode": [493, 420, 65536]}, "entry 3: 'mode'"),
        ({"uid": [0, True, 0]}, "entry 2: 'uid'"),
        ({"sha256": ["A" * 64]}, "64 lowercase hex digits"),
        ({"sha256": ["a" * 63]}, "64 lowercase hex digits"),
        ({"target": [""]}, "non-empty string"),
        ({"chunks": [[0, ["a" * 64], [7]]]}, "given for a dir, not a file"),
        ({"chunks": [[1, ["a" * 64, "b" * 64], [3, 3]]]}, "add up to 7"),
        ({"chunks": [[9, ["a" * 64], [7]]]}, "index below 3"),
        ({"xattrs": [[1, {"user.x": "%%"}]]}, "'xattrs'"),
        ({"version": 3}, "version 3 is not supported"),
    ],
)
def test_version_2_refuses_what_is_wrong_and_says_what(change: dict[str, object], says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        mf.decode(_v2(**change))


def test_version_1_manifests_of_older_releases_are_still_read(tmp_path: Path) -> None:
    _tree(tmp_path)
    items = []
    for m in copyset.hash_tree(tmp_path, scan(tmp_path)):
        if m.chunks:  # version 1 cut big files into fixed pieces of CHUNK_SIZE
            data = (tmp_path / m.entry.path).read_bytes()
            fixed = [data[i : i + mf.CHUNK_SIZE] for i in range(0, len(data), mf.CHUNK_SIZE)]
            hexes = tuple(hashlib.sha256(p).hexdigest() for p in fixed)
            m = m.replace(chunks=hexes, chunk_sizes=())
        items.append(m)
    lines = [{"format": "slim-manifest", "version": 1, "chunk_size": mf.CHUNK_SIZE, "directory": "/srv",
              "entries": len(items)}]  # fmt: skip
    for m in items:
        e = m.entry
        rec = {
            "path": e.path,
            "type": e.kind,
            "mode": e.mode,
            "uid": e.uid,
            "gid": e.gid,
            "mtime_ns": e.mtime_ns,
        }
        if e.kind == FILE:
            rec.update(size=e.size, sha256=m.sha256, **({"chunks": list(m.chunks)} if m.chunks else {}))
        if e.target:
            rec["target"] = e.target
        lines.append(rec)
    old = mf.decode("\n".join(json.dumps(x) for x in lines).encode())
    assert old == mf.make("/srv", items)
