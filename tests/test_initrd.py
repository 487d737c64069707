"""slim.core.build.initrd: kernel version, module closure, cpio "newc" writer, initrd builder.

The archives are read back with the real GNU cpio and zstd (skipped when missing, unless CI=true).
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from slim.core.build.initrd import (
    CpioArchive,
    InitrdBuilder,
    Module,
    ModuleSelection,
    kernel_release,
    module_name,
    resolve_in_image,
    resolve_modules,
)
from slim.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.support import need_tool

KVER = "6.1.0-99-test"

# A dependency chain, a diamond, "-" in a file name, every compression suffix.
MODULES_DEP = """\
kernel/a/chain-top.ko: kernel/a/chain_mid.ko kernel/a/chain_base.ko
kernel/a/chain_mid.ko: kernel/a/chain_base.ko
kernel/a/chain_base.ko:
kernel/d/diamond_top.ko.xz: kernel/d/left.ko.zst kernel/d/right.ko.gz kernel/d/bottom.ko
kernel/d/left.ko.zst: kernel/d/bottom.ko
kernel/d/right.ko.gz: kernel/d/bottom.ko
kernel/d/bottom.ko:
kernel/net/virtio_net.ko.xz: kernel/net/net_failover.ko kernel/net/failover.ko
kernel/net/net_failover.ko: kernel/net/failover.ko
kernel/net/failover.ko:
kernel/x/lonely.ko:
"""
MODULES_BUILTIN = "kernel/fs/ext4/ext4.ko\nkernel/drivers/virtio/virtio_pci.ko\nkernel/fs/fuse-ish.ko\n"
MODULES_ALIAS = """\
# Aliases extracted from modules themselves.
alias fs-lonely lonely
alias pci:v00001AF4d00001000sv*sd*bc*sc*i* virtio_net
alias fs-ext4 ext4
"""


def module_paths() -> list[str]:
    return [line.partition(":")[0] for line in MODULES_DEP.splitlines()]


def make_image(
    root: Path, *, merged_usr: bool = True, kernel_link: str | None = "boot/vmlinuz-" + KVER
) -> Path:
    """A small image: /boot/vmlinuz-KVER, /vmlinuz linking to it, modules in lib/modules/KVER
    (under usr/lib with lib -> usr/lib when ``merged_usr``)."""
    lib = root / "usr" / "lib" if merged_usr else root / "lib"
    modules = lib / "modules" / KVER
    modules.mkdir(parents=True)
    if merged_usr:
        (root / "lib").symlink_to("usr/lib")
    for i, rel in enumerate(module_paths()):
        (modules / rel).parent.mkdir(parents=True, exist_ok=True)
        (modules / rel).write_bytes(f"module {rel}\n".encode() * (i + 1))
    (modules / "modules.dep").write_text(MODULES_DEP)
    (modules / "modules.builtin").write_text(MODULES_BUILTIN)
    (modules / "modules.alias").write_text(MODULES_ALIAS)
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinuz-{KVER}").write_bytes(b"kernel image")
    if kernel_link is not None:
        (root / "vmlinuz").symlink_to(kernel_link)
    return root


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "image")


@pytest.fixture
def modules_dir(image: Path) -> Path:
    return image / "usr" / "lib" / "modules" / KVER


def dep_table() -> dict[str, list[str]]:
    table = {}
    for line in MODULES_DEP.splitlines():
        head, _, tail = line.partition(":")
        table[module_name(head)] = [module_name(d) for d in tail.split()]
    return table


def assert_load_order(selection: ModuleSelection) -> None:
    """Every module once, after all of its dependencies."""
    names = selection.names
    assert len(names) == len(set(names))
    table = dep_table()
    for i, name in enumerate(names):
        for dep in table[name]:
            assert dep in names[:i], f"{dep} must come before {name} in {names}"


# --- modules ------------------------------------------------------------------------------------


def test_module_name_strips_suffixes_and_dashes() -> None:
    assert module_name("kernel/a/chain-top.ko") == "chain_top"
    assert module_name("kernel/d/diamond_top.ko.xz") == "diamond_top"
    assert module_name("left.ko.zst") == "left"
    assert module_name("kernel/d/right.ko.gz\n") == "right"


def test_chain_loads_dependencies_first(modules_dir: Path) -> None:
    selection = resolve_modules(modules_dir, ["chain-top"])
    assert selection.names == ["chain_base", "chain_mid", "chain_top"]
    assert selection.kver == KVER
    assert selection.builtin == ()
    top = selection.modules[-1]
    assert top == Module("chain_top", "kernel/a/chain-top.ko", (modules_dir / top.path).stat().st_size)
    assert all(m.size == (modules_dir / m.path).stat().st_size for m in selection.modules)


def test_diamond_gives_each_module_once(modules_dir: Path) -> None:
    selection = resolve_modules(modules_dir, ["diamond_top"])
    assert sorted(selection.names) == ["bottom", "diamond_top", "left", "right"]
    assert selection.names[0] == "bottom"
    assert selection.names[-1] == "diamond_top"
    assert_load_order(selection)
    assert [m.path for m in selection.modules if m.name == "left"] == ["kernel/d/left.ko.zst"]


def test_overlapping_requests_and_dash_underscore(modules_dir: Path) -> None:
    selection = resolve_modules(
        modules_dir, ["virtio-net", "net_failover", "chain_mid", "virtio_net", "chain_top", "failover"]
    )
    assert selection.names == [
        "failover",
        "net_failover",
        "virtio_net",
        "chain_base",
        "chain_mid",
        "chain_top",
    ]
    assert_load_order(selection)


def test_builtin_modules_are_skipped_and_reported(modules_dir: Path) -> None:
    selection = resolve_modules(modules_dir, ["ext4", "virtio-pci", "lonely", "ext4", "fuse_ish"])
    assert selection.names == ["lonely"]
    assert selection.builtin == ("ext4", "virtio_pci", "fuse_ish")


def test_aliases(modules_dir: Path) -> None:
    selection = resolve_modules(modules_dir, ["fs-lonely", "fs_ext4"])
    assert selection.names == ["lonely"]
    assert selection.builtin == ("ext4",)


def test_no_modules_file_means_empty_selection(modules_dir: Path) -> None:
    assert resolve_modules(modules_dir, []) == ModuleSelection(KVER, (), ())


def test_unknown_module_names_module_kernel_and_suggestions(modules_dir: Path) -> None:
    with pytest.raises(NotFound) as caught:
        resolve_modules(modules_dir, ["lonely", "virtio_nte"])
    message = str(caught.value)
    assert "'virtio_nte'" in message
    assert KVER in message
    assert "closest: virtio_net" in message
    with pytest.raises(NotFound, match="no similar names"):
        resolve_modules(modules_dir, ["zzzzzzzz"])


def test_missing_modules_dep(tmp_path: Path) -> None:
    (tmp_path / KVER).mkdir()
    with pytest.raises(FailedPrecondition, match=f"no modules.dep; run depmod -b IMAGE {KVER}"):
        resolve_modules(tmp_path / KVER, ["x"])


@pytest.mark.parametrize(
    ("dep", "message"),
    [
        ("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n", "cycle: a → b → a"),
        ("kernel/a.ko: kernel/gone.ko\n", "needs kernel/gone.ko, not in modules.dep"),
        ("kernel/a.ko: ../../../etc/evil.ko\n", "not a module path"),
        ("/elsewhere/kernel/a.ko:\n", "outside the modules directory"),
        ("kernel/a.ko kernel/b.ko\n", "expected 'module: dependencies'"),
        ("kernel/missing.ko:\nkernel/a.ko: kernel/missing.ko\n", "lists kernel/missing.ko, which is missing"),
    ],
)
def test_bad_modules_dep(tmp_path: Path, dep: str, message: str) -> None:
    modules = tmp_path / KVER
    (modules / "kernel").mkdir(parents=True)
    for name in ("a", "b"):
        (modules / "kernel" / f"{name}.ko").write_bytes(b"x")
    (modules / "modules.dep").write_text(dep)
    with pytest.raises(FailedPrecondition, match=re.escape(message)):
        resolve_modules(modules, ["a"])


def test_absolute_paths_in_old_modules_dep(tmp_path: Path) -> None:
    modules = tmp_path / KVER
    (modules / "kernel").mkdir(parents=True)
    (modules / "kernel" / "a.ko").write_bytes(b"x")
    (modules / "kernel" / "b.ko").write_bytes(b"yy")
    (modules / "modules.dep").write_text(
        f"/lib/modules/{KVER}/kernel/a.ko: /lib/modules/{KVER}/kernel/b.ko\n"
        f"/lib/modules/{KVER}/kernel/b.ko:\n"
    )
    selection = resolve_modules(modules, ["a"])
    assert selection.modules == (Module("b", "kernel/b.ko", 2), Module("a", "kernel/a.ko", 1))


# --- the image's kernel -------------------------------------------------------------------------


def test_kernel_release_relative_link(image: Path) -> None:
    assert kernel_release(image) == KVER


def test_kernel_release_absolute_link_is_inside_the_image(tmp_path: Path) -> None:
    # the host has no /boot/vmlinuz-KVER: only an in-image resolution finds it
    image = make_image(tmp_path / "image", kernel_link=f"/boot/vmlinuz-{KVER}")
    assert kernel_release(image) == KVER
    assert resolve_in_image(image, "/vmlinuz") == image.resolve() / "boot" / f"vmlinuz-{KVER}"


def test_kernel_release_through_chained_links(tmp_path: Path) -> None:
    image = make_image(tmp_path / "image", merged_usr=False, kernel_link="/boot/current")
    (image / "boot" / "current").symlink_to("../boot/./latest")
    (image / "boot" / "latest").symlink_to(f"vmlinuz-{KVER}")
    assert kernel_release(image) == KVER


def test_kernel_release_other_kernel_path(image: Path) -> None:
    assert kernel_release(image, f"/boot/vmlinuz-{KVER}") == KVER
    (image / "boot" / "bzImage").write_bytes(b"kernel")  # no version in the name: the one modules dir
    assert kernel_release(image, "/boot/bzImage") == KVER


def test_escaping_links_stay_inside_the_image(tmp_path: Path) -> None:
    image = make_image(tmp_path / "image", kernel_link="../../../etc/x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / f"vmlinuz-{KVER}").write_bytes(b"not the image's")
    root = image.resolve()
    assert resolve_in_image(image, "/vmlinuz") == root / "etc" / "x"
    assert resolve_in_image(image, "/../../outside") == root / "outside"
    with pytest.raises(FailedPrecondition, match="has no kernel at /vmlinuz"):
        kernel_release(image)
    # a link that would reach the host's copy reaches nothing
    (image / "vmlinuz").unlink()
    (image / "vmlinuz").symlink_to(f"../outside/vmlinuz-{KVER}")
    with pytest.raises(FailedPrecondition, match="has no kernel at /vmlinuz"):
        kernel_release(image)
    # ... and one that climbs out and back in finds the image's own kernel
    (image / "vmlinuz").unlink()
    (image / "vmlinuz").symlink_to(f"../../../../../boot/vmlinuz-{KVER}")
    assert kernel_release(image) == KVER
    # a directory link out of the image
    (image / "up").symlink_to("../..")
    assert resolve_in_image(image, "/up/outside/x") == root / "outside" / "x"
    (image / "hostetc").symlink_to("/etc")
    assert resolve_in_image(image, "/hostetc/passwd") == root / "etc" / "passwd"


def test_resolve_in_image_answers_are_always_inside(image: Path) -> None:
    (image / "a").symlink_to("/../b/../../c")
    (image / "loop1").symlink_to("loop2")
    (image / "loop2").symlink_to("/loop1")
    root = image.resolve()
    for path in (
        "/",
        "..",
        "/../..",
        "a",
        "/a/../../x",
        "lib/modules/../../../..",
        "vmlinuz/..",
        "/usr/./lib",
    ):
        assert resolve_in_image(image, path).is_relative_to(root), path
    assert resolve_in_image(image, "/lib/modules") == root / "usr" / "lib" / "modules"
    with pytest.raises(FailedPrecondition, match="too many symbolic links"):
        resolve_in_image(image, "/loop1/x")


def test_missing_kernel(tmp_path: Path) -> None:
    image = make_image(tmp_path / "image", kernel_link=None)
    with pytest.raises(FailedPrecondition) as caught:
        kernel_release(image)
    assert str(caught.value) == (
        f"image {image} has no kernel at /vmlinuz; add one with slim ee import --add-kernel "
        "or set environments.NAME.kernel"
    )
    (image / "vmlinuz").symlink_to("boot/vmlinuz-gone")  # dangling
    with pytest.raises(FailedPrecondition, match="has no kernel at /vmlinuz"):
        kernel_release(image)
    with pytest.raises(FailedPrecondition, match="has no kernel at /boot"):
        kernel_release(image, "/boot")  # a directory
    with pytest.raises(FailedPrecondition, match="does not exist"):
        kernel_release(tmp_path / "nothing")


def test_kernel_without_its_modules(image: Path) -> None:
    (image / "boot" / "vmlinuz-7.0.0-new").write_bytes(b"kernel")
    with pytest.raises(
        FailedPrecondition, match=f"version 7.0.0-new .* no /lib/modules/7.0.0-new .*has: {KVER}"
    ):
        kernel_release(image, "/boot/vmlinuz-7.0.0-new")


def test_unversioned_kernel_needs_one_modules_dir(image: Path) -> None:
    (image / "boot" / "kernel").write_bytes(b"kernel")
    (image / "lib" / "modules" / "5.10.0-old").mkdir()
    with pytest.raises(FailedPrecondition, match=f"several: 5.10.0-old, {KVER}; name the kernel file"):
        kernel_release(image, "/boot/kernel")
    shutil.rmtree(image / "usr" / "lib" / "modules")
    with pytest.raises(FailedPrecondition, match="/lib/modules has none"):
        kernel_release(image, "/boot/kernel")


# --- cpio ---------------------------------------------------------------------------------------


def sample_archive(tmp_path: Path, order: int = 1, mtime: int = 1_700_000_000) -> CpioArchive:
    big = tmp_path / "big.bin"
    if not big.exists():
        big.write_bytes(bytes(range(256)) * 12_289)  # > 3 MiB, not a multiple of 4
        big.chmod(0o751)
    steps: list[Callable[[CpioArchive], None]] = [
        lambda a: a.add_dir("etc", mode=0o750),
        lambda a: a.add_bytes("/etc/hostname", b"node\n", mode=0o600),
        lambda a: a.add_bytes("etc/empty", b""),
        lambda a: a.add_bytes("init", b"#!/bin/sh\necho hi\n", mode=0o755),
        lambda a: a.add_file("usr/share/deep/big.bin", big),
        lambda a: a.add_symlink("bin/sh", "busybox"),
        lambda a: a.add_symlink("lib64", "/usr/lib64"),
        lambda a: a.add_node("dev/console", "c", 5, 1),
        lambda a: a.add_node("dev/sda", "b", 8, 0, mode=0o660, gid=6),
        lambda a: a.add_bytes("srv/owned", b"mine", uid=1234, gid=5678),
        lambda a: a.add_dir("tmp", mode=0o1777),
        lambda a: a.add_bytes("odd name-é", b"x" * 3),
    ]
    archive = CpioArchive(mtime=mtime)
    for step in steps[::order]:
        step(archive)
    return archive


def cpio_bytes(archive: CpioArchive) -> bytes:
    out = io.BytesIO()
    written = archive.write_cpio(out)
    assert written == len(out.getvalue())
    return out.getvalue()


def test_cpio_is_deterministic(tmp_path: Path) -> None:
    first = cpio_bytes(sample_archive(tmp_path))
    assert cpio_bytes(sample_archive(tmp_path)) == first
    assert cpio_bytes(sample_archive(tmp_path, order=-1)) == first  # the order of adding does not matter
    assert cpio_bytes(sample_archive(tmp_path, mtime=0)) != first
    assert len(first) % 4 == 0
    assert first.startswith(b"070701")
    assert first.rstrip(b"\0").endswith(b"TRAILER!!!")


def test_cpio_entries_are_sorted_with_parents(tmp_path: Path) -> None:
    archive = CpioArchive()
    archive.add_bytes("b/c/file", b"1")
    archive.add_bytes("a-b", b"2")
    archive.add_bytes("a/z", b"3")
    entries = archive.entries()
    assert [e.path for e in entries] == ["a", "a/z", "a-b", "b", "b/c", "b/c/file"]
    assert all(e.mode == stat.S_IFDIR | 0o755 for e in entries if e.path in ("a", "b", "b/c"))


def test_cpio_refuses_bad_and_duplicate_paths(tmp_path: Path) -> None:
    archive = CpioArchive()
    for bad in ("", "/", "../x", "a/../../b", "a\0b"):
        with pytest.raises(InvalidArgument, match="not a valid archive path"):
            archive.add_bytes(bad, b"")
    archive.add_dir("d")
    archive.add_dir("/d/")  # the same entry again is fine
    with pytest.raises(InvalidArgument, match="already in the archive"):
        archive.add_dir("d", mode=0o700)
    archive.add_bytes("f", b"1")
    archive.add_bytes("f", b"1")
    with pytest.raises(InvalidArgument, match="f is already in the archive"):
        archive.add_bytes("f", b"2")
    with pytest.raises(InvalidArgument, match="f is already in the archive"):
        archive.add_symlink("f", "1")
    archive.add_symlink("lib", "usr/lib")
    archive.add_bytes("lib/x", b"")
    with pytest.raises(InvalidArgument, match="lib/x: lib is in the archive but not a directory"):
        archive.entries()
    with pytest.raises(NotFound, match="no-such-file"):
        archive.add_file("g", tmp_path / "no-such-file")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        archive.add_file("g", tmp_path)
    with pytest.raises(InvalidArgument, match="symbolic link target"):
        archive.add_symlink("s", "")
    big_uid = CpioArchive()
    big_uid.add_bytes("f", b"", uid=2**32)
    with pytest.raises(InvalidArgument, match="f: a size, owner, time or device number does not fit"):
        big_uid.write_cpio(io.BytesIO())
    with pytest.raises(InvalidArgument, match="mtime -1 does not fit"):
        CpioArchive(mtime=-1)


def extract(data: bytes, into: Path) -> str:
    """Unpack with GNU cpio (all but the device nodes, which need privilege); its listing."""
    cpio = need_tool("cpio")
    into.mkdir()
    done = subprocess.run(
        [cpio, "-idmv", "--no-absolute-filenames", "--quiet", "-f", "dev/console", "dev/sda"],
        input=data,
        cwd=into,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return done.stderr.decode()


def listing(data: bytes) -> list[str]:
    cpio = need_tool("cpio")
    done = subprocess.run(
        [cpio, "-tv", "--numeric-uid-gid", "--quiet"], input=data, capture_output=True, timeout=60, check=True
    )
    return done.stdout.decode().splitlines()


def test_cpio_round_trip_through_gnu_cpio(tmp_path: Path) -> None:
    data = cpio_bytes(sample_archive(tmp_path))
    out = tmp_path / "out"
    extract(data, out)
    assert (out / "etc" / "hostname").read_bytes() == b"node\n"
    assert stat.S_IMODE((out / "etc" / "hostname").stat().st_mode) == 0o600
    assert (out / "etc" / "empty").read_bytes() == b""
    assert stat.S_IMODE((out / "etc").stat().st_mode) == 0o750
    assert stat.S_IMODE((out / "init").stat().st_mode) == 0o755
    assert (out / "usr" / "share" / "deep" / "big.bin").read_bytes() == (tmp_path / "big.bin").read_bytes()
    assert stat.S_IMODE((out / "usr" / "share" / "deep" / "big.bin").stat().st_mode) == 0o751
    assert stat.S_IMODE((out / "usr").stat().st_mode) == 0o755
    assert os.readlink(out / "bin" / "sh") == "busybox"
    assert os.readlink(out / "lib64") == "/usr/lib64"
    assert stat.S_IMODE((out / "tmp").stat().st_mode) == 0o1777
    assert (out / "odd name-é").read_bytes() == b"xxx"
    assert (out / "init").stat().st_mtime == 1_700_000_000
    assert not (out / "dev" / "console").exists()

    lines = listing(data)
    names = [line.split()[-1] for line in lines if "->" not in line]
    assert "dev/console" in names
    assert len(lines) == 18  # 12 entries + etc-less parents: bin dev srv usr usr/share usr/share/deep
    console = next(line for line in lines if line.endswith(" dev/console"))
    assert re.match(r"^crw------- +1 +0 +0 +5, +1 ", console), console
    sda = next(line for line in lines if line.endswith(" dev/sda"))
    assert re.match(r"^brw-rw---- +1 +0 +6 +8, +0 ", sda), sda
    owned = next(line for line in lines if line.endswith(" srv/owned"))
    assert re.match(r"^-rw-r--r-- +1 +1234 +5678 +4 ", owned), owned
    assert any(re.match(r"^lrwxrwxrwx .* bin/sh -> busybox$", line) for line in lines)


# --- the initrd builder -------------------------------------------------------------------------


def build_initrd(image: Path, names: list[str]) -> tuple[bytes, InitrdBuilder]:
    builder = InitrdBuilder()
    builder.add_modules(image, KVER, names)
    builder.add_bytes("init", b"#!/bin/sh\nexec /bin/sh\n", mode=0o755)
    builder.add_symlink("bin/sh", "busybox")
    out = io.BytesIO()
    info = builder.write(out, level=3)
    data = out.getvalue()
    assert info.compressed_size == len(data)
    return data, builder


def test_initrd_end_to_end(image: Path, modules_dir: Path, tmp_path: Path) -> None:
    zstd = need_tool("zstd")
    builder = InitrdBuilder()
    selection = builder.add_modules(image, KVER, ["virtio_net", "diamond-top", "ext4"])
    builder.add_bytes("init", b"#!/bin/sh\nexec /bin/sh\n", mode=0o755)
    target = tmp_path / "initrd.img"
    with open(target, "wb") as f:
        info = builder.write(f)
    data = target.read_bytes()

    assert selection.builtin == ("ext4",)
    assert info.modules == tuple(selection.names)
    assert_load_order(selection)
    assert info.compressed_size == len(data)
    assert info.files == len(selection.modules) + 4  # modules.dep, modules.builtin, etc/slim/modules, init
    params = zstandard.get_frame_parameters(data)
    assert params.has_checksum
    subprocess.run([zstd, "-q", "-t", str(target)], check=True, timeout=60)
    raw = subprocess.run([zstd, "-dc", str(target)], capture_output=True, check=True, timeout=60).stdout
    assert len(raw) == info.uncompressed_size

    out = tmp_path / "out"
    extract(raw, out)
    inside = out / "lib" / "modules" / KVER
    for module in selection.modules:
        assert (inside / module.path).read_bytes() == (modules_dir / module.path).read_bytes()
        assert stat.S_IMODE((inside / module.path).stat().st_mode) == 0o644
    assert not (inside / "kernel" / "a").exists()  # only what was asked for
    assert (inside / "modules.dep").read_text() == (
        "kernel/net/failover.ko:\n"
        "kernel/net/net_failover.ko: kernel/net/failover.ko\n"
        "kernel/net/virtio_net.ko.xz: kernel/net/net_failover.ko kernel/net/failover.ko\n"
        "kernel/d/bottom.ko:\n"
        "kernel/d/right.ko.gz: kernel/d/bottom.ko\n"
        "kernel/d/left.ko.zst: kernel/d/bottom.ko\n"
        "kernel/d/diamond_top.ko.xz: kernel/d/left.ko.zst kernel/d/right.ko.gz kernel/d/bottom.ko\n"
    )
    assert (inside / "modules.builtin").read_text() == MODULES_BUILTIN
    assert (out / "etc" / "slim" / "modules").read_text().splitlines() == [
        f"/lib/modules/{KVER}/{m.path}" for m in selection.modules
    ]
    console = next(line for line in listing(raw) if line.endswith(" dev/console"))
    assert re.match(r"^crw------- +1 +0 +0 +5, +1 ", console), console


def test_initrd_frame_holds_the_whole_archive_in_its_window() -> None:
    """Two copies of 9 MiB of noise: with level 19's own window (8 MiB; level 3's is 2 MiB) the
    second would not be found to repeat the first.  The frame says its size, and its window is
    the archive's size, no more (the kernel allocates it while it unpacks)."""
    noise = random.Random(7).randbytes(9 << 20)
    builder = InitrdBuilder()
    builder.add_bytes("a", noise)
    builder.add_bytes("b", noise)
    out = io.BytesIO()
    info = builder.write(out, level=3)
    params = zstandard.get_frame_parameters(out.getvalue())
    assert params.content_size == info.uncompressed_size == len(cpio_bytes(builder))
    assert params.window_size == info.uncompressed_size
    assert info.compressed_size < len(noise) * 1.01
    assert zstandard.ZstdDecompressor().decompress(out.getvalue()) == cpio_bytes(builder)


def test_initrd_is_deterministic(image: Path) -> None:
    first, _ = build_initrd(image, ["virtio_net", "chain_top"])
    second, _ = build_initrd(image, ["chain_top", "virtio_net"])
    third, _ = build_initrd(image, ["virtio_net", "chain_top"])
    assert first == third
    assert first != second  # the load order follows the request


def test_add_modules_errors(image: Path) -> None:
    builder = InitrdBuilder()
    with pytest.raises(InvalidArgument, match="not a kernel version"):
        builder.add_modules(image, "../../etc", ["x"])
    with pytest.raises(FailedPrecondition, match=r"has no /lib/modules/9\.9\.9"):
        builder.add_modules(image, "9.9.9", ["x"])
    with pytest.raises(NotFound, match="no module 'nope'"):
        builder.add_modules(image, KVER, ["nope"])
    builder.add_modules(image, KVER, ["lonely"])
    with pytest.raises(InvalidArgument, match="already called"):
        builder.add_modules(image, KVER, ["chain_top"])


def test_initrd_without_modules_still_has_a_console() -> None:
    builder = InitrdBuilder(mtime=5)
    builder.add_node("dev/console", "c", 5, 1)  # the same entry again: fine
    with pytest.raises(InvalidArgument, match="dev/console is already in the archive"):
        builder.add_node("dev/console", "c", 5, 1, mode=0o620)
    assert [(e.path, e.mode, e.rdev) for e in builder.entries()] == [
        ("dev", stat.S_IFDIR | 0o755, (0, 0)),
        ("dev/console", stat.S_IFCHR | 0o600, (5, 1)),
    ]
    out = io.BytesIO()
    info = builder.write(out)
    assert info.modules == ()
    assert (info.files, info.entries) == (0, 2)
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(out.getvalue())
    assert raw == cpio_bytes(builder)
    assert info.uncompressed_size == len(raw)
