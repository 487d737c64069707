"""P4 copy-if-needed against rsync: the same trees, the same run, at 10,000 and 100,000 files.

    ./run bench p4     # = PYTHONPATH=. .venv/bin/python bench/sync_vs_rsync.py [--files 10000,100000]
                       #   [--repeat 4] [--big-mib 1024] [--out docs/benchmarks]   (as root)

For each size, one tree (files of 1-32 KiB, one in 500 of 2 MiB, a symlink per 100 files,
an extended attribute on one file in 200) is an environment whose directories all use the
``sync`` policy (copy-if-needed), built and served by ``slim serve`` (core and relay on
loopback); the agent keeps a copy up to date, run as a node runs it: the initrd's own
runtime (its Python, linked from Debian's, its standard library as one zip of bytecode,
the agent's bytecode; no OpenSSL, so files are hashed by Python's own SHA-256), unpacked
and chrooted into, started as the initrd's /init starts it (``python3 -S -B -m
slim.agent``), in no-reboot mode with its copy inside the chroot.  Beside it an rsync
daemon on loopback serves the same tree and ``rsync -aX --delete`` keeps a second copy
(``-X``: without it rsync does not copy the extended attributes, and the copies would
differ).  Whole processes are timed on both sides; each round runs them in turn, the first
of each pair alternating from round to round (4 rounds by default: each tool first in two of
them); before each cold copy what the last run wrote is synced and the page cache dropped
(:func:`settle_memory`); medians of ``--repeat`` rounds.
Three situations:

- **cold**: an empty target (the first copy);
- **unchanged**: nothing changed since the last run;
- **1 % changed**: 1 % of the files rewritten in place, same sizes.  For SLIM the rebuild
  of the release (``slim ee build``) and the relay's prefetch of it (``slim relay
  prefetch``, which a Slurm prolog or an administrator runs before nodes boot) are
  reported apart: the server's work, done once for every node, against rsync's
  per-client work.

Each round, each tool's copy is made on a file system of its own, new that round: a sparse
file given an ext2 file system by ``mke2fs``, as the agent gives a node's blank partition,
and mounted through a loop device; the copy is a directory in it (as the agent's is on a
node) and the file system goes at the end of the round.  Not in a directory of this
machine's disk: there, every round would create its 100,000 files seconds after the round
before deleted its 200,000, and an ext4 file system without a journal, as this machine's
is, will not reuse an inode freed in the last minute: each file created looks through the
block group's recently freed inodes first (``recently_deleted`` in the kernel's profile).
That took half or more of a cold copy's time, and more of one tool's than the other's from
one round to the next; a node's first copy goes to a partition just made, or to a
directory that has been empty for a boot at least.

Before each cold copy the files its server will read (the relay's archive, rsync's tree)
are read through, so that both come from memory: by the 100,000-file rounds this
machine's page cache is full, and an archive fetched into the relay's cache a round
before was found partly evicted, while rsync's tree, read every round, was not.

After every run both copies are compared with the tree (contents, types, modes, owners,
mtimes, link targets, extended attributes): a difference stops the benchmark.

Then **a big file changed in its middle** (``--big-mib``, default 1 GiB; 0 skips it): one
file of random bytes, copied cold by both, then 1 MiB inserted near its middle (12,345
bytes past it: on no boundary of fixed pieces or blocks); bytes moved
by each, and the result checked by its SHA-256.

Bytes on the wire are payload bytes: for SLIM the relay's object bytes sent (manifests or
their deltas, files); for rsync its ``--stats`` "Total bytes received".  SLIM's agent says
where its time went in its ``sync:`` event (manifest, decode, look, compare, change, keep);
the medians of those are in the results too, with the interpreter's start-up and imports
measured alone.  Results: docs/benchmarks/sync_vs_rsync.json (and .png).
"""

from __future__ import annotations

import argparse
import hashlib
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

from labs import initrdroot, standin
from labs.host import free_port, warm_page_cache
from slim.agent.tree import FILE, scan
from slim.allinone import await_ready
from slim.core.build.agentrt import add_runtime, collect
from slim.core.build.image import default_cache_dir
from slim.core.build.initrd import CpioArchive
from slim.core.build.release import build_environment
from slim.core.registry import load_registry
from slim.core.store import Store
from slim.signing import PublicKey, SigningKey

ROOT = Path(__file__).resolve().parent.parent
SLIM = [sys.executable, "-m", "slim.cli"]
KEYS = "/etc/slim/keys"  # the keys the runtime trusts (the core's)
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
  big: {{image: {big}, default_policy: sync}}
nodes:
  n1: {{macs: ["52:54:00:44:00:01"], profile: p, environment: tree, site: lo, disk: /dev/sda1}}
  n2: {{macs: ["52:54:00:44:00:02"], profile: p, environment: big, site: lo, disk: /dev/sda1}}
server:
  state_dir: {tmp}/state
  core_listen: unix:{tmp}/core.sock
  relay_listen: 127.0.0.1:{relay}
  tftp_listen: null
  nfs_listen: null
  dhcp: false
"""
PHASES = ("unpack", "manifest", "decode", "look", "compare", "change", "keep")


def make_tree(image: Path, files: int, rng: random.Random) -> list[Path]:
    """``files`` files in 100 directories (symlinks and xattrs among them), and the kernel
    files a build wants."""
    out = []
    for i in range(files):
        d = image / "srv" / f"d{i % 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        size = rng.randint(1024, 32 * 1024) if i % 500 else 2 << 20
        path = d / f"f{i:06d}.dat"
        path.write_bytes(rng.randbytes(size))
        if i % 200 == 7:
            os.setxattr(path, "user.slim.bench", f"{i}".encode())
        if i % 100 == 3:
            (d / f"l{i:06d}").symlink_to(path.name)
        out.append(path)
    standin.add_kernel(image)
    return out


class Side:
    """One copy kept up to date by one tool; what each run took."""

    def __init__(self, name: str, target: Path) -> None:
        self.name = name
        self.target = target


def relay_metric(relay: str, name: str) -> float:
    with urllib.request.urlopen(f"{relay}/metrics", timeout=10) as r:  # noqa: S310 - our relay on loopback
        text = r.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def relay_sent(relay: str) -> float:
    return relay_metric(relay, "slim_relay_sent_bytes_total")


class Runtime:
    """The initrd's runtime (as ``slim ee build`` collects it, trusting ``trust``), unpacked
    at ``root``: the agent runs chrooted into it, its copies inside it."""

    def __init__(self, root: Path, trust: Path) -> None:
        rt = collect(build_cache=default_cache_dir())
        if rt.warnings:
            raise SystemExit(f"the initrd's runtime: {rt.warnings}")
        rt.trust([PublicKey.from_text(trust.read_text())])
        archive = CpioArchive()
        add_runtime(archive, rt)
        self.root = initrdroot.unpack(archive, root)

    def argv(self, *args: str) -> list[str]:
        return initrdroot.python(self.root, *args)


def agent(rt: Runtime, node: str, target: Path, relay: str) -> tuple[float, int]:
    """(seconds, bytes): one copy-if-needed run of the agent, chrooted into ``rt`` (``target``
    is inside it)."""
    before = relay_sent(relay)
    inside = "/" + str(target.relative_to(rt.root))
    argv = rt.argv("-m", "slim.agent", "--no-reboot", "--target", inside, "--node", node, "--relay", relay,
                   "--trust", KEYS)  # fmt: skip
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, timeout=3600, env=initrdroot.ENV)
    return time.monotonic() - started, int(relay_sent(relay) - before)


def rsync(port: int, module: str, target: Path) -> tuple[float, int]:
    started = time.monotonic()
    proc = subprocess.run(
        ["rsync", "-aX", "--delete", "--stats", f"rsync://127.0.0.1:{port}/{module}/", f"{target}/"],
        check=True, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    took = time.monotonic() - started
    m = re.search(r"Total bytes received: ([\d,.]+)", proc.stdout)
    assert m, proc.stdout
    return took, int(re.sub(r"[,.]", "", m.group(1)))


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """What both copies must end with: types, contents (SHA-256), modes, owners, mtimes,
    link targets, extended attributes."""
    out = {}
    for e in scan(root):
        digest = ""
        if e.kind == FILE:
            with open(root / e.path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        out[e.path] = (e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.target, e.xattrs, digest)
    return out


def same_as(image: Path, *copies: Path) -> None:
    want = snapshot(image)
    for c in copies:
        got = snapshot(c)
        if got != want:
            diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
            raise SystemExit(f"{c} differs from {image} at {len(diff)} entries, e.g. {diff[:5]}")


def sync_phases(tmp: Path, node: str) -> dict[str, float]:
    """The agent's own account of its last sync (seconds by phase), from its boot event."""
    argv = [*SLIM, "node", "events", node, "--json", "--limit", "20", "--core", f"unix:{tmp}/core.sock"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout
    event = next(e for e in json.loads(out)["events"] if str(e.get("stage", "")).startswith("sync:"))
    return {
        p: int(ms) / 1000 for p, ms in re.findall(r"(\w+) (\d+) ms", event.get("message", "")) if p in PHASES
    }


def startup(rt: Runtime) -> dict[str, float]:
    """The interpreter alone, and with the agent's imports (chrooted into the initrd's
    runtime, as the initrd starts it; medians of 5)."""

    def timed(*argv: str) -> float:
        runs = []
        for _ in range(5):
            t = time.monotonic()
            subprocess.run(rt.argv(*argv), check=True, env=initrdroot.ENV, timeout=60)
            runs.append(time.monotonic() - t)
        return statistics.median(runs)

    return {"interpreter_s": timed("-c", "pass"), "imports_s": timed("-c", "import slim.agent.__main__")}


def one_size(files: int, repeat: int, big_mib: int, tmp: Path) -> dict[str, Any]:
    rng = random.Random(4)
    image, big = tmp / "image", tmp / "big"
    paths = make_tree(image, files, rng)
    (big / "srv").mkdir(parents=True)
    standin.add_kernel(big)
    port, relay_port = free_port(), free_port()
    relay = f"http://127.0.0.1:{relay_port}"
    registry = tmp / "registry.yaml"
    registry.write_text(REGISTRY.format(image=image, big=big, tmp=tmp, relay=relay_port))
    store = Store(tmp / "state" / "store")
    keys = tmp / "state" / "keys"

    archives: list[Path] = []  # the relay's copies of the tree's current archives

    def build(env: str) -> float:
        started = time.monotonic()
        built = build_environment(load_registry(registry), store, env, signer=SigningKey.load_or_create(keys))
        if env == "tree":
            archives[:] = [tmp / "state" / "cache" / "objects" / "sha256" / d.archive.digest[7:]
                           for d in built.directories if d.archive is not None]  # fmt: skip
        return time.monotonic() - started

    def warm(env: str) -> float:
        """The relay prefetches the release (as a Slurm prolog or an administrator has it do
        before nodes boot): the server's work, once for every node, reported apart."""
        for _ in range(600):  # bounded (60 s): the relay's heartbeat stream to the core is up
            if relay_metric(relay, "slim_relay_core_connected") == 1:
                break
            time.sleep(0.1)
        started = time.monotonic()
        argv = [*SLIM, "relay", "prefetch", env, "--timeout", "3600", "--core", f"unix:{tmp}/core.sock"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=3700, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"slim relay prefetch {env} failed: {proc.stdout}{proc.stderr}")
        return time.monotonic() - started

    first_build = build("tree")
    build("big")
    procs: list[subprocess.Popen[bytes]] = []
    rows: dict[str, list[dict[str, float]]] = {"cold": [], "unchanged": [], "changed_1pct": []}
    phases: dict[str, list[dict[str, float]]] = {"cold": [], "unchanged": [], "changed_1pct": []}
    rt = Runtime(tmp / "initrd", keys / "signing.pub")
    runtime = [p for p in rt.root.rglob("*") if p.is_file() and not p.is_symlink()]  # (a node's is in RAM)
    # room for one copy: its bytes, a block's end per file, the inodes, and some to spare
    tree_bytes = sum(p.stat().st_size for p in paths)
    disk_bytes = max(1 << 30, 2 * tree_bytes)
    try:
        serve = subprocess.Popen([*SLIM, "serve", "--registry", str(registry)], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        procs.append(serve)
        assert serve.stdout is not None
        await_ready(serve.stdout, tmp / "state" / "logs")
        (tmp / "rsyncd.conf").write_text(
            f"pid file = {tmp}/rsyncd.pid\nuse chroot = no\n[tree]\npath = {image}\nread only = yes\n"
            f"[big]\npath = {big}\nread only = yes\n"
        )
        procs.append(subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={tmp}/rsyncd.conf",
                                       f"--port={port}", "--address=127.0.0.1"]))  # fmt: skip
        time.sleep(
            0.5
        )  # not synchronization of results: rsync has no ready signal; a failed start fails below
        warm("tree")
        for i in range(repeat):
            # (the agent keeps its state and /run beside its copy: on its disk, as on a node)
            slim_t = fresh_disk(rt.root / f"slim{i}", disk_bytes) / "ee"
            rsync_t = fresh_disk(tmp / f"rsync{i}", disk_bytes) / "ee"
            order = ["slim", "rsync"] if i % 2 == 0 else ["rsync", "slim"]
            pair = (order, slim_t, rsync_t, relay, port, rt, image)
            sources = {"slim": [*archives, *runtime], "rsync": paths}  # what each cold copy reads
            rows["cold"].append(both(*pair, sources))
            phases["cold"].append(sync_phases(tmp, "n1"))
            rows["unchanged"].append(both(*pair))
            phases["unchanged"].append(sync_phases(tmp, "n1"))
            for f in rng.sample(paths, len(paths) // 100):  # 1 %: rewritten in place, same size
                f.write_bytes(rng.randbytes(f.stat().st_size))
            build_s = build("tree")
            warm_s = warm("tree")
            rows["changed_1pct"].append({**both(*pair), "slim_build_s": build_s, "slim_relay_warm_s": warm_s})
            phases["changed_1pct"].append(sync_phases(tmp, "n1"))
            print(f"{files} files, round {i + 1}: " + ", ".join(
                f"{k}: slim {v[-1]['slim_s']:.2f} s/{v[-1]['slim_bytes']:.0f} B, "
                f"rsync {v[-1]['rsync_s']:.2f} s/{v[-1]['rsync_bytes']:.0f} B" for k, v in rows.items()
            ), flush=True)  # fmt: skip
            for t in (slim_t, rsync_t):
                drop_disk(t.parent)
        big_result = (
            big_file(big, big_mib, rng, relay, port, rt, tmp, lambda: build("big") + warm("big"))
            if big_mib
            else None
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
        for p in procs:
            if p.stdout is not None:
                p.stdout.close()
        for mount in (*rt.root.glob("slim*"), *tmp.glob("rsync*")):
            if mount.is_mount():
                try:
                    drop_disk(mount)
                except (OSError, subprocess.SubprocessError) as exc:  # the rest still goes
                    print(f"{mount} left mounted: {exc}", file=sys.stderr)
    medians: dict[str, Any] = {
        k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()
    }
    for m in medians.values():
        m["time_ratio"] = m["slim_s"] / m["rsync_s"]
        m["bytes_ratio"] = m["slim_bytes"] / m["rsync_bytes"]
    return {
        "files": files,
        "bytes": tree_bytes,
        "first_build_s": first_build,
        "agent_startup": startup(rt),
        "medians": medians,
        "slim_phases_s": {
            k: {p: statistics.median(r.get(p, 0.0) for r in v) for p in PHASES} for k, v in phases.items()
        },
        "runs": rows,
        "big_file": big_result,
    }  # fmt: skip


def fresh_disk(mount: Path, size: int) -> Path:
    """``mount``, where a new ext2 file system of ``size`` bytes is mounted, as the agent's
    ``mke2fs`` leaves a node's blank partition; in a sparse file beside it (``.img``)."""
    image = mount.with_name(mount.name + ".img")
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mke2fs", "-q", "-F", "-L", "slim", str(image)], check=True, timeout=300)
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True, timeout=60)
    return mount


def drop_disk(mount: Path) -> None:
    """Unmount what :func:`fresh_disk` mounted at ``mount`` (its loop device goes with it)
    and delete its image, ``mount`` with the suffix ``.img``."""
    subprocess.run(["umount", str(mount)], check=True, timeout=300)
    mount.rmdir()
    mount.with_name(mount.name + ".img").unlink()


def settle_memory() -> None:
    """What the run before wrote is on the disk, through the loop device's backing file
    too (a second ``sync`` for what the first passed on to it), and the page cache and the
    kernel's dentries and inodes are dropped: a cold copy that runs second does not reclaim
    the memory the first one filled, nor wait for its writing back (at 100,000 files the
    second of a pair ran 10-50 % slower before, whichever tool it was)."""
    os.sync()
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def both(
    order: list[str],
    slim_t: Path,
    rsync_t: Path,
    relay: str,
    port: int,
    rt: Runtime,
    image: Path,
    sources: dict[str, list[Path]] | None = None,
) -> dict[str, float]:
    """One run of each tool, in ``order``; both copies then checked against the tree.
    ``sources``: the files each side's server will read (the relay's archive, rsync's
    tree), read through just before its run, so that both come from memory."""
    row: dict[str, float] = {}
    for side in order:
        if sources is not None:  # a cold copy: each starts from the same memory, whichever goes first
            settle_memory()
        warm_page_cache((sources or {}).get(side, []))
        os.sync()  # neither run shares its time with writing back the one before (or rmtree's)
        if side == "slim":
            row["slim_s"], row["slim_bytes"] = agent(rt, "n1", slim_t, relay)
        else:
            row["rsync_s"], row["rsync_bytes"] = rsync(port, "tree", rsync_t)
    same_as(image, slim_t, rsync_t)
    return row


def big_file(
    big: Path, mib: int, rng: random.Random, relay: str, port: int, rt: Runtime, tmp: Path, build: Any
) -> dict[str, Any]:
    """One file of ``mib`` MiB, then 1 MiB inserted near its middle: bytes each tool moves."""
    path = big / "srv" / "big.dat"
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(rng.randbytes(1 << 20))
    build()
    slim_t, rsync_t = rt.root / "big-slim", tmp / "big-rsync"
    cold = {"slim": agent(rt, "n2", slim_t, relay), "rsync": rsync(port, "big", rsync_t)}
    half = (mib << 20) // 2 + 12_345
    with open(path, "rb") as f:
        head, tail = f.read(half), f.read()
    path.write_bytes(head + rng.randbytes(1 << 20) + tail)
    del head, tail
    build_started = time.monotonic()
    build()
    build_s = time.monotonic() - build_started
    changed = {"slim": agent(rt, "n2", slim_t, relay), "rsync": rsync(port, "big", rsync_t)}
    with open(path, "rb") as f:
        want = hashlib.file_digest(f, "sha256").hexdigest()
    for t in (slim_t, rsync_t):
        with open(t / "srv" / "big.dat", "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != want:
                raise SystemExit(f"{t}/srv/big.dat is not the changed file")
    shutil.rmtree(slim_t)
    shutil.rmtree(rsync_t)
    return {
        "mib": mib,
        "cold": {k: {"s": v[0], "bytes": v[1]} for k, v in cold.items()},
        "inserted_1mib": {k: {"s": v[0], "bytes": v[1]} for k, v in changed.items()},
        "bytes_ratio": changed["slim"][1] / changed["rsync"][1],
        "slim_build_and_relay_warm_s": build_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", default="10000,100000", help="tree sizes, comma-separated")
    ap.add_argument("--repeat", type=int, default=4)  # (even: each tool runs first in half the rounds)
    ap.add_argument("--big-mib", type=int, default=1024, help="the big file's size in MiB (0: skip it)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = ap.parse_args()
    if shutil.which("rsync") is None:
        raise SystemExit("rsync is missing: ./run bench installs it")
    sizes = [int(x) for x in args.files.split(",")]
    results: list[dict[str, Any]] = []
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix=f"slim-bench-p4-{n}-"))
        try:
            results.append(one_size(n, args.repeat, args.big_mib if n == sizes[0] else 0, tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        write(args, results)  # after each size: a later failure keeps what was measured
    print(json.dumps({r["files"]: r["medians"] for r in results}, indent=1))


def write(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    result = {
        "benchmark": "P4 copy-if-needed vs rsync",
        "command": "python bench/sync_vs_rsync.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "sizes": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sync_vs_rsync.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "sync_vs_rsync.png")


def plot(result: dict[str, Any], path: Path) -> None:
    """Time and bytes, SLIM beside rsync, for each situation and size (medians)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [("cold", "cold"), ("unchanged", "unchanged"), ("changed_1pct", "1 % changed")]
    sizes = result["sizes"]
    fig, axes = plt.subplots(len(sizes), 2, figsize=(10, 3.4 * len(sizes)), squeeze=False)
    for row, size in zip(axes, sizes, strict=True):
        med = size["medians"]
        xs = range(len(cases))
        for ax, key, unit, scale in ((row[0], "s", "seconds", 1.0), (row[1], "bytes", "MB on the wire", 1e6)):
            ax.bar(
                [x - 0.2 for x in xs], [med[c][f"slim_{key}"] / scale for c, _ in cases], 0.4, label="SLIM"
            )
            ax.bar([x + 0.2 for x in xs], [med[c][f"rsync_{key}"] / scale for c, _ in cases], 0.4,
                   label="rsync -aX")  # fmt: skip
            ax.set_xticks(list(xs), [label for _, label in cases])
            ax.set_ylabel(unit)
            ax.set_yscale("log")
            ax.set_title(f"{size['files']:,} files")
            ax.legend()
    fig.suptitle("Copy-if-needed against rsync (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
