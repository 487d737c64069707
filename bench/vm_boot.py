"""P6 initrd and VM boot: initrd size, and how long a QEMU VM takes to boot into an EE.

    PYTHONPATH=. .venv/bin/python bench/vm_boot.py [--repeat 3] [--out docs/benchmarks] \
        [--chains user,pxe,pxelinux]

The lab of tests/test_vm_boot.py (labs/vmlab.py), on real `slim` processes: a Debian
bookworm EE (debootstrap minbase, cached in /var/cache/slim) with / in RAM and
/usr over NFSv4 from nfs-ganesha.  Three boot chains, side by side in one run:

- ``user``: core, relay and `slim nfs serve` on 127.0.0.1; QEMU (TCG: this
  machine has no KVM) with its own iPXE ROM, told the relay's boot-script URL
  by QEMU's user-network DHCP;
- ``pxe``: the whole chain on our servers (`slim serve` in a network namespace,
  proxy-DHCP beside the site's DHCP server): UEFI firmware PXE, ipxe.efi over
  TFTP, the menu over HTTP;
- ``pxelinux``: the legacy path on the same network: a BIOS VM gets lpxelinux.0
  over TFTP, its pxelinux.cfg/01-<mac> from the relay, kernel and initrd over HTTP.

The serial console is read line by line and each line is timestamped as it
arrives, so the figures are:

- QEMU start → the EE's init printing its marker (whole boot, including
  iPXE's DHCP and the ~2 s "press Ctrl-B" pause);
- kernel start ("Linux version" on the console) → the agent's switch_root
  event (what the initrd and the agent cost), and → the marker;
- the agent's own stages from its boot events (plan, ram:/, mount:/usr, done).

Results go to docs/benchmarks/vm_boot.json.  Requires root, qemu-system-x86,
ipxe-qemu, ovmf, dnsmasq, pxelinux, nfs-ganesha, debootstrap (``./run setup`` installs them).
This is a benchmark, not a test: it asserts nothing beyond the boot working.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from labs.vmlab import Boot, Lab

ROOT = Path(__file__).resolve().parent.parent


def figures(boot: Boot) -> dict[str, Any]:
    t = {e.stage: e.time.ToNanoseconds() / 1e9 for e in boot.events}
    return {
        "qemu_start_to_marker_s": round(boot.marker_at - boot.qemu_started, 2),
        "kernel_start_to_switch_root_s": round(t["switch_root"] - boot.kernel_started, 2),
        "kernel_start_to_marker_s": round(boot.marker_at - boot.kernel_started, 2),
        "qemu_start_to_kernel_s": round(boot.kernel_started - boot.qemu_started, 2),
        "agent_stages_s": {s: round(t[s] - t["plan"], 2) for s in boot.agent_stages},
        "agent_bytes": {e.stage: e.bytes for e in boot.events if e.bytes and e.stage in boot.agent_stages},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    ap.add_argument("--chains", default="user,pxe,pxelinux", help="boot chains to measure (comma-separated)")
    args = ap.parse_args()
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise SystemExit("qemu-system-x86_64 is missing: ./run setup installs it")
    keys = ("qemu_start_to_marker_s", "kernel_start_to_switch_root_s", "kernel_start_to_marker_s")
    chains: dict[str, Any] = {}
    build: dict[str, Any] = {}
    for chain in args.chains.split(","):
        tmp = Path(tempfile.mkdtemp(prefix="slim-bench-vm-"))
        runs = []
        try:
            network: Literal["user", "pxe"] = "user" if chain == "user" else "pxe"
            with Lab(tmp, qemu=qemu, network=network, pxelinux=chain == "pxelinux") as lab:
                lab.start()
                build = lab.built
                for i in range(args.repeat):
                    boot = lab.boot()
                    r = figures(boot)
                    r["milestones_s"] = {
                        k: round(v - boot.qemu_started, 2) for k, v in boot.milestones.items()
                    }
                    runs.append(r)
                    print(f"{chain} boot {i + 1}: QEMU → marker {r['qemu_start_to_marker_s']} s, "
                          f"kernel → switch_root {r['kernel_start_to_switch_root_s']} s, "
                          f"kernel → marker {r['kernel_start_to_marker_s']} s", flush=True)  # fmt: skip
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        chains[chain] = {"medians": {k: statistics.median(r[k] for r in runs) for k in keys}, "runs": runs}
    result = {
        "benchmark": "P6 initrd and VM boot",
        "command": "python bench/vm_boot.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "accel": "tcg (no KVM)"},
        "initrd": build["initrd"],
        "copy_set": list(build["directories"]),
        "chains": chains,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vm_boot.json").write_text(json.dumps(result, indent=2) + "\n")
    for chain, c in chains.items():
        print(chain, json.dumps(c["medians"]))
    print("initrd", build["initrd"])


if __name__ == "__main__":
    main()
