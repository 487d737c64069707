"""Stand-in pieces for small lab images (slim/slurmlab.py, bench/): enough for
`slim ee build` to name a kernel and find the modules every initrd carries, in a
few bytes, where the lab never boots that kernel."""

from __future__ import annotations

from pathlib import Path

KVER = "6.1.0-standin"


def add_kernel(image: Path, label: str = "") -> None:
    """``/boot/vmlinuz-KVER``, ``/vmlinuz`` pointing to it, and ``/lib/modules/KVER`` whose
    modules.builtin lists what the initrd always wants (nfsv4, overlay)."""
    mods = image / "lib" / "modules" / KVER
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text("")
    (mods / "modules.builtin").write_text("kernel/fs/nfs/nfsv4.ko\nkernel/fs/overlayfs/overlay.ko\n")
    (image / "boot").mkdir()
    (image / "boot" / f"vmlinuz-{KVER}").write_bytes(f"stand-in kernel {label}".encode())
    (image / "vmlinuz").symlink_to(f"boot/vmlinuz-{KVER}")
