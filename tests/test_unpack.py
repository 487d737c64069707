"""Safe extraction: crafted archives are refused and write nothing outside the
target; normal special files round-trip with owners, modes, times and xattrs."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from slim.agent import unpack
from slim.agent.tree import FILE, Entry, scan
from slim.agent.unpack import ReadAhead, TreeWriter, UnsafeEntry, copy_tree, extract_archive, read_archive
from slim.core.build import copyset
from slim.core.build.tarimport import extract_tar
from tests.support import need

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="creating device nodes and other owners needs root")


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _dir(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    return info, None


def _device(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    info.mode = 0o666
    return info, None


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path]:
    """(target, outside): outside holds a sentinel that no extraction may touch."""
    target = tmp_path / "target"
    outside = tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    (outside / "sentinel").write_text("original")
    return target, outside


def _snapshot(tmp_path: Path) -> set[tuple[str, int, int]]:
    """Everything under tmp_path except the target: (path, size, mtime)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(tmp_path):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != tmp_path / "target"]
        for name in filenames + dirnames:
            st = os.lstat(Path(dirpath, name))
            out.add((str(Path(dirpath, name)), st.st_size, st.st_mtime_ns))
    return out


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([_file("../escape")], "'..'"),
        ([_file("a/../../escape")], "'..'"),
        ([_file("/tmp/slim-test-absolute-escape")], "absolute path"),
        ([_link("link", "../outside"), _file("link/sentinel", b"pwned")], "goes through the symlink 'link'"),
        ([_link("link", "/"), _file("link/tmp/slim-test-escape", b"pwned")], "goes through the symlink"),
        (
            [_dir("d"), _link("d/up", "../../outside"), _file("d/up/new", b"pwned")],
            "goes through the symlink 'd/up'",
        ),
        ([_link("hard", "../outside/sentinel", tarfile.LNKTYPE)], "'..'"),
        ([_link("hard", "/etc/passwd", tarfile.LNKTYPE)], "absolute path"),
        (
            [_link("link", "../outside"), _link("hard", "link/sentinel", tarfile.LNKTYPE)],
            "goes through the symlink 'link'",
        ),
        ([_link("hard", "missing", tarfile.LNKTYPE)], "not in the target"),
        ([_dir("d"), _file("d", b"file over dir")], "would replace a directory"),
    ],
    ids=[
        "dotdot",
        "dotdot-inner",
        "absolute",
        "symlink-then-file-through-it",
        "symlink-to-root-then-file",
        "nested-symlink-out",
        "hardlink-dotdot",
        "hardlink-absolute",
        "hardlink-through-symlink",
        "hardlink-missing",
        "file-over-directory",
    ],
)
@pytest.mark.parametrize("reader", ["tarfile", "archive"])
def test_crafted_archives_are_refused(
    tmp_path: Path,
    places: tuple[Path, Path],
    members: list[tuple[tarfile.TarInfo, bytes | None]],
    reason: str,
    reader: str,
) -> None:
    """By extract_tar (any tar) and by the agent's own reader of SLIM archives alike."""
    target, outside = places
    before = _snapshot(tmp_path)
    extract = extract_tar if reader == "tarfile" else extract_archive
    with pytest.raises(UnsafeEntry) as err:
        extract(_tar(*members), target)
    assert reason in str(err.value)
    assert _snapshot(tmp_path) == before
    assert (outside / "sentinel").read_text() == "original"
    assert not Path("/tmp/slim-test-absolute-escape").exists()
    assert not Path("/tmp/slim-test-escape").exists()


def test_a_file_replacing_a_symlink_is_written_in_place_not_through_it(
    tmp_path: Path, places: tuple[Path, Path]
) -> None:
    target, outside = places
    extract_tar(_tar(_link("s", "../outside/sentinel"), _file("s", b"new")), target)
    assert (outside / "sentinel").read_text() == "original"
    assert not (target / "s").is_symlink()
    assert (target / "s").read_bytes() == b"new"


def test_a_symlink_already_in_the_target_is_not_followed(tmp_path: Path, places: tuple[Path, Path]) -> None:
    target, outside = places
    (target / "pre").symlink_to(outside)
    with pytest.raises(UnsafeEntry, match="goes through the symlink 'pre'"):
        extract_tar(_tar(_file("pre/sentinel", b"pwned")), target)
    assert (outside / "sentinel").read_text() == "original"


def test_device_nodes_are_refused_for_an_unprivileged_target(places: tuple[Path, Path]) -> None:
    target, _ = places
    with pytest.raises(UnsafeEntry, match="device node refused"):
        extract_tar(_tar(_file("ok"), _device("null")), target, devices=False)
    assert not (target / "null").exists()


def test_junk_is_not_an_archive(places: tuple[Path, Path]) -> None:
    target, _ = places
    with pytest.raises(UnsafeEntry, match="not a valid tar archive"):
        extract_tar(io.BytesIO(b"\x00\x01\xff" * 700), target)


def test_truncated_archive_is_refused(places: tuple[Path, Path]) -> None:
    target, _ = places
    data = _tar(_file("big", b"y" * 100_000)).getvalue()
    with pytest.raises(UnsafeEntry):
        extract_tar(io.BytesIO(data[:20_000]), target)


def _special_tree(src: Path) -> None:
    """A tree with every kind of entry and the metadata that must survive."""
    (src / "etc").mkdir()
    (src / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    os.chmod(src / "etc" / "passwd", 0o644)
    (src / "bin").mkdir()
    (src / "bin" / "su").write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    os.chmod(src / "bin" / "su", 0o4755)
    os.link(src / "bin" / "su", src / "bin" / "su-hardlink")
    (src / "bin" / "sh").symlink_to("/usr/bin/dash")
    (src / "tmp").mkdir()
    os.chmod(src / "tmp", 0o1777)
    (src / "ro").mkdir()
    (src / "ro" / "inside").write_text("in a read-only directory")
    os.chmod(src / "ro", 0o555)
    (src / "dev").mkdir()
    os.mkfifo(src / "dev" / "fifo", 0o620)
    os.setxattr(src / "etc" / "passwd", "user.slim", b"\x00\xff binary")
    if ROOT:
        os.mknod(src / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(src / "dev" / "sda", stat.S_IFBLK | 0o660, os.makedev(8, 0))
        os.chown(src / "etc" / "passwd", 1234, 5678)
        os.chown(src / "bin" / "sh", 42, 43, follow_symlinks=False)
        os.chmod(src / "bin" / "su", 0o4755)  # chown cleared nothing here; keep it explicit
        os.setxattr(
            src / "bin" / "su",
            "security.capability",
            bytes.fromhex("0100000200200000000000000000000000000000"),
        )
    os.utime(src / "etc" / "passwd", ns=(1_000_000_000, 1_234_567_891_123_456_789))


def _entries(root: Path) -> list[Entry]:
    return list(scan(root))


def test_special_files_round_trip_through_our_archive(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    _special_tree(src)
    buf = io.BytesIO()
    copyset.write_archive(src, scan(src), buf)
    buf.seek(0)
    import zstandard

    extract_tar(zstandard.ZstdDecompressor().stream_reader(buf), out)
    assert _entries(out) == _entries(src)
    assert stat.S_IMODE(os.stat(out / "bin" / "su").st_mode) == 0o4755
    assert os.stat(out / "bin" / "su").st_ino == os.stat(out / "bin" / "su-hardlink").st_ino
    assert os.getxattr(out / "etc" / "passwd", "user.slim") == b"\x00\xff binary"
    assert os.stat(out / "etc" / "passwd").st_mtime_ns == 1_234_567_891_123_456_789
    if ROOT:
        assert os.stat(out / "etc" / "passwd").st_uid == 1234
        assert os.lstat(out / "bin" / "sh").st_uid == 42
        assert os.stat(out / "dev" / "null").st_rdev == os.makedev(1, 3)
        assert stat.S_ISBLK(os.stat(out / "dev" / "sda").st_mode)
        assert os.getxattr(out / "bin" / "su", "security.capability")[:4] == bytes.fromhex("01000002")


def test_our_archives_unpack_the_same_with_the_agents_own_reader(tmp_path: Path) -> None:
    """extract_archive (the agent's reader of SLIM's archives) gives what extract_tar gives,
    long and non-UTF-8 names included, and refuses what is not one of ours."""
    src, fast, slow = tmp_path / "src", tmp_path / "fast", tmp_path / "slow"
    for d in (src, fast, slow):
        d.mkdir()
    _special_tree(src)
    deep = src / ("d" * 90) / ("e" * 90)
    deep.mkdir(parents=True)
    (deep / ("f" * 120)).write_bytes(b"long name")
    (src / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name")
    buf = io.BytesIO()
    copyset.write_archive(src, scan(src), buf)
    import zstandard

    raw = zstandard.ZstdDecompressor().decompressobj().decompress(buf.getvalue())
    extract_archive(io.BytesIO(raw), fast, fresh=True)
    extract_tar(io.BytesIO(raw), slow)
    assert _entries(fast) == _entries(slow) == _entries(src)
    assert os.stat(fast / "bin" / "su").st_ino == os.stat(fast / "bin" / "su-hardlink").st_ino
    gnu = io.BytesIO()
    with tarfile.open(fileobj=gnu, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("x" * 150)
        tf.addfile(info, io.BytesIO(b""))
    for bad, says in [
        (gnu.getvalue(), "not one of a SLIM archive's"),
        (raw[:700], "truncated"),
        (raw[:148] + b"9" + raw[149:], "checksum"),
    ]:
        out = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        with pytest.raises(UnsafeEntry, match=says):
            extract_archive(io.BytesIO(bad), out, fresh=True)
    # (a caller that checks the archive's digest does not have the headers' checksums read)
    (tmp_path / "unsummed").mkdir()
    extract_archive(
        io.BytesIO(raw[:148] + b"9" + raw[149:]), tmp_path / "unsummed", fresh=True, checksums=False
    )
    assert _entries(tmp_path / "unsummed") == _entries(src)
    twice = _tar(_file("a", b"1"), _file("a", b"2"))
    (tmp_path / "twice").mkdir()
    with pytest.raises(UnsafeEntry, match="given twice"):
        extract_archive(twice, tmp_path / "twice", fresh=True)


class _Trickle(io.RawIOBase):
    """A pipe's reads: at most ``most`` bytes each, whatever was asked for."""

    def __init__(self, data: bytes, most: int) -> None:
        self.data, self.most, self.at = data, most, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self.most, len(self.data) - self.at)
        b[:n] = self.data[self.at : self.at + n]
        self.at += n
        return n


@pytest.mark.parametrize(("size", "most"), [(512, 512), (1000, 77), (4096, 1 << 20), (1 << 20, 700)])
def test_the_read_ahead_unpacks_what_the_plain_reader_does_and_leaves_what_follows(
    tmp_path: Path, size: int, most: int
) -> None:
    """Through ReadAhead (the agent's pipe from zstd: members' bytes written from its
    buffer), with buffers and reads of any size against headers, records and files, an
    archive unpacks as it does from a plain stream; what follows its end is still read
    from the reader; cut inside a file, it is refused as truncated."""
    src = tmp_path / "src"
    src.mkdir()
    _special_tree(src)
    (src / "big").write_bytes(bytes(range(256)) * 5000)  # over several buffers and reads
    buf = io.BytesIO()
    copyset.write_archive(src, scan(src), buf)
    import zstandard

    raw = zstandard.ZstdDecompressor().decompressobj().decompress(buf.getvalue())
    for d in ("plain", "ahead", "cut"):
        (tmp_path / d).mkdir()
    plain = io.BytesIO(raw)
    extract_archive(plain, tmp_path / "plain", fresh=True)
    end = plain.tell()
    ahead = ReadAhead(_Trickle(raw + b"after", most), size)
    extract_archive(ahead, tmp_path / "ahead", fresh=True)
    assert _entries(tmp_path / "ahead") == _entries(tmp_path / "plain") == _entries(src)
    assert ahead.read(len(raw)) == raw[end:] + b"after"
    assert ahead.read(1) == b""
    cut = raw.index(bytes(range(256)) * 4) + 3000  # inside big's bytes
    with pytest.raises(UnsafeEntry, match="'big': truncated"):
        extract_archive(ReadAhead(_Trickle(raw[:cut], most), size), tmp_path / "cut", fresh=True)


def test_our_archive_cut_anywhere_is_refused_as_truncated(tmp_path: Path) -> None:
    """The reader takes a header with what comes before it in one read: cut at any byte
    (inside a header, its pax records, a file, the padding after them), an archive is
    refused as truncated, never read as something else; whole, it is read to its end."""
    src = tmp_path / "src"
    src.mkdir()
    _special_tree(src)
    (src / "big").write_bytes(bytes(range(256)) * 9)  # data over several blocks, padded
    buf = io.BytesIO()
    copyset.write_archive(src, scan(src), buf)
    import zstandard

    raw = zstandard.ZstdDecompressor().decompressobj().decompress(buf.getvalue())
    stream = io.BytesIO(raw)
    whole = _read_all(stream)
    assert len(whole) == len(list(scan(src))) and (src / "big").read_bytes() in [d for _, d in whole]
    end = stream.tell()  # the first zero block's end: the reader stops there
    assert 0 < end <= len(raw) and not raw[end - 512 : end].strip(b"\0")
    for n in range(end):
        with pytest.raises(UnsafeEntry, match="truncated"):
            _read_all(io.BytesIO(raw[:n]))
    assert _read_all(io.BytesIO(raw[:end])) == whole


def _read_all(stream: io.BytesIO) -> list[tuple[Entry, bytes]]:
    out = []
    for entry, data in read_archive(stream):
        out.append((entry, data.read() if data is not None else b""))
    return out


def test_special_files_round_trip_by_copy(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    _special_tree(src)
    copy_tree(src, scan(src), out)
    assert _entries(out) == _entries(src)


@needs_root
def test_an_archive_made_by_gnu_tar_unpacks_identically(tmp_path: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    _special_tree(src)
    archive = tmp_path / "gnu.tar"
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-cpf",
            str(archive),
            "-C",
            str(src),
            ".",
        ],
        check=True,
    )
    with archive.open("rb") as f:
        extract_tar(f, out)

    # GNU tar keeps whole-second times in this mode; compare everything else exactly
    def seconds(e: Entry) -> Entry:
        return e.replace(mtime_ns=e.mtime_ns // 10**9)

    assert [seconds(e) for e in _entries(out)] == [seconds(e) for e in _entries(src)]
    assert stat.S_IMODE(os.stat(out).st_mode) == stat.S_IMODE(os.stat(src).st_mode)


def test_archives_are_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _special_tree(src)
    one, two = io.BytesIO(), io.BytesIO()
    copyset.write_archive(src, scan(src), one)
    copyset.write_archive(src, scan(src), two)
    assert one.getvalue() == two.getvalue()
    os.utime(src / "etc" / "passwd", ns=(1, 2))
    three = io.BytesIO()
    copyset.write_archive(src, scan(src), three)
    assert three.getvalue() != one.getvalue()


@needs_root
def test_a_fresh_unpack_under_a_setgid_directory_keeps_the_archives_groups(tmp_path: Path) -> None:
    """A staging directory made inside a setgid directory inherits its group: every file is
    still given the archive's owner (found by a review: root-only files took the group)."""
    dest = tmp_path / "dest"
    dest.mkdir()
    os.chown(dest, 0, 1234)
    os.chmod(dest, 0o2755)
    staging = dest / "staging"
    staging.mkdir()  # as the agent's mkdtemp: inherits the setgid bit and group 1234
    info, data = _file("secret", b"root only")
    info.mode, info.uid, info.gid = 0o640, 0, 0
    extract_archive(_tar((info, data)), staging, fresh=True)
    st = os.stat(staging / "secret")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o640)


@pytest.mark.parametrize("case", ["plain", "umask", "default ACL"])
def test_a_fresh_unpack_makes_a_file_with_its_mode_only_where_nothing_takes_from_it(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh tree's file is made with its mode and owner at once, no fchmod (or fchown)
    after, only where the umask, the directory's default ACL, a setuid bit or another owner
    would not leave it so; every file ends with the archive's mode, owner and extended
    attributes either way."""
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if case != "default ACL" and unpack._born(fd) is None:
            pytest.skip(f"{tmp_path} passes on a group or an ACL: no file is made with its mode here")
    finally:
        os.close(fd)
    if case == "default ACL":  # user::rwx, group::r-x, other::--- (the xattr's binary form)
        acl = (2).to_bytes(4, "little") + b"".join(
            tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + (2**32 - 1).to_bytes(4, "little")
            for tag, perm in ((0x01, 7), (0x04, 5), (0x20, 0))
        )
        try:
            os.setxattr(out, "system.posix_acl_default", acl)
        except OSError as exc:
            pytest.skip(f"no ACLs on {tmp_path}: {exc.strerror}")
    other = 1234 if ROOT else 0
    members = []
    for name, mode, owner in [
        ("a/plain", 0o644, 0), ("a/exec", 0o755, 0), ("a/none", 0o000, 0), ("a/suid", 0o4755, 0),
        ("a/other", 0o644, other),
    ]:  # fmt: skip
        info, data = _file(name, name.encode())
        info.mode, info.uid, info.gid = mode, owner, owner
        members.append((info, data))
    xattrs = {"a/plain": {"user.slim": b"kept"}}  # (set on a file made with its mode)
    if ROOT:
        xattrs["a/exec"] = {"security.capability": bytes.fromhex("0100000200200000000000000000000000000000")}
    for info, _ in members:
        info.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("ascii") for k, v in xattrs.get(info.name, {}).items()
        }
    chmods: list[int] = []
    fchmod = os.fchmod

    def counted(fd: int, mode: int) -> None:
        chmods.append(mode)
        fchmod(fd, mode)

    monkeypatch.setattr(os, "fchmod", counted)
    umask = os.umask(0o077 if case == "umask" else 0o022)
    try:
        extract_archive(_tar(*members), out, fresh=True)
    finally:
        os.umask(umask)
    for info, data in members:
        st = os.stat(out / info.name)
        assert stat.S_IMODE(st.st_mode) == info.mode
        if ROOT or info.mode & 0o400:
            assert (out / info.name).read_bytes() == data
        if ROOT:
            assert (st.st_uid, st.st_gid) == (info.uid, info.gid)
        for key, value in xattrs.get(info.name, {}).items():
            assert os.getxattr(out / info.name, key) == value
    # plain: only the setuid file (and another owner's, as root); umask 077: all but mode 000
    assert len(chmods) == {"plain": 1 + ROOT, "umask": 4, "default ACL": 5}[case]


@pytest.mark.parametrize("size", [b"-0000000001", b"+0000000001", b"00000_00001"])
def test_a_header_number_is_octal_digits_only(places: tuple[Path, Path], size: bytes) -> None:
    raw = bytearray(_tar(_file("f", b"x")).getvalue())
    at = next(i for i in range(0, len(raw), 512) if raw[i + 156 : i + 157] == b"0")  # the file's header
    raw[at + 124 : at + 135] = size
    raw[at + 148 : at + 156] = b"        "
    raw[at + 148 : at + 155] = f"{sum(raw[at : at + 512]):06o}\0".encode()
    with pytest.raises(UnsafeEntry, match="is not a number"):
        extract_archive(io.BytesIO(bytes(raw)), places[0], fresh=True)


@pytest.mark.parametrize("same_fs", [True, False], ids=["renamed", "copied-across-file-systems"])
def test_a_whole_fetched_file_is_moved_into_place(tmp_path: Path, same_fs: bool) -> None:
    """TreeWriter.add(source=...): the fetched file gets the entry's metadata and is renamed
    over what was there; from another file system (/dev/shm, tmpfs) it is copied instead."""
    need(same_fs or os.path.isdir("/dev/shm"), "/dev/shm (a tmpfs)")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").symlink_to(tmp_path / "outside")  # what was there is replaced, not followed
    fd, name = tempfile.mkstemp(dir=tmp_path if same_fs else "/dev/shm")
    try:
        with os.fdopen(fd, "w+b") as f:
            f.write(b"fetched")
            f.flush()
            if same_fs:
                os.setxattr(f.fileno(), "user.where-it-was-made", b"x")  # not the entry's: removed
            with TreeWriter(tree) as w:
                w.add(
                    Entry("f", FILE, 0o640, os.getuid(), os.getgid(), 1_700_000_000_123_456_789, 7),
                    f,
                    source=name,
                )
                w.finish()
        st = os.lstat(tree / "f")
        assert stat.S_ISREG(st.st_mode) and (tree / "f").read_bytes() == b"fetched"
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == 1_700_000_000_123_456_789
        assert os.listxattr(tree / "f") == []
        assert os.path.exists(name) is not same_fs and not (tmp_path / "outside").exists()
    finally:
        Path(name).unlink(missing_ok=True)


@pytest.mark.parametrize("in_place", [True, False])
def test_a_file_is_written_over_in_place_only_where_nothing_else_links_to_it(
    tmp_path: Path, in_place: bool
) -> None:
    """``in_place``: a regular file with one link gets the new bytes in its own inode (no
    longer, no shorter, with exactly the entry's metadata and xattrs); a file linked from
    elsewhere, a symlink, a fifo are replaced, and what they lead to keeps its bytes."""
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    tree.mkdir()
    outside.write_bytes(b"outside")
    (tree / "long").write_bytes(b"the old bytes, longer than the new")
    os.chmod(tree / "long", 0o4755)
    os.setxattr(tree / "long", "user.stale", b"x")
    (tree / "short").write_bytes(b"old")
    os.chmod(tree / "short", 0o444)  # (root writes it anyway; a user gets it replaced)
    (tree / "linked").write_bytes(b"linked")
    os.link(tree / "linked", tmp_path / "other-link")
    (tree / "sym").symlink_to(outside)
    os.mkfifo(tree / "fifo")
    uid, gid, t = os.getuid(), os.getgid(), 1_700_000_000_123_456_789
    new = {"long": b"new", "short": b"new bytes, longer than old", "linked": b"L", "sym": b"S", "fifo": b"F"}
    with contextlib.ExitStack() as held:  # the files as they were, held open: replaced or not?
        was = {n: held.enter_context(open(tree / n, "rb")) for n in ("long", "short", "linked")}
        with TreeWriter(tree, in_place=in_place) as w:
            for name, data in new.items():
                xattrs = (("user.keep", b"1"),) if name == "long" else ()
                w.add(Entry(name, FILE, 0o640, uid, gid, t, len(data), xattrs=xattrs), io.BytesIO(data))
            w.finish()
        for name, data in new.items():
            st = os.lstat(tree / name)
            assert stat.S_ISREG(st.st_mode) and (tree / name).read_bytes() == data, name
            assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_nlink) == (0o640, t, 1), name
        assert os.listxattr(tree / "long") == ["user.keep"]
        # (inode numbers say nothing: ext4 gives a new file the one just freed)
        assert os.fstat(was["long"].fileno()).st_nlink == in_place
        assert os.fstat(was["short"].fileno()).st_nlink == (in_place and os.geteuid() == 0)
        assert os.fstat(was["linked"].fileno()).st_nlink == 1  # (the other link alone)
        assert was["linked"].read() == b"linked" and outside.read_bytes() == b"outside"
