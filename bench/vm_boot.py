"""P6 initrd and VM boot: initrd size, and how long a QEMU VM takes to boot into an EE.

    .venv/bin/python bench/vm_boot.py [--repeat 3] [--out docs/benchmarks]

The lab of tests/test_vm_boot.py (slim/vmlab.py), on real `slim` processes: a Debian
bookworm EE (debootstrap minbase, cached in /var/cache/slim) with / in RAM and
/usr over NFSv4 from nfs-ganesha; core (with its object server), relay and
`slim nfs serve` on 127.0.0.1; QEMU (TCG: this machine has no KVM) with its
own iPXE ROM boots through the relay.  The serial console is read line by
line and each line is timestamped as it arrives, so the figures are:

- QEMU start → the EE's init printing its marker (whole boot, including
  iPXE's DHCP and the ~2 s "press Ctrl-B" pause);
- kernel start ("Linux version" on the console) → the agent's switch_root
  event (what the initrd and the agent cost), and → the marker;
- the agent's own stages from its boot events (plan, ram:/, mount:/usr, done).

Results go to docs/benchmarks/vm_boot.json.  Requires root, qemu-system-x86,
ipxe-qemu, nfs-ganesha, debootstrap (``./run setup`` installs them).
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
from typing import Any

from slim.vmlab import Boot, Lab

ROOT = Path(__file__).resolve().parent.parent


def figures(boot: Boot) -> dict[str, Any]:
    t = {e.stage: e.time.ToNanoseconds() / 1e9 for e in boot.events}
    return {
        "qemu_start_to_marker_s": round(boot.marker_at - boot.qemu_started, 2),
        "kernel_start_to_switch_root_s": round(t["switch_root"] - boot.kernel_started, 2),
        "kernel_start_to_marker_s": round(boot.marker_at - boot.kernel_started, 2),
        "qemu_start_to_kernel_s": round(boot.kernel_started - boot.qemu_started, 2),
        "agent_stages_s": {e.stage: round(t[e.stage] - t["plan"], 2) for e in boot.events},
        "agent_bytes": {e.stage: e.bytes for e in boot.events if e.bytes},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = ap.parse_args()
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise SystemExit("qemu-system-x86_64 is missing: ./run setup installs it")
    tmp = Path(tempfile.mkdtemp(prefix="slim-bench-vm-"))
    runs = []
    try:
        with Lab(tmp, qemu=qemu) as lab:
            lab.start()
            build = lab.built
            for i in range(args.repeat):
                r = figures(lab.boot())
                runs.append(r)
                print(f"boot {i + 1}: QEMU → marker {r['qemu_start_to_marker_s']} s, "
                      f"kernel → switch_root {r['kernel_start_to_switch_root_s']} s, "
                      f"kernel → marker {r['kernel_start_to_marker_s']} s", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keys = ("qemu_start_to_marker_s", "kernel_start_to_switch_root_s", "kernel_start_to_marker_s")
    result = {
        "benchmark": "P6 initrd and VM boot",
        "command": "python bench/vm_boot.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "accel": "tcg (no KVM)"},
        "initrd": build["initrd"],
        "copy_set": list(build["directories"]),
        "medians": {k: statistics.median(r[k] for r in runs) for k in keys},
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vm_boot.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["medians"]), "initrd", build["initrd"])


if __name__ == "__main__":
    main()
