"""P2 with a real VM: a home PC boots from its USB stick over broadband through its ISP's relay.

    ./run bench p2-home   # = PYTHONPATH=. .venv/bin/python bench/home_boot.py [--rate R] [--delay-ms D]

labs/homelab.py: the centre, the ISP (a relay with its own nfs-ganesha) and the home in three
network namespaces; between the home and the ISP a link of ``--rate`` each way with
``--delay-ms`` each way (tbf and labs/wanlink.py's delayer; the round trip is checked with
ping).  A QEMU VM (TCG, UEFI, no PXE) boots the Debian environment the tests boot from the
image ``slim media build`` wrote, copied to a 256 MiB stick:

1. its first boot (nothing on the stick): firmware (QEMU's start) to ``up``, and the medium's
   first request to ``up``; payload bytes (what the boot's events say it fetched) and bytes on
   the wire toward the home (the ISP's tbf counter, IP headers included); the bound, bytes on
   the wire ÷ the link's rate; the paper's 3 min 40 s;
2. its second boot from the same stick (the cache: only the plan moves);
3. the run-time cost of NFS over the slow link: the environment's init times a workload that
   starts programs from ``/usr`` (apt-get, apt-cache, perl with modules, gpgv, dpkg: libraries
   of several MB; the image has no Python or Java), cold over NFS from the ISP's relay and again
   at once (page cache); then the same environment is built with ``/usr`` in RAM and booted
   (over the unshaped link: a RAM ``/usr`` is a 200 MB archive) and the same workload timed.

Writes docs/benchmarks/home_boot.json.  As root; about 15 minutes (the first run also
debootstraps the image into the cache).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from labs.homelab import HomeLab
from labs.vmlab import MARKER, SLIM, Boot
from slim.v1 import core_pb2 as pb
from slim.vocabulary import parse_rate

ROOT = Path(__file__).resolve().parent.parent
PAPER_WAN_S = 220.0  # 3 min 40 s
BENCH_INIT_PATH = "/usr/local/sbin/slim-bench-init"
WORKLOAD = (
    "apt-get --version; apt-cache --help; perl -MPOSIX -MGetopt::Long -MData::Dumper -e 1; "
    "gpgv --version; dpkg --version; dpkg-query --version"
)
# the environment's init: it says it is up first, then times the workload twice (cold, then from
# the page cache) by the kernel's clock, with the NFS client's counters of /usr (per-operation
# calls, bytes read) at each point, on the console; then powers off
STATS = (
    'awk \'/^device/{m=($0 ~ / on \\/usr /)} m && /^[ \\t]+[A-Z_]+: [0-9]/{sub(":","",$1); '
    'printf "%s=%s ", $1, $2} m && /bytes:/{printf "bytes=%s ", $6}\' /proc/self/mountstats'
)
BENCH_INIT = f"""#!/bin/sh
mount -t proc proc /proc
/run/slim/report "slim-bench-init up"
for run in 0 1 2; do
    [ $run = 0 ] || ( {WORKLOAD} ) >/dev/null 2>&1
    echo "slim-bench-init point $run $(cut -d' ' -f1 /proc/uptime) $({STATS})"
done
echo "{MARKER} $(tr -d '\\n' < /run/slim/ee)"
sync
echo o > /proc/sysrq-trigger
"""
_POINT_RE = re.compile(r"slim-bench-init point (\d) ([\d.]+) ?(.*)")


class BenchLab(HomeLab):
    """The home lab, booting the bench's init instead of the tests'."""

    def write_registry(self) -> None:
        super().write_registry()
        text = self.registry.read_text()
        self.registry.write_text(
            text.replace("slim.init=/usr/local/sbin/slim-test-init", f"slim.init={BENCH_INIT_PATH}")
        )

    def _write_inits(self) -> None:
        super()._write_inits()
        init = self.image / BENCH_INIT_PATH.lstrip("/")
        init.write_text(BENCH_INIT)
        init.chmod(0o755)

    def sent_to_home(self) -> int:
        """Bytes the ISP's side of the link has sent toward the home (its tbf's counter)."""
        out = subprocess.run(["ip", "netns", "exec", self.isp, "tc", "-s", "qdisc", "show", "dev", "wan0"],
                             capture_output=True, text=True, check=True, timeout=30).stdout  # fmt: skip
        found = re.search(r"Sent (\d+) bytes", out)
        return int(found.group(1)) if found else 0

    def reload_core(self, usr_policy: int, seconds: float = 30.0) -> None:
        """The core reads its registry again (SIGHUP, as an administrator would); returns once
        it plans ``/usr`` with ``usr_policy`` (bounded)."""
        assert self._client is not None
        self._served[0].send_signal(signal.SIGHUP)
        request = pb.GetEnvironmentRequest(name="vmtest")
        for _ in range(int(seconds / 0.2)):
            env = self._client.call(self.admin.GetEnvironment, request)
            if any(d.path == "/usr" and d.policy == usr_policy for d in env.directories):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the core did not take the new registry within {seconds} s")


def workload(boot: Boot) -> dict[str, Any]:
    """The workload's times (cold, warm) and what the NFS client did for each (calls of each
    operation, bytes read), from the environment's console."""
    points: dict[int, tuple[float, dict[str, int]]] = {}
    for line in boot.console.splitlines():
        found = _POINT_RE.search(line)
        if found is not None:
            counters = dict(kv.split("=", 1) for kv in found.group(3).split() if "=" in kv)
            points[int(found.group(1))] = (float(found.group(2)), {k: int(v) for k, v in counters.items()})
    if sorted(points) != [0, 1, 2]:
        raise RuntimeError(f"the environment's console shows no workload:\n{boot.console[-2000:]}")
    out: dict[str, Any] = {}
    for name, (a, b) in (("cold", (0, 1)), ("warm", (1, 2))):
        (t0, c0), (t1, c1) = points[a], points[b]
        delta = {k: c1[k] - c0.get(k, 0) for k in c1 if c1[k] - c0.get(k, 0) > 0}
        out[f"{name}_s"] = round(t1 - t0, 2)
        out[f"{name}_nfs_bytes"] = delta.pop("bytes", 0)
        out[f"{name}_nfs_calls"] = dict(sorted(delta.items(), key=lambda kv: -kv[1]))
    return out


def measured(lab: BenchLab, boot: Boot, sent: int, rate_bps: float) -> dict[str, Any]:
    assert boot.status is not None and boot.status.state == "up", boot.status
    work = workload(boot)
    by_stage = {e.stage: e for e in boot.events}
    up = by_stage["up"].time.ToNanoseconds() / 1e9
    first = min(e.time.ToNanoseconds() for e in boot.events) / 1e9  # the medium's first request
    payload = sum(by_stage[s].bytes for s in ("medium", "medium:kernel", "medium:initrd", "done"))
    return {
        "firmware_to_up_s": round(up - boot.qemu_started, 1),
        "medium_to_up_s": round(up - first, 1),
        "kernel_started_s": round(boot.kernel_started - boot.qemu_started, 1),
        "payload_bytes": payload,
        "wire_bytes_to_home": sent,
        "bound_s": round((sent - work["cold_nfs_bytes"] - work["warm_nfs_bytes"]) * 8 / rate_bps, 1),
        "mounted": by_stage["mount:/usr"].message.split(" read-only")[0] if "mount:/usr" in by_stage else "",
        "workload": work,
        # what crossed the link up to "up": all of it, less what the workload read over NFS after
        "wire_bytes_to_up": sent - work["cold_nfs_bytes"] - work["warm_nfs_bytes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", default="3mbit", help="the broadband's rate each way (tc's spelling)")
    ap.add_argument("--delay-ms", type=float, default=20.0, help="its one-way delay")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    ap.add_argument("--keep", action="store_true", help="keep the lab's directory (its logs)")
    args = ap.parse_args()
    rate_bps = parse_rate(args.rate)
    tmp = Path(tempfile.mkdtemp(prefix="slim-home-bench-"))
    results: dict[str, Any] = {
        "benchmark": "P2 home PC over broadband, real VM (bench/home_boot.py)",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()}, QEMU TCG (no KVM)",
        "link": {"rate": args.rate, "one_way_delay_ms": args.delay_ms},
        "paper_s": PAPER_WAN_S,
        "workload": WORKLOAD,
    }
    try:
        lab = BenchLab(tmp, rate=args.rate, delay_ms=args.delay_ms)
        lab.up_timeout = 600  # the workload runs after "up", before the VM powers off
        with lab:
            lab.start()
            results["rtt_ms"] = lab.ping()
            token = tmp / "vm1.token"
            subprocess.run([*SLIM, "node", "enroll", "vm1", "--out", str(token), "--core", lab.core],
                           check=True, capture_output=True, timeout=60)  # fmt: skip
            medium = tmp / "vm1.iso"
            lab.slim("media", "build", str(medium), "--node", "vm1", "--token-file", str(token),
                     "--registry", str(lab.registry), "--keys", str(lab.keys), "--ca", str(tmp / "ca"),
                     "--console", "serial")  # fmt: skip
            lab.wait_relay_nfs()
            stick = tmp / "stick.img"
            shutil.copyfile(medium, stick)
            with open(stick, "r+b") as f:
                f.truncate(256 << 20)
            boots = []
            for name in ("first boot, nothing on the stick", "second boot, from the stick's cache"):
                before = lab.sent_to_home()
                boot = lab.boot(medium=stick, usb=True)
                row = {"boot": name, **measured(lab, boot, lab.sent_to_home() - before, rate_bps)}
                print(json.dumps(row), flush=True)
                boots.append(row)
            results["boots"] = boots
            # /usr in RAM: the same workload without NFS (the link unshaped for this boot)
            assert lab.wan is not None
            lab.wan.set_rate(None)
            text = lab.registry.read_text()
            lab.registry.write_text(
                re.sub(r"/usr: \{policy: nfs, options: \"[^\"]*\"\}", "/usr: {policy: ram}", text)
            )
            lab.build()
            lab.reload_core(pb.POLICY_RAM)
            boot = lab.boot(medium=stick, usb=True)
            assert boot.status is not None and boot.status.state == "up", boot.status
            results["usr_in_ram"] = {"workload": workload(boot)}
            print(json.dumps(results["usr_in_ram"]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "home_boot.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out / 'home_boot.json'}")


if __name__ == "__main__":
    main()
