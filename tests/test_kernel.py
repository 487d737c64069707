"""slim.core.build.kernel: a Debian kernel package into an image.

The fast tests install a small package built here with dpkg-deb; the slow ones download the
real kernel with the machine's apt (cached in $SLIM_CACHE_DIR/kernel, default
/var/cache/slim/kernel, outside the repository) and build an initrd from its modules.
Missing tools skip the tests, or fail them when CI=true.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from slim.core.build.initrd import InitrdBuilder, kernel_release, resolve_in_image, resolve_modules
from slim.core.build.kernel import download_kernel, install_kernel, kernel_package
from slim.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.support import need_tool

FAKE_KVER = "6.6.6-fake"
REAL_MODULES = ["virtio_net", "virtio_pci", "nfsv4", "overlay"]


def make_deb(where: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """A binary package holding ``files`` and symbolic ``links``, built with dpkg-deb."""
    dpkg_deb = need_tool("dpkg-deb")
    pkg = where / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: linux-image-fake\nVersion: 1\nArchitecture: all\n"
        "Maintainer: SLIM tests <slim@example.invalid>\nDescription: a fake kernel\n"
    )
    for rel, data in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_bytes(data)
    for rel, target in (links or {}).items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).symlink_to(target)
    deb = where / "fake.deb"
    subprocess.run(
        [dpkg_deb, "--root-owner-group", "-b", str(pkg), str(deb)], check=True, capture_output=True
    )
    shutil.rmtree(pkg)
    return deb


FAKE_FILES = {
    f"boot/vmlinuz-{FAKE_KVER}": b"fake kernel",
    f"boot/config-{FAKE_KVER}": b"CONFIG_RD_ZSTD=y\n",
    f"lib/modules/{FAKE_KVER}/modules.builtin": b"kernel/fs/ext4/ext4.ko\n",
    "usr/share/doc/linux-image-fake/changelog": b"none\n",
}


def merged_usr_image(root: Path) -> Path:
    """An image laid out like debootstrap's: /lib is a link to usr/lib."""
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "keep").write_text("the image's own file")
    (root / "lib").symlink_to("usr/lib")
    return root


@pytest.fixture
def fake_deb(tmp_path: Path) -> Path:
    (tmp_path / "deb").mkdir()
    return make_deb(tmp_path / "deb", FAKE_FILES, {f"boot/vmlinuz.link-{FAKE_KVER}": f"vmlinuz-{FAKE_KVER}"})


# --- fast: a package made here --------------------------------------------------------------------


def test_install_keeps_merged_usr_and_links_vmlinuz(tmp_path: Path, fake_deb: Path) -> None:
    need_tool("depmod")
    image = merged_usr_image(tmp_path / "image")
    assert install_kernel(fake_deb, image) == FAKE_KVER
    assert os.readlink(image / "lib") == "usr/lib"  # dpkg -x would have made it a directory
    assert (image / "usr" / "lib" / "keep").read_text() == "the image's own file"
    modules = image / "usr" / "lib" / "modules" / FAKE_KVER
    assert (modules / "modules.dep").is_file()  # depmod ran
    assert (modules / "modules.builtin").read_bytes() == b"kernel/fs/ext4/ext4.ko\n"
    assert os.readlink(image / "vmlinuz") == f"boot/vmlinuz-{FAKE_KVER}"
    assert os.readlink(image / "boot" / f"vmlinuz.link-{FAKE_KVER}") == f"vmlinuz-{FAKE_KVER}"
    assert (image / "boot" / f"vmlinuz-{FAKE_KVER}").read_bytes() == b"fake kernel"
    assert kernel_release(image) == FAKE_KVER
    # again, over itself
    assert install_kernel(fake_deb, image) == FAKE_KVER
    assert (image / "boot" / f"vmlinuz-{FAKE_KVER}").read_bytes() == b"fake kernel"


def test_install_keeps_an_existing_vmlinuz(tmp_path: Path, fake_deb: Path) -> None:
    need_tool("depmod")
    image = tmp_path / "image"
    image.mkdir()
    (image / "vmlinuz").symlink_to("boot/vmlinuz-other")
    assert install_kernel(fake_deb, image) == FAKE_KVER
    assert os.readlink(image / "vmlinuz") == "boot/vmlinuz-other"
    assert (image / "lib" / "modules" / FAKE_KVER / "modules.dep").is_file()


def test_install_refuses_depmod_through_an_absolute_lib_link(tmp_path: Path, fake_deb: Path) -> None:
    image = tmp_path / "image"
    (image / "usr" / "lib").mkdir(parents=True)
    (image / "lib").symlink_to("/usr/lib")  # the host's /usr/lib, seen from outside
    with pytest.raises(FailedPrecondition, match="leads outside the image"):
        install_kernel(fake_deb, image)
    # the files went where the image's own /lib leads
    assert (image / "usr" / "lib" / "modules" / FAKE_KVER / "modules.builtin").is_file()
    assert not Path(f"/usr/lib/modules/{FAKE_KVER}").exists()


def test_install_errors(tmp_path: Path, fake_deb: Path) -> None:
    image = tmp_path / "image"
    image.mkdir()
    with pytest.raises(NotFound, match="no kernel package at"):
        install_kernel(tmp_path / "missing.deb", image)
    with pytest.raises(FailedPrecondition, match="does not exist or is not a directory"):
        install_kernel(fake_deb, tmp_path / "no-image")
    junk = tmp_path / "junk.deb"
    junk.write_bytes(b"this is not a Debian package\n" * 10)
    with pytest.raises(FailedPrecondition, match=r"cannot unpack .*junk\.deb: .*dpkg-deb"):
        install_kernel(junk, image)
    (tmp_path / "empty").mkdir()
    no_kernel = make_deb(tmp_path / "empty", {"usr/share/doc/x": b"x"})
    with pytest.raises(FailedPrecondition, match="holds 0 kernels"):
        install_kernel(no_kernel, image)
    (image / "boot").write_text("a file where the package has a directory")
    with pytest.raises(FailedPrecondition, match=r"cannot unpack .*fake\.deb into .*File exists"):
        install_kernel(fake_deb, image)


def test_missing_tools_are_named(tmp_path: Path, fake_deb: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FailedPrecondition, match=r"dpkg-deb is not installed \(apt-get install dpkg\)"):
        install_kernel(fake_deb, tmp_path)
    with pytest.raises(FailedPrecondition, match=r"apt-cache is not installed \(apt-get install apt\)"):
        kernel_package("amd64")


def test_kernel_package_errors() -> None:
    need_tool("apt-cache")
    with pytest.raises(InvalidArgument, match="not a Debian architecture"):
        kernel_package("x86 64")
    with pytest.raises(FailedPrecondition, match="apt knows no package linux-image-no-such-arch"):
        kernel_package("no-such-arch")


# --- slow: the real Debian kernel ---------------------------------------------------------------


@dataclass
class RealKernel:
    deb: Path
    image: Path
    kver: str
    seconds: dict[str, float]


def cache_dir() -> Path:
    return Path(os.environ.get("SLIM_CACHE_DIR", "/var/cache/slim")) / "kernel"


@pytest.fixture(scope="module")
def real_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealKernel]:
    for tool in ("apt-get", "apt-cache", "dpkg", "dpkg-deb", "depmod"):
        need_tool(tool)
    seconds = {}
    start = time.monotonic()
    deb = download_kernel(cache_dir())
    seconds["download"] = time.monotonic() - start
    image = merged_usr_image(tmp_path_factory.mktemp("real") / "image")
    start = time.monotonic()
    kver = install_kernel(deb, image)
    seconds["install"] = time.monotonic() - start
    yield RealKernel(deb, image, kver, seconds)
    shutil.rmtree(image)


@pytest.mark.slow
def test_real_kernel_package_and_cache(real_kernel: RealKernel) -> None:
    package = kernel_package()
    assert re.match(r"^linux-image-\d+\.\d+\.\d+-\d+-[a-z0-9]+$", package), package
    assert real_kernel.deb.parent == cache_dir()
    assert real_kernel.deb.name.startswith(package + "_")
    before = real_kernel.deb.stat().st_mtime_ns
    assert download_kernel(cache_dir()) == real_kernel.deb  # cached: not fetched again
    assert real_kernel.deb.stat().st_mtime_ns == before
    assert package.removeprefix("linux-image-") == real_kernel.kver


@pytest.mark.slow
def test_real_kernel_modules(real_kernel: RealKernel) -> None:
    image, kver = real_kernel.image, real_kernel.kver
    assert kernel_release(image) == kver
    assert os.readlink(image / "lib") == "usr/lib"
    modules_dir = resolve_in_image(image, f"/lib/modules/{kver}")
    selection = resolve_modules(modules_dir, REAL_MODULES)
    names = selection.names
    assert len(names) == len(set(names))
    assert set(REAL_MODULES) <= set(names)
    for dep, user in [
        ("failover", "net_failover"),
        ("net_failover", "virtio_net"),
        ("virtio_ring", "virtio_net"),
        ("virtio", "virtio_pci"),
        ("sunrpc", "nfsv4"),
        ("nfs", "nfsv4"),
    ]:
        assert names.index(dep) < names.index(user), names
    # what the modules themselves say they need comes first (or is built in)
    modinfo = need_tool("modinfo")
    for i, module in enumerate(selection.modules):
        out = subprocess.run(
            [modinfo, "-F", "depends", str(modules_dir / module.path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        for dep in filter(None, out.strip().replace("-", "_").split(",")):
            assert dep in names[:i], f"{module.name} needs {dep}, which is not loaded before it"


@pytest.mark.slow
def test_real_initrd(real_kernel: RealKernel, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    zstd, cpio = need_tool("zstd"), need_tool("cpio")
    builder = InitrdBuilder()
    selection = builder.add_modules(real_kernel.image, real_kernel.kver, REAL_MODULES)
    target = tmp_path / "initrd.img"
    start = time.monotonic()
    with open(target, "wb") as f:
        info = builder.write(f)
    build = time.monotonic() - start
    assert info.compressed_size == target.stat().st_size
    assert info.modules == tuple(selection.names)
    raw = subprocess.run([zstd, "-dc", str(target)], capture_output=True, check=True, timeout=60).stdout
    assert len(raw) == info.uncompressed_size
    listed = subprocess.run(
        [cpio, "-t", "--quiet"], input=raw, capture_output=True, check=True, timeout=60
    ).stdout.decode()
    paths = set(listed.splitlines())
    for module in selection.modules:
        assert f"lib/modules/{real_kernel.kver}/{module.path}" in paths
    assert {"dev/console", "etc/slim/modules", f"lib/modules/{real_kernel.kver}/modules.dep"} <= paths
    again = io.BytesIO()
    rebuilt = InitrdBuilder()
    rebuilt.add_modules(real_kernel.image, real_kernel.kver, REAL_MODULES)
    rebuilt.write(again)
    assert again.getvalue() == target.read_bytes()
    with capsys.disabled():
        print(
            f"\n[initrd] kernel {real_kernel.kver}: {len(selection.modules)} modules "
            f"({', '.join(selection.names)}); initrd {info.compressed_size:,} bytes zstd-19 "
            f"({info.uncompressed_size:,} cpio, {info.files} files); build {build:.1f} s; "
            f"download {real_kernel.seconds['download']:.1f} s, "
            f"install {real_kernel.seconds['install']:.1f} s"
        )
