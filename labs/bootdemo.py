"""The boot demo (``./run demo``, ``python -m labs.bootdemo``): an EE built, `slim serve`
started, a VM network-booted into the EE.

The whole chain runs on this machine, on our own servers (labs/vmlab.py, the
``pxe`` lab): a Debian bookworm EE is imported with debootstrap (cached) and
built; a network namespace with a bridge gets `slim serve` (core, relay with
TFTP, nfs-ganesha, dnsmasq as proxy-DHCP) and a plain dnsmasq playing the
site's DHCP server; a QEMU VM with UEFI firmware joins the bridge on a tap
device, PXE-boots (ipxe.efi over TFTP, the menu over HTTP), runs the agent in
its initrd and switch_roots into the EE, whose systemd reports it up.  Then the
boot's timeline as the product tells it: ``slim node timeline vm1`` (the relays'
records of stage 1, script, kernel and initrd, the agent's stages, the EE's own
report), optionally drawn (``--plot FILE.png``).

Needs root (namespaces, tap), QEMU, OVMF, nfs-ganesha, dnsmasq, debootstrap:
``./run demo`` installs them.  Everything is removed at the end unless
``--keep``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from labs.vmlab import Boot, Lab
from slim import timeline


def run(
    workdir: Path | None = None,
    keep: bool = False,
    say: Callable[[str], None] = print,
    plot: Path | None = None,
) -> Boot:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="slim-demo-", dir=workdir))
    started = time.monotonic()
    try:
        with Lab(tmp, network="pxe", init="systemd") as lab:
            say("1/3 Building the demo EE (Debian bookworm with systemd; the first run downloads it) ...")
            lab.start()
            say(f"    built in {time.monotonic() - started:.0f} s; slim serve says:")
            for line in lab.said:
                say(f"      {line}")
            say("2/3 Booting a QEMU VM (UEFI PXE, TCG) on the lab's bridge, until its EE reports up ...")
            boot = lab.boot()
            say(f"3/3 The VM runs {boot.active['environment']} (release {boot.active['release'][:19]}...); "
                "slim node timeline vm1 says:")  # fmt: skip
            args = ["node", "timeline", "vm1", "--core", lab.core]
            if plot is not None:
                args += ["--plot", str(plot.resolve())]
            for line in lab.slim(*args).splitlines():
                say(f"      {line}")
            t = timeline.build("vm1", boot.events, boot.status)
            say(
                f"    the firmware ran {t.power_on - boot.qemu_started:.1f} s from QEMU's start before the "
                f"first request; power-on to up: {t.total:.1f} s"
                + (f"; everything is in {tmp}" if keep else "")
            )
            return boot
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    from slim.cli.common import errors_to_exit, fail

    ap = argparse.ArgumentParser(prog="python -m labs.bootdemo", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workdir", type=Path, default=None,
        help="where the demo's temporary directory goes (default: the system's temporary directory)",
    )  # fmt: skip
    ap.add_argument(
        "--keep", action="store_true", help="keep the demo's directory (EE, store, logs, console)"
    )
    ap.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="also draw the boot's timeline into FILE.png",
    )
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        fail("the boot demo needs root (network namespaces, a tap device); try: sudo ./run demo")
    with errors_to_exit():
        run(args.workdir, args.keep, plot=args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
