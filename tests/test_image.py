"""``slim ee import`` from a directory and from tarballs (the debootstrap path is
in test_build_debootstrap.py)."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from slim.agent.tree import scan
from slim.core.build import copyset
from slim.core.build.image import import_image
from slim.errors import InvalidArgument


def _rootfs(root: Path) -> None:
    for d in ("etc", "usr/bin", "var/log", "tmp"):
        (root / d).mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "usr" / "bin" / "sh").write_bytes(b"#!shell")
    os.chmod(root / "usr" / "bin" / "sh", 0o755)
    os.link(root / "usr" / "bin" / "sh", root / "usr" / "bin" / "dash")
    (root / "etc" / "hostname").write_text("node\n")
    os.chmod(root / "tmp", 0o1777)
    os.mkfifo(root / "var" / "log" / "pipe")


def test_import_from_a_directory_keeps_everything(tmp_path: Path) -> None:
    src, image = tmp_path / "src", tmp_path / "images" / "base"
    src.mkdir()
    _rootfs(src)
    result = import_image(str(src), image)
    assert list(scan(image)) == list(scan(src))
    assert result.files == 5 and result.bytes == len("#!shell") + len("node\n")


def test_reimport_replaces_the_image_whole(tmp_path: Path) -> None:
    src, image = tmp_path / "src", tmp_path / "images" / "base"
    src.mkdir()
    _rootfs(src)
    import_image(str(src), image)
    (image / "stale").write_text("from the old image")
    import_image(str(src), image)
    assert not (image / "stale").exists()
    assert sorted(p.name for p in image.parent.iterdir()) == ["base"]  # no staging left behind


@pytest.mark.parametrize("compression", ["", "gz", "xz", "zst"])
def test_import_from_tarballs(tmp_path: Path, compression: str) -> None:
    src, image = tmp_path / "src", tmp_path / "image"
    src.mkdir()
    _rootfs(src)
    archive = tmp_path / f"root.tar{'.' + compression if compression else ''}"
    if compression == "zst":
        with archive.open("wb") as f:
            copyset.write_archive(src, scan(src), f)
    else:  # made by GNU tar, as an administrator would
        flag = {"": [], "gz": ["-z"], "xz": ["-J"]}[compression]
        subprocess.run(
            ["tar", *flag, "--numeric-owner", "-cpf", str(archive), "-C", str(src), "."], check=True
        )
    import_image(str(archive), image)
    got = {e.path: (e.kind, e.mode, e.size, e.target) for e in scan(image)}
    want = {e.path: (e.kind, e.mode, e.size, e.target) for e in scan(src)}
    assert got == want
    assert os.stat(image / "usr" / "bin" / "sh").st_ino == os.stat(image / "usr" / "bin" / "dash").st_ino


def test_a_malicious_tarball_is_refused_and_leaves_no_image(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        link = tarfile.TarInfo("etc")
        link.type = tarfile.SYMTYPE
        link.linkname = str(tmp_path / "outside")
        tf.addfile(link)
        evil = tarfile.TarInfo("etc/passwd")
        evil.size = 5
        tf.addfile(evil, io.BytesIO(b"pwned"))
    (tmp_path / "outside").mkdir()
    archive = tmp_path / "evil.tar.zst"
    archive.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    with pytest.raises(InvalidArgument, match="goes through the symlink 'etc'"):
        import_image(str(archive), tmp_path / "image")
    assert not (tmp_path / "outside" / "passwd").exists()
    assert not (tmp_path / "image").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unknown_sources_are_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="neither a directory, a tarball nor debootstrap"):
        import_image(str(tmp_path / "nope"), tmp_path / "image")
    with pytest.raises(InvalidArgument, match="not a Debian suite"):
        import_image("debootstrap:Bad Suite", tmp_path / "image")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(InvalidArgument, match="not a valid tar archive"):
        import_image(str(junk), tmp_path / "image")
