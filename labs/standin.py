"""Stand-in pieces for small lab images (labs/slurmlab.py, bench/): enough for
`slim ee build` to name a kernel and find the modules every initrd carries, in a
few bytes, where the lab never boots that kernel."""

from __future__ import annotations

import os
from pathlib import Path

KVER = "6.1.0-standin"


def add_kernel(image: Path, label: str = "", size: int = 0, directory: str = "boot") -> None:
    """``/DIRECTORY/vmlinuz-KVER``, ``/vmlinuz`` pointing to it, and ``/lib/modules/KVER`` whose
    modules.builtin lists what the initrd always wants (nfsv4, overlay).  ``size``: pad the
    kernel with random bytes to this size (what a benchmark's nodes fetch; a kernel does
    not compress); ``directory``: where it lives (a benchmark keeps it out of the copy set)."""
    mods = image / "lib" / "modules" / KVER
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text("")
    (mods / "modules.builtin").write_text("kernel/fs/nfs/nfsv4.ko\nkernel/fs/overlayfs/overlay.ko\n")
    (image / directory).mkdir(parents=True, exist_ok=True)
    head = f"stand-in kernel {label}".encode()
    (image / directory / f"vmlinuz-{KVER}").write_bytes(head + os.urandom(max(0, size - len(head))))
    (image / "vmlinuz").symlink_to(f"{directory}/vmlinuz-{KVER}")
    add_init(image)


def add_init(image: Path) -> None:
    """An executable ``/sbin/init`` (a build refuses an image without one); never run:
    the labs' nodes boot in no-reboot mode."""
    init = image / "sbin" / "init"
    if not init.exists():
        init.parent.mkdir(parents=True, exist_ok=True)
        init.write_text("#!/bin/sh\n# a stand-in init: the labs never run it\nexec sleep infinity\n")
        init.chmod(0o755)
