"""Boot media for home PCs (``slim media build``): one hybrid image, CD or USB stick, BIOS or UEFI.

The medium carries a kernel, an initrd with the medium's agent (:mod:`slim.agent.medium`) and
what it needs to reach its relays and trust what it gets: the core's public keys, SLIM's CA,
the relay URLs, and the node's token on a per-node medium.  Its agent fetches the signed plan
and the release's kernel and initrd, verified, and starts them with ``kexec`` (docs/home.md
says why this shape).  Everything comes from Debian:

- the kernel and its modules from an environment's image (Debian's ``linux-image``, signed for
  Secure Boot);
- BIOS: a GRUB El Torito core image with every module it needs built in (``grub-mkimage``,
  grub-pc-bin), and GRUB's hybrid MBR so that the same bytes boot from a USB stick;
- UEFI: an EFI system partition (``mtools``) with Debian's signed shim as ``BOOTX64.EFI`` and
  Debian's signed GRUB beside it, from the ``shim-signed`` and ``grub-efi-amd64-signed``
  packages, downloaded and unpacked, never installed (their scripts would touch this
  machine's boot);
- ``kexec`` from ``kexec-tools`` and the libraries it needs, downloaded and unpacked too
  (installing kexec-tools may make this machine's own reboots go through kexec);
- the ISO by ``xorriso``, in the layout Debian's installer images use.

Signed GRUB reads ``/boot/grub/grub.cfg`` of the medium it finds by ``/.disk/info``; the
configuration first looks for this medium's own ``/.disk/slim-medium-ID``, so that another
Debian medium plugged in beside it is not taken instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from slim.agent.plan import MEDIUM_ID_RE
from slim.core.build.agentrt import Runtime, add_runtime
from slim.core.build.initrd import InitrdBuilder, InitrdInfo, resolve_in_image, resolve_modules
from slim.core.build.kernel import download_deb, missing_closure, unpack_deb
from slim.core.build.smallpython import shared_libraries
from slim.errors import FailedPrecondition, InvalidArgument, NotFound

KEXEC_PACKAGE = "kexec-tools"
SHIM = ("shim-signed", "usr/lib/shim/shimx64.efi.signed")
GRUB_EFI = ("grub-efi-amd64-signed", "usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed")
GRUB_BIOS_DIR = Path("/usr/lib/grub/i386-pc")  # grub-pc-bin
GRUB_BIOS_MODULES = (
    "biosdisk", "iso9660", "part_msdos", "part_gpt", "fat", "ext2", "normal", "configfile", "linux",
    "search", "search_fs_file", "search_fs_uuid", "serial", "echo", "test", "gzio", "minicmd",
    "loopback", "all_video",
)  # fmt: skip
# the drivers a medium loads: common PC network cards (a name the kernel lacks is skipped)
NIC_MODULES = (
    "virtio_pci", "virtio_net", "e1000", "e1000e", "igb", "igc", "r8169", "tg3", "atlantic", "alx",
    "atl1c", "r8152", "cdc_ether", "ax88179_178a",
)  # fmt: skip
# ... and those its cache on a USB stick needs (ext4 on USB mass storage)
CACHE_MODULES = (
    "xhci_pci", "ehci_pci", "ohci_pci", "uhci_hcd", "usb_storage", "uas", "sd_mod", "ext4", "crc32c_generic",
)  # fmt: skip
CACHE_TOOLS = (Path("/usr/sbin/sfdisk"), Path("/usr/sbin/mke2fs"))  # fdisk, e2fsprogs: grow the cache
MKE2FS_CONF = Path("/etc/mke2fs.conf")
LINUX_FS_GPT_TYPE = "0fc63daf-8483-4772-8e79-3d69d8477de4"
SEED_BYTES = 4 << 20  # the cache partition in the image; the first boot from a stick grows it
ESP_SLACK = 1 << 20  # free space in the EFI system partition beyond its files
TOOL_TIMEOUT = 300.0
TOOLS = {"grub-mkimage": "grub-common", "xorriso": "xorriso", "mformat": "mtools", "mcopy": "mtools",
         "mmd": "mtools", "mke2fs": "e2fsprogs"}  # fmt: skip

MEDIUM_INIT = """#!/bin/sh
# SLIM boot medium: drivers, DHCP, then the medium's agent, which starts the release (kexec).
PATH=/bin:/usr/bin:/sbin:/usr/sbin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o mode=0755 tmpfs /run
say() {{
    for c in $(cat /sys/class/tty/console/active 2>/dev/null); do echo "$*" > "/dev/$c"; done
}}
say "slim: boot medium {medium} up"
if [ -f /etc/slim/modules ]; then
    while read -r m; do insmod "$m" 2>/dev/null; done < /etc/slim/modules
fi
ip link set lo up
net=""
for i in /sys/class/net/*; do
    n=${{i##*/}}
    [ "$n" = lo ] && continue
    ip link set "$n" up
    udhcpc -i "$n" -q -n -t 10 -s /etc/slim/udhcpc.sh >/dev/null 2>&1 && net=$n && break
done
if [ -z "$net" ]; then
    say "slim-medium: cannot boot: no network (no DHCP answer on any network interface)"
else
    env SLIM_INITRD=1 PYTHONPATH={root} /usr/bin/python3 -S -B -m slim.agent.medium --follow-endorsements
fi
say "slim-medium: this PC stays here: switch it off, fix what is said above, and start it again"
while :; do sleep 3600; done
"""

GRUB_CFG = """\
search --no-floppy --file --set=root /.disk/slim-medium-{medium}
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set default=0
set timeout={timeout}
menuentry "SLIM: {title}" {{
    linux /boot/vmlinuz slim.medium={medium} slim.grubroot=$root {args}
    initrd /boot/initrd
}}
"""


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise FailedPrecondition(f"{name} is not installed (apt-get install {TOOLS.get(name, name)})")
    return found


def _run(argv: list[str], env: dict[str, str] | None = None) -> None:
    try:
        done = subprocess.run(
            [_tool(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=TOOL_TIMEOUT,
            env={**os.environ, "LC_ALL": "C", **(env or {})}, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise FailedPrecondition(f"{argv[0]} did not finish within {TOOL_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        raise FailedPrecondition(f"{argv[0]} failed (exit {done.returncode}): {done.stderr.strip()[-1500:]}")


# --- Debian's parts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Parts:
    """The parts of a medium that come from Debian packages, unpacked (never installed)."""

    root: Path  # the packages' files, unpacked here
    kexec: Path
    shim: Path
    grub_efi: Path
    packages: tuple[str, ...]  # the .deb files they came from


def fetch_parts(cache_dir: Path) -> Parts:
    """Download (into ``cache_dir``/debs, once) and unpack (into ``cache_dir``/medium, once per
    set of package versions) kexec-tools with the libraries this machine lacks, shim-signed
    and grub-efi-amd64-signed."""
    debs_dir = cache_dir / "debs"
    packages = [*missing_closure([KEXEC_PACKAGE]), SHIM[0], GRUB_EFI[0]]
    debs = [download_deb(debs_dir, p) for p in dict.fromkeys(packages)]
    digest = hashlib.sha256("\n".join(sorted(d.name for d in debs)).encode()).hexdigest()[:16]
    root = cache_dir / "medium" / digest
    if not (root / ".complete").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root.parent))
        try:
            for deb in debs:
                unpack_deb(deb, staging)
            (staging / ".complete").write_text("\n".join(d.name for d in debs) + "\n")
            shutil.rmtree(root, ignore_errors=True)
            os.replace(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    parts = Parts(
        root=root,
        kexec=root / "sbin" / "kexec",
        shim=root / SHIM[1],
        grub_efi=root / GRUB_EFI[1],
        packages=tuple(d.name for d in debs),
    )
    for path, package in ((parts.kexec, KEXEC_PACKAGE), (parts.shim, SHIM[0]), (parts.grub_efi, GRUB_EFI[0])):
        if not path.is_file():
            raise FailedPrecondition(f"the {package} package has no {path.relative_to(root)}")
    return parts


def unpacked_libraries(binary: Path, root: Path) -> dict[str, Path]:
    """Where a binary unpacked under ``root`` finds its libraries, in the initrd → on this
    machine: this machine's, or those unpacked beside it.  A library found nowhere is an error."""
    lib_dirs = [
        str(p) for p in (root / "usr/lib", root / "lib") for p in [*p.glob("*-linux-gnu")] if p.is_dir()
    ]
    env = {"LD_LIBRARY_PATH": ":".join(lib_dirs)}
    out = subprocess.run(
        ["ldd", str(binary)], capture_output=True, text=True, env={**os.environ, **env}, check=False
    ).stdout
    missing = re.findall(r"^\s*(\S+) => not found", out, re.MULTILINE)
    if missing:
        raise FailedPrecondition(f"{binary.name} needs {', '.join(missing)}, found neither here nor unpacked")
    found: dict[str, Path] = {}
    for lib in shared_libraries(binary, env=env):
        if lib.is_relative_to(root):
            found["/" + str(lib.relative_to(root))] = lib.resolve()
        else:
            found[str(lib)] = lib.resolve()
    return found


# --- the initrd ---------------------------------------------------------------------------------


@dataclass
class MediumSpec:
    """What a medium holds besides the kernel (``slim media build``'s options)."""

    medium_id: str
    node: str  # "" for a generic medium
    relays: Sequence[str]
    token: str = ""
    title: str = ""  # the boot menu's entry
    kernel_args: str = (
        "console=ttyS0,115200 console=tty0"  # the medium kernel's (the last console gets init's output)
    )
    timeout: int = 0  # seconds the boot menu waits
    cache_uuid: str = ""  # its cache partition's filesystem UUID (default: from the medium's id)

    def __post_init__(self) -> None:
        if not MEDIUM_ID_RE.fullmatch(self.medium_id):
            raise InvalidArgument(f"{self.medium_id!r} is not a medium id (8 to 32 hex digits)")
        if not self.relays:
            raise InvalidArgument("a medium needs at least one relay URL")
        if not self.cache_uuid:
            seed = hashlib.sha256(f"slim-medium-cache:{self.medium_id}".encode()).digest()[:16]
            self.cache_uuid = str(uuid.UUID(bytes=seed, version=4))
        if self.token and not any(u.startswith("https://") for u in self.relays):
            raise InvalidArgument(
                "a medium with a token needs an https:// relay: the token never goes in clear"
            )

    def document(self) -> bytes:
        """``/etc/slim/medium.json`` (:class:`slim.agent.medium.Medium`)."""
        doc = {"id": self.medium_id, "node": self.node, "relays": list(self.relays), "cache": self.cache_uuid}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


@dataclass
class MediumInitrd:
    info: InitrdInfo
    modules: tuple[str, ...]  # loaded at boot
    skipped: tuple[str, ...] = field(default=())  # asked for, but not in the kernel


def write_initrd(
    out: Path,
    spec: MediumSpec,
    runtime: Runtime,
    parts: Parts,
    image_root: Path,
    kver: str,
    modules: Sequence[str] = NIC_MODULES + CACHE_MODULES,
    strict: bool = False,
) -> MediumInitrd:
    """The medium's initrd: the agent's runtime with the medium's /init, kexec, the kernel's
    ``modules`` (one the kernel lacks is skipped, or with ``strict`` an error), the medium's
    description and token."""
    modules_dir = resolve_in_image(image_root, f"/lib/modules/{kver}")
    usable, skipped = [], []
    for name in modules:
        try:
            resolve_modules(modules_dir, [name])
            usable.append(name)
        except NotFound:
            if strict:
                raise
            skipped.append(name)
    builder = InitrdBuilder()
    selection = builder.add_modules(image_root, kver, usable)
    add_runtime(builder, runtime, init=MEDIUM_INIT.format(medium=spec.medium_id, root="/lib/slim"))
    builder.add_file("sbin/kexec", parts.kexec, mode=0o755)
    for tool in CACHE_TOOLS:  # the cache partition's growth, from this machine
        if not tool.is_file():
            raise FailedPrecondition(f"{tool} is missing (apt-get install fdisk e2fsprogs)")
        builder.add_file(str(tool), tool)
        for lib in shared_libraries(tool):
            if str(lib) not in runtime.files:
                builder.add_file(str(lib), lib.resolve())
    if MKE2FS_CONF.is_file():
        builder.add_file(str(MKE2FS_CONF), MKE2FS_CONF)
    for dest, source in sorted(unpacked_libraries(parts.kexec, parts.root).items()):
        if dest not in runtime.files:
            builder.add_file(dest, source)
    builder.add_bytes("etc/slim/medium.json", spec.document())
    if spec.token:
        builder.add_bytes("etc/slim/node.token", spec.token.encode() + b"\n", mode=0o400)
    with open(out, "wb") as f:
        info = builder.write(f)
    return MediumInitrd(info, tuple(selection.names), tuple(skipped))


# --- the image ----------------------------------------------------------------------------------


def grub_cfg(spec: MediumSpec) -> str:
    title = re.sub(r"[^A-Za-z0-9 ._:-]", "", spec.title or (f"node {spec.node}" if spec.node else "home PC"))
    return GRUB_CFG.format(medium=spec.medium_id, timeout=spec.timeout, title=title, args=spec.kernel_args)


def write_iso(out: Path, spec: MediumSpec, kernel: Path, initrd: Path, parts: Parts, epoch: int = 0) -> int:
    """The hybrid image (ISO 9660 with El Torito for BIOS and UEFI, an MBR and GPT for USB
    sticks) at ``out``; its size.  ``epoch``: the time written into it (reproducible builds)."""
    boot_hybrid = GRUB_BIOS_DIR / "boot_hybrid.img"
    if not boot_hybrid.is_file():
        raise FailedPrecondition(f"{boot_hybrid} is missing (apt-get install grub-pc-bin)")
    env = {"SOURCE_DATE_EPOCH": str(epoch)}
    with tempfile.TemporaryDirectory(prefix="slim-medium-") as tmp_text:
        tmp = Path(tmp_text)
        tree = tmp / "tree"
        (tree / ".disk").mkdir(parents=True)
        (tree / ".disk" / "info").write_text("SLIM boot medium\n")
        (tree / ".disk" / f"slim-medium-{spec.medium_id}").write_text(spec.node + "\n")
        grub_dir = tree / "boot" / "grub"
        grub_dir.mkdir(parents=True)
        shutil.copyfile(kernel, tree / "boot" / "vmlinuz")
        shutil.copyfile(initrd, tree / "boot" / "initrd")
        (grub_dir / "grub.cfg").write_text(grub_cfg(spec))
        _run(["grub-mkimage", "-d", str(GRUB_BIOS_DIR), "-O", "i386-pc-eltorito", "-p", "/boot/grub",
              "-o", str(grub_dir / "bios.img"), *GRUB_BIOS_MODULES])  # fmt: skip
        esp = tmp / "efi.img"
        size = parts.shim.stat().st_size + parts.grub_efi.stat().st_size + ESP_SLACK
        with open(esp, "wb") as f:
            f.truncate(-(-size // (1 << 20)) << 20)  # whole MiB
        serial = spec.medium_id[:8]
        _run(["mformat", "-i", str(esp), "-N", serial, "-v", "SLIMESP", "::"], env)
        _run(["mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT"], env)
        _run(["mcopy", "-i", str(esp), str(parts.shim), "::/EFI/BOOT/BOOTX64.EFI"], env)
        _run(["mcopy", "-i", str(esp), str(parts.grub_efi), "::/EFI/BOOT/grubx64.efi"], env)
        for path in [*tree.rglob("*"), tree]:
            os.utime(path, (epoch, epoch), follow_symlinks=False)
        seed = tmp / "cache.img"  # the cache partition: found by its UUID, grown at the first boot
        with open(seed, "wb") as f:
            f.truncate(SEED_BYTES)
        extended = f"root_owner=0:0,hash_seed={spec.cache_uuid}"
        _run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", "SLIMCACHE",
              "-U", spec.cache_uuid, "-E", extended, str(seed)], env)  # fmt: skip
        iso = tmp / "out.iso"
        volset = f"SLIM-MEDIUM-{spec.medium_id}"  # how the medium's agent knows its own stick
        _run(["xorriso", "-as", "mkisofs", "-r", "-J", "-V", "SLIM_MEDIUM", "-volset", volset, "-o", str(iso),
              "--grub2-mbr", str(boot_hybrid), "-partition_offset", "16", "--mbr-force-bootable",
              "-append_partition", "2", "0xef", str(esp),
              "-append_partition", "3", LINUX_FS_GPT_TYPE, str(seed), "-appended_part_as_gpt", "-no-pad",
              "-iso_mbr_part_type", "a2a0d0ebe5b9334487c068b6b72699c7",
              "-c", "boot/boot.cat", "-b", "boot/grub/bios.img", "-no-emul-boot", "-boot-load-size", "4",
              "-boot-info-table", "--grub2-boot-info",
              "-eltorito-alt-boot", "-e", "--interval:appended_partition_2:all::", "-no-emul-boot",
              str(tree)], env)  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)  # not through a link someone left there
        shutil.move(iso, out)
    return out.stat().st_size


# -- a PC that already runs Linux: an entry in its own GRUB menu -----------------------------------
GRUB_ENTRY = """\
# SLIM boot medium {medium} (slim media grub-entry): this PC boots into SLIM from the medium's
# image, kept as a file on one of its own disks: {path} on its file system (with a separate /boot
# partition, /boot/slim/x.iso is /slim/x.iso there).  Add this to /etc/grub.d/40_custom and run
# update-grub; then pick "SLIM" at GRUB's menu, or once: grub-reboot slim-{medium} && reboot.
# It boots from RAM (no cache partition): everything is fetched at each boot.
menuentry "SLIM: {title}" --id slim-{medium} {{
    set isofile="{path}"
    search --no-floppy --file --set=root $isofile
    loopback slimiso $isofile
    linux (slimiso)/boot/vmlinuz {args}
    initrd (slimiso)/boot/initrd
}}
"""
_ENTRY_PATH_RE = re.compile(r"/[A-Za-z0-9._/-]{1,250}")
_LINUX_RE = re.compile(r"^\s*linux /boot/vmlinuz (.*)$", re.MULTILINE)
_TITLE_RE = re.compile(r'^menuentry "SLIM: ([^"]*)"', re.MULTILINE)


def grub_entry(iso: Path, path: str) -> str:
    """The GRUB menu entry that boots the medium image ``iso`` kept as the file ``path`` on a
    PC's disk (``loopback``, which Debian's signed GRUB has built in: Secure Boot still checks
    the kernel).  Its kernel arguments are the medium's own (its grub.cfg), with
    ``slim.grubroot=loop``: no cache partition to look for."""
    if not _ENTRY_PATH_RE.fullmatch(path) or "/../" in f"{path}/" or "//" in path:
        raise InvalidArgument(
            f"--path {path!r}: give the image's absolute path on its file system (/, a-z, 0-9, . _ -)"
        )
    with tempfile.TemporaryDirectory(prefix="slim-entry-") as tmp:
        cfg = Path(tmp) / "grub.cfg"
        try:
            _run(
                ["xorriso", "-indev", str(iso), "-osirrox", "on", "-extract", "/boot/grub/grub.cfg", str(cfg)]
            )
            text = cfg.read_text()
        except (FailedPrecondition, OSError) as exc:
            message = exc.message if isinstance(exc, FailedPrecondition) else str(exc)
            raise InvalidArgument(f"{iso} is not a SLIM boot medium (slim media build): {message}") from None
    medium = re.search(r"slim\.medium=([0-9a-f]{8,32})\b", text)
    linux, title = _LINUX_RE.search(text), _TITLE_RE.search(text)
    if medium is None or linux is None or title is None:
        raise InvalidArgument(f"{iso} is not a SLIM boot medium (its /boot/grub/grub.cfg has no SLIM entry)")
    args = linux.group(1).replace("slim.grubroot=$root", "slim.grubroot=loop")
    return GRUB_ENTRY.format(medium=medium.group(1), path=path, title=title.group(1), args=args)
