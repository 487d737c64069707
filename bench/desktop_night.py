"""A harvested desktop's night, measured on real parts, side by side in one run (issue 18).

    ./run bench desktop        # = PYTHONPATH=. .venv/bin/python bench/desktop_night.py (as root)

Two measurements, both with a QEMU (TCG) BIOS desktop whose own disk holds an OS that prints
a marker (labs/desktopdisk.py) and PXE first in its boot order (QEMU's iPXE ROM):

1. **What PXE first costs the owner by day** (``--runs`` each, QEMU user networking): seconds
   from power-on to the own OS's marker with the disk alone (no PXE: the baseline); with SLIM
   up (its menu, default local disk: ``sanboot``); with SLIM down but the site's DHCP up (no
   boot file: the firmware falls through to the disk); and with no DHCP answer at all.
2. **A window's start** (labs/desktoplab.py: `slim serve` in a namespace, the relay's magic
   packet on the bridge, the NIC's stand-in powering the VM on): seconds from the core seeing
   the window open to the magic packet at the desktop's NIC, to its power-on, and to the core
   saying it is ``up`` in the pool's EE — the pool is this one desktop, so that is "all the
   pool up".  The time to the first job is the Slurm lab's (docs/slurm.md).

Results: docs/benchmarks/desktop_night.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labs.desktopdisk import build_desktop_disk, marker_line
from labs.desktopvm import BootScripts, DesktopVM
from slim.core.build.kernel import download_kernel, install_kernel
from slim.core.control.bootscript import LOCAL, Menu, render_ipxe

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks" / "desktop_night.json"
MARKER = "BENCH-DESKTOP"
MAC = "52:54:00:de:5c:01"
BOOT = 240.0


def disk(work: Path) -> Path:
    image = work / "image"
    (image / "usr" / "lib").mkdir(parents=True)
    (image / "lib").symlink_to("usr/lib")
    cache = Path(os.environ.get("SLIM_CACHE_DIR", "/var/cache/slim")) / "kernel"
    kver = install_kernel(download_kernel(cache), image)
    return build_desktop_disk(
        work / "desktop.img", kernel=image / "boot" / f"vmlinuz-{kver}", marker=MARKER, work=work / "disk"
    )


def own_os(work: Path, image: Path, case: str, scripts: BootScripts) -> dict[str, float]:
    kw: dict[str, Any] = {"pxe": case != "disk only"}
    if case == "SLIM up (menu: local disk)":
        kw["bootfile"] = scripts.url("menu.ipxe")
    if case == "no DHCP answer":
        kw["dhcp"] = False
    with DesktopVM(image, mac=MAC, work=work, **kw) as vm:
        disk_at = vm.wait_for("SYSLINUX", BOOT)
        marker_at = vm.wait_for(marker_line(MARKER), BOOT)
        vm.wait_exit(60)
    return {"disk_reached_s": round(disk_at, 2), "marker_s": round(marker_at, 2)}


def fallback(work: Path, runs: int) -> dict[str, Any]:
    image = disk(work)
    menu = render_ipxe(Menu(node="pc01", mac=MAC, default=LOCAL, timeout=0, entries=(), relay_urls=()))
    cases = ["disk only", "SLIM up (menu: local disk)", "SLIM down (DHCP, no boot file)", "no DHCP answer"]
    out: dict[str, Any] = {}
    with BootScripts({"menu.ipxe": menu}) as scripts:
        for case in cases:
            got = [
                own_os(work / f"{case[:4]}{i}".replace(" ", "_"), image, case, scripts) for i in range(runs)
            ]
            out[case] = {
                "runs": got,
                "marker_median_s": statistics.median(g["marker_s"] for g in got),
                "disk_reached_median_s": statistics.median(g["disk_reached_s"] for g in got),
            }
            at, own = out[case]["disk_reached_median_s"], out[case]["marker_median_s"]
            print(f"{case:34s} disk at {at:6.1f} s, own OS at {own:6.1f} s (median of {runs})", flush=True)
    base = out["disk only"]["marker_median_s"]
    for case in cases[1:]:
        out[case]["added_s"] = round(out[case]["marker_median_s"] - base, 2)
    return out


def window(work: Path) -> dict[str, Any]:
    from labs.desktoplab import DesktopNight
    from labs.vmlab import MARKER as EE_MARKER

    work.mkdir(parents=True, exist_ok=True)
    with DesktopNight(work, "qemu-system-x86_64") as night:
        night.start()
        night.set_window(True)
        opened = time.monotonic()
        night.wait_woken(1, 60)
        woken = time.monotonic()
        vm = night.power_on("night")
        powered = time.monotonic()
        vm.wait_for(EE_MARKER, BOOT)
        night.wait(lambda p: p.desktops[0].state in ("idle", "job"), "the desktop up in the EE")
        up = time.monotonic()
        night.set_window(False)
        vm.wait_exit(BOOT)
        back = time.monotonic()
    result = {
        "magic_packet_at_nic_s": round(woken - opened, 2),
        "powered_on_s": round(powered - opened, 2),
        "up_in_the_ee_s": round(up - opened, 2),
        "window_closed_to_powered_off_s": round(back - up, 2),
    }
    print(
        "window open -> magic packet {magic_packet_at_nic_s} s, up in the EE {up_in_the_ee_s} s; "
        "closed -> powered off {window_closed_to_powered_off_s} s".format(**result)
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="boots per case of the by-day measurement")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/desktop_night.py needs root (network namespaces)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="slim-desktop-") as tmp:
        by_day = fallback(Path(tmp) / "day", args.runs)
        night = window(Path(tmp) / "night")
    doc = {
        "benchmark": "desktop_night",
        "command": "./run bench desktop",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "accel": "tcg"},
        "by_day": by_day,
        "window_start": night,
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
