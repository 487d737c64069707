"""The synthetic Table-2 image: exact counts and sizes, realism, determinism, compressibility."""

from __future__ import annotations

import hashlib
import math
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from labs import table2
from labs.table2 import MIB, MTIME_NS, TABLE2, GeneratedDir, Table2Row, generate
from slim.agent import tree
from slim.core.build.profile import READ_ONLY, READ_WRITE, SHARED, VIRTUAL, profile_image
from slim.errors import FailedPrecondition, InvalidArgument

SCALE = 0.01  # 1,728 entries, 25 MB: about a second to write
# docs/profile.md states this band and the measured ratios
ZSTD_BAND = (2.5, 4.0)


@dataclass(frozen=True)
class Image:
    root: Path
    summary: list[GeneratedDir]
    entries: list[tree.Entry]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    root = tmp_path_factory.mktemp("table2") / "img"
    summary = generate(root, scale=SCALE, seed=0)
    return Image(root, summary, list(tree.scan(root)))


def content_hashes(root: Path, entries: list[tree.Entry]) -> dict[str, str]:
    return {
        e.path: hashlib.sha256((root / e.path).read_bytes()).hexdigest()
        for e in entries
        if e.kind == tree.FILE
    }


def top(entry: tree.Entry) -> str:
    return entry.path.split("/", 1)[0]


# -- Table 2 itself and the rounding rules


def test_table2_is_the_papers_table() -> None:
    assert [r.path for r in TABLE2] == ["/bin", "/boot", "/dev", "/etc", "/lib", "/sbin", "/usr", "/var"]
    assert sum(r.files for r in TABLE2) == 172767
    assert math.isclose(sum(r.mb for r in TABLE2), 2385.0)
    ro = [r for r in TABLE2 if r.access == READ_ONLY]
    assert {r.name for r in ro} == {"bin", "boot", "lib", "sbin", "usr"}
    # the paper: "86% of files and 96.3% of bytes are read-only" (its MB column gives 96.2)
    assert round(100 * sum(r.files for r in ro) / 172767) == 86
    assert round(100 * sum(r.mb for r in ro) / 2385.0, 1) == 96.2


def test_scaling_rounds_half_up_and_keeps_one_file() -> None:
    boot = Table2Row("/boot", READ_ONLY, 37, 4.6)
    assert boot.scaled_files(1.0) == 37
    assert boot.scaled_files(0.01) == 1  # 0.37 rounds to 0, but every directory keeps a file
    assert Table2Row("/x", READ_ONLY, 50, 1.0).scaled_files(0.01) == 1  # 0.5 rounds up
    assert Table2Row("/x", READ_ONLY, 250, 1.0).scaled_files(0.01) == 3  # 2.5 rounds up
    assert boot.scaled_bytes(1.0) == round(4.6 * MIB) == 4823450
    assert boot.scaled_bytes(0.01) == math.floor(4.6 * MIB * 0.01 + 0.5)


# -- the generated image


def test_exact_counts_and_bytes_per_directory(image: Image) -> None:
    assert [s.path for s in image.summary] == [r.path for r in TABLE2]
    files: Counter[str] = Counter()
    size: Counter[str] = Counter()
    for e in image.entries:
        if e.kind != tree.DIR and "/" in e.path:
            files[top(e)] += 1
            size[top(e)] += e.size  # 0 for every kind but FILE
    for row, made in zip(TABLE2, image.summary, strict=True):
        assert made.files == files[row.name] == row.scaled_files(SCALE), row
        assert made.bytes == size[row.name] == row.scaled_bytes(SCALE), row
        assert made.access == row.access
    # nothing outside the Table-2 directories but empty mount points
    tops = {e.path: e for e in image.entries if "/" not in e.path}
    assert all(e.kind == tree.DIR for e in tops.values())
    assert set(tops) == {r.name for r in TABLE2} | {name for name, _ in table2.EMPTY_DIRS}


def test_profile_of_the_image_is_table2(image: Image) -> None:
    profile = profile_image(image.root)
    for row in TABLE2:
        got = profile.row(row.path)
        assert (got.files, got.bytes) == (row.scaled_files(SCALE), row.scaled_bytes(SCALE))
        assert got.access == row.access
        assert got.policy == ("nfs" if row.access == READ_ONLY else "ram"), got
    assert profile.row("/home").access == SHARED
    assert profile.row("/home").policy == "ram"  # the EE mounts user data itself
    assert {profile.row(p).access for p in ("/proc", "/tmp", "/mnt", "/opt")} == {VIRTUAL}
    assert profile.files == sum(r.scaled_files(SCALE) for r in TABLE2)
    assert 84 < profile.read_only_files_pct < 88  # 86.0 at full scale
    assert 95 < profile.read_only_bytes_pct < 97.5  # 96.2 at full scale


def test_the_image_looks_like_a_system(image: Image) -> None:
    by_path = {e.path: e for e in image.entries}
    kinds = Counter(e.kind for e in image.entries)
    assert kinds[tree.SYMLINK] >= 10 and kinds[tree.HARDLINK] >= 2
    if os.geteuid() == 0:  # device nodes need root; see test_dev_without_device_nodes
        assert kinds[tree.CHR] > 50 and kinds[tree.BLK] > 20
    assert by_path["dev/initctl"].kind == tree.FIFO
    assert by_path["dev/null"].rdev == (1, 3) or os.geteuid() != 0
    # nested, with a spread of depths and directory sizes
    depths = Counter(e.path.count("/") for e in image.entries if e.kind == tree.FILE)
    assert max(depths) >= 4 and len(depths) >= 4
    per_dir = Counter(e.path.rsplit("/", 1)[0] for e in image.entries if e.kind != tree.DIR)
    assert max(per_dir.values()) >= 5 * min(per_dir.values())
    assert any(p.startswith("usr/share/doc/") and p.count("/") == 4 for p in by_path)
    assert any(p.startswith("usr/share/locale/") and "/LC_MESSAGES/" in p for p in by_path)
    # executables, setuid and setgid programs, sticky scratch directories
    assert by_path["bin/bash"].mode == 0o755
    assert all(e.mode & 0o111 for e in image.entries if e.kind == tree.FILE and e.path.startswith("sbin/"))
    assert by_path["usr/bin/passwd"].mode & stat.S_ISUID
    assert by_path["usr/bin/wall"].mode & stat.S_ISGID
    assert by_path["tmp"].mode == 0o1777 and by_path["var/tmp"].mode == 0o1777
    # a log-normal-ish spread of sizes, every total exact
    sizes = sorted(e.size for e in image.entries if e.kind == tree.FILE and top(e) == "usr")
    median = sizes[len(sizes) // 2]
    assert sizes[-1] > 20 * median and sizes[len(sizes) // 10] < median / 3
    # links resolve inside the image (but /dev's, which name /proc)
    for e in image.entries:
        if e.kind == tree.SYMLINK and not e.path.startswith(("dev/", "etc/alternatives/", "etc/rc.d/")):
            assert (image.root / e.path).resolve().is_relative_to(image.root.resolve()), e
            assert (image.root / e.path).exists(), e
        if e.kind == tree.HARDLINK:
            assert by_path[e.target].kind == tree.FILE and top(by_path[e.target]) == top(e)
    # fixed times and ownership
    uid, gid = (0, 0) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    assert {(e.mtime_ns, e.uid, e.gid) for e in image.entries} == {(MTIME_NS, uid, gid)}


def test_every_file_is_distinct(image: Image) -> None:
    hashes = content_hashes(image.root, image.entries)
    nonempty = [h for p, h in hashes.items() if (image.root / p).stat().st_size >= 64]
    assert len(set(nonempty)) == len(nonempty)
    # No two files share long runs of bytes: long-distance matching over the whole
    # image (a 128 MB window) finds little more than zstd's ordinary 8 MB window.
    data = b"".join((image.root / p).read_bytes() for p in hashes)
    plain = len(zstandard.ZstdCompressor(level=3).compress(data))
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27, enable_ldm=True)
    longer = len(zstandard.ZstdCompressor(compression_params=params).compress(data))
    assert longer > 0.9 * plain


def test_zstd_compresses_the_image_like_a_system(image: Image) -> None:
    data = b"".join((image.root / e.path).read_bytes() for e in image.entries if e.kind == tree.FILE)
    assert len(data) == sum(r.scaled_bytes(SCALE) for r in TABLE2)
    ratio = len(data) / len(zstandard.ZstdCompressor(level=3).compress(data))
    assert ZSTD_BAND[0] <= ratio <= ZSTD_BAND[1], ratio
    # and it is a mixture: text compresses well, compressed files not at all
    docs = b"".join(
        (image.root / e.path).read_bytes()
        for e in image.entries
        if e.path.startswith("usr/share/doc/") and e.path.endswith((".txt", ".html"))
    )
    boot = (image.root / "boot" / f"vmlinuz-{table2.KERNEL}").read_bytes()
    assert len(docs) > 100_000
    assert len(docs) / len(zstandard.ZstdCompressor(level=3).compress(docs)) > 3.5
    assert len(boot) / len(zstandard.ZstdCompressor(level=3).compress(boot)) < 1.05


@pytest.mark.slow
def test_same_seed_same_tree_other_seed_other_tree(image: Image, tmp_path: Path) -> None:
    again = tmp_path / "again"
    calls: list[tuple[int, int]] = []
    generate(again, scale=SCALE, seed=0, progress=lambda done, total: calls.append((done, total)))
    entries = list(tree.scan(again))
    assert entries == image.entries
    assert content_hashes(again, entries) == content_hashes(image.root, image.entries)
    total = sum(r.scaled_files(SCALE) for r in TABLE2)
    assert calls[-1] == (total, total) and len(calls) >= 2
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)

    other = tmp_path / "other"
    summary = generate(other, scale=SCALE, seed=1)
    assert [(s.files, s.bytes) for s in summary] == [(s.files, s.bytes) for s in image.summary]
    other_entries = list(tree.scan(other))
    assert {e.path for e in other_entries} != {e.path for e in entries}
    same = set(content_hashes(other, other_entries).values()) & set(content_hashes(again, entries).values())
    assert same <= {hashlib.sha256(b"").hexdigest()}


def test_dev_without_device_nodes(tmp_path: Path) -> None:
    root = tmp_path / "img"
    summary = {s.path: s for s in generate(root, scale=0.002, seed=5, device_nodes=False)}
    dev = [e for e in tree.scan(root) if e.path.startswith("dev/")]
    non_dirs = [e for e in dev if e.kind != tree.DIR]
    assert len(non_dirs) == summary["/dev"].files == TABLE2[2].scaled_files(0.002)
    assert not [e for e in dev if e.kind in (tree.CHR, tree.BLK)]
    null = next(e for e in dev if e.path == "dev/null")
    assert (null.kind, null.size, null.mode) == (tree.FILE, 0, 0o666)
    assert next(e for e in dev if e.path == "dev/initctl").kind == tree.FIFO
    assert sum(e.size for e in non_dirs) == TABLE2[2].scaled_bytes(0.002)


def test_refuses_a_non_empty_target(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine\n")
    with pytest.raises(FailedPrecondition, match="not empty"):
        generate(tmp_path, scale=0.001)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    with pytest.raises(FailedPrecondition, match="not a directory"):
        generate(tmp_path / "keep.txt", scale=0.001)


@pytest.mark.parametrize("scale", [0, -1, float("nan"), float("inf"), 11])
def test_rejects_a_bad_scale(tmp_path: Path, scale: float) -> None:
    with pytest.raises(InvalidArgument, match="scale"):
        generate(tmp_path / "img", scale=scale)
    assert not (tmp_path / "img").exists()


def test_empty_target_directory_is_used(tmp_path: Path) -> None:
    summary = generate(tmp_path, scale=0.001, seed=2)
    assert sum(s.files for s in summary) == sum(r.scaled_files(0.001) for r in TABLE2)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
    assert profile_image(tmp_path).row("/dev").access == READ_WRITE
