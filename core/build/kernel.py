"""A Debian kernel for an EE image, from the machine's configured apt sources.

:func:`kernel_package` names the package behind ``linux-image-ARCH``, :func:`download_kernel`
fetches its .deb into a cache, :func:`install_kernel` unpacks it into an image, runs depmod
and links ``/vmlinuz``.

The package is unpacked chroot-style (see :func:`slim.core.build.initrd.resolve_in_image`), not
with ``dpkg -x``: that replaces an image's ``/lib -> usr/lib`` link (merged /usr, as in every
debootstrap image) with a directory and breaks the image.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from slim.agent.unpack import member_name
from slim.core.build.initrd import KVER_RE, resolve_in_image
from slim.errors import FailedPrecondition, InvalidArgument, NotFound, SlimError, Unavailable

APT_TIMEOUT = 120.0  # apt-cache, dpkg: local work
DOWNLOAD_TIMEOUT = 1800.0  # ~70 MB from the configured mirror
DEPMOD_TIMEOUT = 300.0
TOOL_PACKAGES = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg": "dpkg",
    "dpkg-deb": "dpkg",
    "dpkg-query": "dpkg",
    "depmod": "kmod",
}
DEPENDS_ONLY = (
    "--no-recommends",
    "--no-suggests",
    "--no-conflicts",
    "--no-breaks",
    "--no-replaces",
    "--no-enhances",
)
ARCH_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
VMLINUZ_RE = re.compile(r"^boot/vmlinuz-(.+)$")


def _tail(text: str, lines: int = 10) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])[-2000:]


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        package = TOOL_PACKAGES.get(name, name)
        raise FailedPrecondition(f"{name} is not installed (apt-get install {package})")
    return found


def _run(
    args: list[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    error: type[SlimError] = FailedPrecondition,
) -> str:
    """Run a tool (C locale); its stdout, or ``error`` with the end of its stderr."""
    argv = [_tool(args[0]), *args[1:]]
    env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise error(f"{' '.join(args)} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise error(f"{' '.join(args)} failed (exit {done.returncode}): {_tail(done.stderr) or 'no message'}")
    return done.stdout


def kernel_package(arch: str | None = None) -> str:
    """The concrete package (``linux-image-6.1.0-28-amd64``) that ``linux-image-ARCH`` depends on;
    ``arch`` defaults to dpkg's architecture."""
    if arch is None:
        arch = _run(["dpkg", "--print-architecture"], timeout=APT_TIMEOUT).strip()
    if not ARCH_RE.match(arch):
        raise InvalidArgument(f"{arch!r} is not a Debian architecture")
    meta = f"linux-image-{arch}"
    _tool("apt-cache")
    try:
        out = _run(["apt-cache", "depends", meta], timeout=APT_TIMEOUT)
    except FailedPrecondition as e:
        raise FailedPrecondition(
            f"apt knows no package {meta} (run apt-get update, or check the apt sources): {e}"
        ) from None
    for line in out.splitlines():
        kind, _, name = line.strip().lstrip("|").partition(":")
        name = name.strip()
        if kind == "Depends" and name.startswith("linux-image-") and name != meta and "<" not in name:
            return name
    raise FailedPrecondition(f"{meta} depends on no linux-image package (apt-cache depends {meta})")


def download_kernel(cache_dir: Path, package: str | None = None) -> Path:
    """The .deb of kernel ``package`` (default :func:`kernel_package`) in ``cache_dir``."""
    return download_deb(cache_dir, package or kernel_package())


def download_deb(cache_dir: Path, package: str) -> Path:
    """The .deb of ``package`` in ``cache_dir``, downloaded with apt-get (no maintainer script
    runs: nothing is installed) unless a copy with apt's size and SHA-256 is already there."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    uris = _run(["apt-get", "download", "--print-uris", package], timeout=APT_TIMEOUT)
    match = re.search(r"^'[^']*' (\S+\.deb) (\d+) (\S+)$", uris, re.MULTILINE)
    if match is None:
        raise FailedPrecondition(f"apt-get download --print-uris {package} named no .deb: {_tail(uris)}")
    name, size, digest = match.group(1), int(match.group(2)), match.group(3)
    if "/" in name or name.startswith("."):
        raise FailedPrecondition(f"apt named an odd file for {package}: {name!r}")
    deb = cache_dir / name
    if deb.is_file() and _matches(deb, size, digest):
        return deb
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
        _run(["apt-get", "download", package], cwd=Path(tmp), timeout=DOWNLOAD_TIMEOUT, error=Unavailable)
        got = Path(tmp) / name
        if not got.is_file():
            raise Unavailable(f"apt-get download {package} wrote no {name}")
        if not _matches(got, size, digest):
            raise Unavailable(f"apt-get download {package}: {name} does not match apt's size and checksum")
        got.chmod(0o644)
        os.replace(got, deb)
    return deb


def _matches(path: Path, size: int, digest: str) -> bool:
    """Whether ``path`` has ``size`` bytes and, for a ``SHA256:hex`` digest, that hash."""
    if path.stat().st_size != size:
        return False
    algorithm, _, want = digest.partition(":")
    if algorithm.upper() != "SHA256":
        return True
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest() == want.lower()


def installed(package: str) -> bool:
    """Whether ``package`` is installed on this machine (dpkg says so)."""
    try:
        out = _run(["dpkg-query", "-W", "-f=${Status}", package], timeout=APT_TIMEOUT)
    except FailedPrecondition:
        return False
    return out.endswith("ok installed")


def missing_closure(packages: list[str]) -> list[str]:
    """``packages`` and what they depend on (``Depends``/``Pre-Depends``, first alternatives
    only), leaving out what is installed here and what it needs: the packages to download
    so that their programs find every library (here or unpacked beside them)."""
    todo, seen, out = list(packages), set(packages), []
    while todo:
        package = todo.pop(0)
        if installed(package):
            continue
        out.append(package)
        text = _run(["apt-cache", "depends", *DEPENDS_ONLY, package], timeout=APT_TIMEOUT)
        for line in text.splitlines()[1:]:
            kind, _, name = line.strip().partition(":")
            name = name.strip().split(":")[0]  # libfoo:amd64 -> libfoo
            if kind in ("Depends", "PreDepends") and name and not name.startswith("<") and name not in seen:
                seen.add(name)
                todo.append(name)
    return out


def unpack_deb(deb: Path, root: Path) -> None:
    """Unpack package ``deb``'s files under ``root`` (created if missing), no script run."""
    root.mkdir(parents=True, exist_ok=True)
    _unpack(deb, root)


def install_kernel(deb: Path, image_root: Path) -> str:
    """Unpack kernel package ``deb`` into the image, run depmod for it and make ``/vmlinuz``
    point to it (unless the image has a /vmlinuz already); returns its version (KVER)."""
    deb, root = Path(deb), Path(image_root)
    if not deb.is_file():
        raise NotFound(f"no kernel package at {deb}")
    if not root.is_dir():
        raise FailedPrecondition(f"image {root} does not exist or is not a directory")
    kvers = _unpack(deb, root)
    if len(kvers) != 1:
        raise FailedPrecondition(f"{deb.name} holds {len(kvers)} kernels (boot/vmlinuz-*), not one")
    kver = kvers[0]
    if not KVER_RE.match(kver):
        raise FailedPrecondition(f"{deb.name}: {kver!r} is not a kernel version")
    modules = resolve_in_image(root, f"/lib/modules/{kver}")
    if (root / "lib" / "modules" / kver).resolve() != modules:
        # depmod -b follows the image's links as host paths
        raise FailedPrecondition(f"image {root}: /lib/modules leads outside the image; cannot run depmod")
    _run(["depmod", "-b", str(root), kver], timeout=DEPMOD_TIMEOUT)
    if not (modules / "modules.dep").is_file():
        raise FailedPrecondition(f"depmod -b {root} {kver} wrote no modules.dep")
    vmlinuz = root / "vmlinuz"
    if not os.path.lexists(vmlinuz):
        os.symlink(f"boot/vmlinuz-{kver}", vmlinuz)
    return kver


def _unpack(deb: Path, root: Path) -> list[str]:
    """Extract the package's files into the image as a chroot would see them (existing
    directory links are kept and followed inside the image); the kernel versions found."""
    argv = [_tool("dpkg-deb"), "--fsys-tarfile", str(deb)]
    kvers: list[str] = []
    local_error: OSError | None = None
    tar_error: tarfile.TarError | None = None
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=stderr, env={**os.environ, "LC_ALL": "C"}
        )
        assert proc.stdout is not None
        try:
            try:
                with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                    for member in tar:
                        rel = _member_path(member.name)
                        if rel is None:
                            continue
                        _extract(tar, member, rel, root)
                        if match := VMLINUZ_RE.match(rel):
                            kvers.append(match.group(1))
            except tarfile.TarError as e:
                tar_error = e
            except OSError as e:
                local_error = e
            finally:
                proc.stdout.close()  # dpkg-deb stops if we did
            code = proc.wait(timeout=APT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise FailedPrecondition(f"dpkg-deb --fsys-tarfile {deb} did not finish") from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        stderr.seek(0)
        message = _tail(stderr.read().decode(errors="replace"))
    if local_error is not None:
        raise FailedPrecondition(f"cannot unpack {deb} into {root}: {local_error}")
    if code != 0:
        raise FailedPrecondition(f"cannot unpack {deb}: dpkg-deb failed (exit {code}): {message}")
    if tar_error is not None:
        raise FailedPrecondition(f"cannot unpack {deb}: {tar_error}")
    return kvers


def _member_path(name: str) -> str | None:
    """The member's path in the image by the agent's rule for archive members (relative,
    no ``..``); None for the package's root."""
    try:
        return member_name(name.lstrip("/")) or None  # dpkg reads /boot/x as ./boot/x
    except ValueError as exc:
        raise FailedPrecondition(f"a package member leaves the image: {exc}") from None


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, rel: str, root: Path) -> None:
    """One package member into the image, as dpkg would in a chroot: the image's own links
    (merged /usr: /lib -> usr/lib) are followed inside it (resolve_in_image), which the
    agent's strict writer (slim.agent.unpack.TreeWriter) refuses on purpose, and a file in
    the way of a package directory is an error, not replaced.  Owners are not kept (a
    kernel package is root's)."""
    if member.isdir():
        target = resolve_in_image(root, "/" + rel)
        if not target.is_dir():
            target.mkdir(mode=member.mode & 0o7777, parents=True)
        return
    parent = resolve_in_image(root, "/" + str(PurePosixPath(rel).parent))
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / PurePosixPath(rel).name
    if target.is_dir() and not target.is_symlink():
        raise FailedPrecondition(f"image {root}: /{rel} is a directory, the package has a file there")
    if os.path.lexists(target):
        target.unlink()
    if member.isfile():
        source = tar.extractfile(member)
        assert source is not None
        with open(target, "xb") as f:
            shutil.copyfileobj(source, f, 1 << 20)
        os.chmod(target, member.mode & 0o7777)
        os.utime(target, (member.mtime, member.mtime))
    elif member.issym():
        os.symlink(member.linkname, target)
    elif member.islnk():
        os.link(resolve_in_image(root, "/" + (_member_path(member.linkname) or "")), target)
    else:
        raise FailedPrecondition(f"package member /{rel} is a device or fifo; kernel packages have none")
