"""P4 copy-if-needed against rsync: the same 10,000-file tree, the same run.

    PYTHONPATH=. .venv/bin/python bench/sync_vs_rsync.py [--files 10000] [--repeat 3] [--out docs/benchmarks]

One tree (10,000 files of 1-32 KiB, a few larger) is an environment whose
directories all use the ``sync`` policy (copy-if-needed).  It is built and
served by `slim serve` (core and relay on loopback); the agent (no-reboot mode)
keeps a copy of it up to date.  Beside it, an rsync daemon on loopback serves
the same tree and ``rsync -a`` keeps a second copy up to date.  Three
situations, each measured for both:

- **cold**: an empty target (the first copy);
- **unchanged**: nothing changed since the last run (time; bytes on the wire);
- **1 % changed**: 100 files rewritten in place, same sizes (bytes on the
  wire; time).  For SLIM this includes the rebuild of the release
  (``slim ee build``), reported apart: the server's work, done once for every
  node, against rsync's per-client work.

Bytes on the wire are payload bytes: for SLIM the relay's object bytes sent
(manifest and changed objects) plus the plan; for rsync its ``--stats`` "Total
bytes received" (file list, checksums and data).  Results go to
docs/benchmarks/sync_vs_rsync.json.  Needs rsync (``./run bench`` installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from labs import standin
from labs.host import free_port
from slim.allinone import await_ready
from slim.core.build.release import build_environment
from slim.core.registry import load_registry
from slim.core.store import Store
from slim.signing import SigningKey

ROOT = Path(__file__).resolve().parent.parent
SLIM = [sys.executable, "-m", "slim.cli"]
REGISTRY = """\
settings: {{heartbeat_interval: 1}}
sites:
  lo: {{prefixes: [127.0.0.0/8]}}
relays:
  r1: {{urls: ["http://127.0.0.1:{relay}/"], site: lo}}
profiles:
  p: {{}}
environments:
  tree: {{image: {image}, default_policy: sync}}
nodes:
  n1: {{macs: ["52:54:00:44:00:01"], profile: p, environment: tree, site: lo, disk: /dev/sda1}}
server:
  state_dir: {tmp}/state
  core_listen: unix:{tmp}/core.sock
  relay_listen: 127.0.0.1:{relay}
  tftp_listen: null
  nfs_listen: null
  dhcp: false
"""


def make_tree(image: Path, files: int, rng: random.Random) -> list[Path]:
    """``files`` files in 100 directories, and the kernel files a build wants."""
    out = []
    for i in range(files):
        d = image / "srv" / f"d{i % 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        size = rng.randint(1024, 32 * 1024) if i % 500 else 2 << 20
        path = d / f"f{i:05d}.dat"
        path.write_bytes(rng.randbytes(size))
        out.append(path)
    standin.add_kernel(image)
    return out


def relay_sent(relay: str) -> float:
    with urllib.request.urlopen(f"{relay}/metrics", timeout=10) as r:  # noqa: S310 - our relay on loopback
        text = r.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "slim_relay_sent_bytes_total")  # fmt: skip


def agent(target: Path, relay: str, trust: Path) -> tuple[float, int]:
    """(seconds, bytes): one copy-if-needed run of the agent (``trust``: the core's public key)."""
    before = relay_sent(relay)
    started = time.monotonic()
    argv = [sys.executable, "-m", "slim.agent", "--no-reboot", "--target", str(target),
            "--node", "n1", "--relay", relay, "--trust", str(trust)]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, timeout=1800)
    return time.monotonic() - started, int(relay_sent(relay) - before)


def rsync(port: int, target: Path) -> tuple[float, int]:
    started = time.monotonic()
    proc = subprocess.run(
        ["rsync", "-a", "--delete", "--stats", f"rsync://127.0.0.1:{port}/tree/", f"{target}/"],
        check=True, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    took = time.monotonic() - started
    m = re.search(r"Total bytes received: ([\d,.]+)", proc.stdout)
    assert m, proc.stdout
    return took, int(re.sub(r"[,.]", "", m.group(1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = ap.parse_args()
    if shutil.which("rsync") is None:
        raise SystemExit("rsync is missing: ./run bench installs it")
    tmp = Path(tempfile.mkdtemp(prefix="slim-bench-p4-"))
    rng = random.Random(4)
    procs: list[subprocess.Popen[bytes]] = []
    rows: dict[str, list[dict[str, float]]] = {"cold": [], "unchanged": [], "changed_1pct": []}
    try:
        image = tmp / "image"
        files = make_tree(image, args.files, rng)
        tree_bytes = sum(f.stat().st_size for f in files)
        port, relay_port = free_port(), free_port()
        relay = f"http://127.0.0.1:{relay_port}"
        registry = tmp / "registry.yaml"
        registry.write_text(REGISTRY.format(image=image, tmp=tmp, relay=relay_port))
        store = Store(tmp / "state" / "store")
        build_environment(
            load_registry(registry), store, "tree", signer=SigningKey.load_or_create(tmp / "state" / "keys")
        )
        serve = subprocess.Popen([*SLIM, "serve", "--registry", str(registry)], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        procs.append(serve)
        assert serve.stdout is not None
        await_ready(serve.stdout, tmp / "state" / "logs")
        (tmp / "rsyncd.conf").write_text(
            f"pid file = {tmp}/rsyncd.pid\nuse chroot = no\n[tree]\npath = {image}\nread only = yes\n"
        )
        procs.append(subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={tmp}/rsyncd.conf",
                                       f"--port={port}", "--address=127.0.0.1"]))  # fmt: skip
        time.sleep(
            0.5
        )  # not synchronization of results: rsync has no ready signal; a failed start fails below
        for i in range(args.repeat):
            slim_t, rsync_t = tmp / f"slim{i}", tmp / f"rsync{i}"
            for name in ("cold", "unchanged"):
                s = agent(slim_t, relay, tmp / "state" / "keys" / "signing.pub")
                r = rsync(port, rsync_t)
                rows[name].append({"slim_s": s[0], "slim_bytes": s[1], "rsync_s": r[0], "rsync_bytes": r[1]})
            for f in rng.sample(files, len(files) // 100):  # 1 %: rewritten in place, same size
                f.write_bytes(rng.randbytes(f.stat().st_size))
            started = time.monotonic()
            build_environment(
                load_registry(registry),
                store,
                "tree",
                signer=SigningKey.load_or_create(tmp / "state" / "keys"),
            )
            build_s = time.monotonic() - started
            s = agent(slim_t, relay, tmp / "state" / "keys" / "signing.pub")
            r = rsync(port, rsync_t)
            rows["changed_1pct"].append({"slim_s": s[0], "slim_bytes": s[1], "rsync_s": r[0],
                                         "rsync_bytes": r[1], "slim_build_s": build_s})  # fmt: skip
            print(f"round {i + 1}: " + ", ".join(
                f"{k}: slim {v[-1]['slim_s']:.2f} s/{v[-1]['slim_bytes']} B, rsync {v[-1]['rsync_s']:.2f} s/"
                f"{v[-1]['rsync_bytes']} B" for k, v in rows.items()), flush=True)  # fmt: skip
            shutil.rmtree(slim_t)
            shutil.rmtree(rsync_t)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
        for p in procs:
            if p.stdout is not None:
                p.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)
    medians: dict[str, Any] = {
        k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()
    }
    result = {
        "benchmark": "P4 copy-if-needed vs rsync",
        "command": "python bench/sync_vs_rsync.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "tree": {"files": args.files, "bytes": tree_bytes},
        "medians": medians,
        "runs": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sync_vs_rsync.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "sync_vs_rsync.png")
    print(json.dumps(medians, indent=1))


def plot(result: dict[str, Any], path: Path) -> None:
    """Time and bytes, SLIM beside rsync, for each situation (medians)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = result["medians"]
    cases = [("cold", "cold"), ("unchanged", "unchanged"), ("changed_1pct", "1 % changed")]
    fig, (t_ax, b_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = range(len(cases))
    for ax, key, unit, scale in ((t_ax, "s", "seconds", 1.0), (b_ax, "bytes", "MB on the wire", 1e6)):
        ax.bar([x - 0.2 for x in xs], [med[c][f"slim_{key}"] / scale for c, _ in cases], 0.4, label="SLIM")
        ax.bar(
            [x + 0.2 for x in xs], [med[c][f"rsync_{key}"] / scale for c, _ in cases], 0.4, label="rsync -a"
        )
        ax.set_xticks(list(xs), [label for _, label in cases])
        ax.set_ylabel(unit)
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(f"Copy-if-needed against rsync, {result['tree']['files']:,} files (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
