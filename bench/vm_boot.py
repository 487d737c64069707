"""P6 initrd and VM boot: initrd size, and how long a QEMU VM takes to boot into an EE.

    .venv/bin/python bench/vm_boot.py [--repeat 3] [--out docs/benchmarks]

The same chain as tests/test_vm_boot.py, on real `slim` processes: a Debian
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
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from slim.v1 import core_pb2 as pb
from slim.v1 import core_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
SLIM = [sys.executable, "-m", "slim.cli"]
MAC = "52:54:00:12:34:56"
MARKER = "SLIM-EE-MARKER"
TEST_INIT = f"""#!/bin/sh
mount -t proc proc /proc
echo "{MARKER} $(tr -d '\\n' < /run/slim/ee)"
sync
echo o > /proc/sysrq-trigger
"""
REGISTRY = """\
settings: {{nfs_server: 10.0.2.2, boot_menu_timeout: 0, heartbeat_interval: 1}}
sites:
  qemu: {{prefixes: [127.0.0.0/8, 10.0.2.0/24]}}
relays:
  r1: {{urls: ["http://10.0.2.2:{relay}/"], site: qemu}}
profiles:
  vm: {{modules: [virtio_pci, virtio_net], kernel_args: "console=ttyS0 panic=-1"}}
environments:
  vmtest:
    image: {image}
    default_policy: ram
    kernel_args: "slim.init=/usr/local/sbin/slim-test-init"
    directories:
      /usr: {{policy: nfs, options: "ro,nolock,noatime,proto=tcp,port={nfs},vers=4.1"}}
nodes:
  vm1: {{macs: ["{mac}"], profile: vm, environment: vmtest, site: qemu}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def line_of(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for _ in range(5):
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.split()[-1]
    raise SystemExit(f"a server did not start (wanted {prefix!r})")


def boot_once(qemu: str, relay_port: int, admin: Any) -> dict[str, Any]:
    start = time.time()
    proc = subprocess.Popen(
        [
            qemu, "-accel", "tcg", "-m", "1024", "-nographic", "-no-reboot", "-boot", "n",
            "-netdev", f"user,id=n0,bootfile=http://10.0.2.2:{relay_port}/boot/{MAC}.ipxe",
            "-device", f"virtio-net-pci,netdev=n0,mac={MAC}",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, errors="replace",
    )  # fmt: skip
    assert proc.stdout is not None
    kernel_at = marker_at = None
    active: dict[str, Any] = {}
    deadline = start + 300
    for line in proc.stdout:  # ends when QEMU exits (the EE powers the VM off)
        now = time.time()
        if kernel_at is None and "Linux version" in line:
            kernel_at = now
        m = re.search(rf"{MARKER} (\{{.*\}})", line)
        if m:
            marker_at, active = now, json.loads(m.group(1))
        if now > deadline:
            proc.kill()
            break
    proc.wait(timeout=30)
    if marker_at is None or kernel_at is None:
        raise SystemExit("the VM did not boot into the EE")
    events = list(admin.ListBootEvents(pb.ListBootEventsRequest(node="vm1"), timeout=5).events)
    events = sorted(
        (e for e in events if e.boot_id == active["boot_id"]), key=lambda e: e.time.ToNanoseconds()
    )
    t = {e.stage: e.time.ToNanoseconds() / 1e9 for e in events}
    return {
        "qemu_start_to_marker_s": round(marker_at - start, 2),
        "kernel_start_to_switch_root_s": round(t["switch_root"] - kernel_at, 2),
        "kernel_start_to_marker_s": round(marker_at - kernel_at, 2),
        "qemu_start_to_kernel_s": round(kernel_at - start, 2),
        "agent_stages_s": {e.stage: round(t[e.stage] - t["plan"], 2) for e in events},
        "agent_bytes": {e.stage: e.bytes for e in events if e.bytes},
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
    procs: list[subprocess.Popen[str]] = []
    try:
        image, store, registry, nfs_port = tmp / "image", tmp / "store", tmp / "registry.yaml", free_port()

        def write_registry(relay: int) -> None:
            registry.write_text(REGISTRY.format(relay=relay, image=image, nfs=nfs_port, mac=MAC))

        write_registry(9)
        run = {"check": True, "capture_output": True, "timeout": 900}
        subprocess.run([*SLIM, "ee", "import", "vmtest", "--from", "debootstrap:bookworm", "--add-kernel",
                        "--registry", str(registry)], **run)  # type: ignore[call-overload]  # fmt: skip
        init = image / "usr" / "local" / "sbin" / "slim-test-init"
        init.write_text(TEST_INIT)
        init.chmod(0o755)
        built = subprocess.run([*SLIM, "ee", "build", "vmtest", "--json", "--registry", str(registry),
                                "--store", str(store)], **run)  # type: ignore[call-overload]  # fmt: skip
        build = json.loads(built.stdout)[0]

        def start(*a: str) -> subprocess.Popen[str]:
            p = subprocess.Popen([*SLIM, *a], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(p)
            return p

        core = start("core", "serve", "--registry", str(registry), "--store", str(store),
                     "--state", str(tmp / "state.db"), "--listen", "127.0.0.1:0",
                     "--objects-listen", "127.0.0.1:0")  # fmt: skip
        core_addr, objects = line_of(core, "listening on"), line_of(core, "objects on")
        relay = start("relay", "serve", "--name", "r1", "--core", core_addr,
                      "--upstream", f"http://{objects}", "--cache-dir", str(tmp / "cache"),
                      "--max-bytes", "2G", "--listen", "127.0.0.1:0")  # fmt: skip
        relay_port = int(line_of(relay, "listening on").rsplit(":", 1)[1])
        write_registry(relay_port)
        core.send_signal(signal.SIGHUP)
        nfs = start("nfs", "serve", "--registry", str(registry), "--store", str(store),
                    "--listen", f"127.0.0.1:{nfs_port}", "--workdir", str(tmp / "nfs"))  # fmt: skip
        line_of(nfs, "listening on")
        channel = grpc.insecure_channel(core_addr)
        admin = pb_grpc.AdminStub(channel)
        for _ in range(300):  # until the core knows the relay and has heard from it (bounded: 30 s)
            relays = admin.ListRelays(pb.ListRelaysRequest(), timeout=5).relays
            if any(r.urls[0].endswith(f":{relay_port}/") and r.status == "live" for r in relays):
                break
            time.sleep(0.1)
        runs = []
        for i in range(args.repeat):
            r = boot_once(qemu, relay_port, admin)
            runs.append(r)
            print(f"boot {i + 1}: QEMU → marker {r['qemu_start_to_marker_s']} s, "
                  f"kernel → switch_root {r['kernel_start_to_switch_root_s']} s, "
                  f"kernel → marker {r['kernel_start_to_marker_s']} s", flush=True)  # fmt: skip
        channel.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    keys = ("qemu_start_to_marker_s", "kernel_start_to_switch_root_s", "kernel_start_to_marker_s")
    result = {
        "benchmark": "P6 initrd and VM boot",
        "command": "python bench/vm_boot.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "accel": "tcg (no KVM)",
        },
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
