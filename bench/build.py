"""Build: SLIM's copy-set archives against ``tar | gzip`` and ``tar | zstd``, same trees, one run.

    PYTHONPATH=. .venv/bin/python bench/build.py            # full run (about 9 minutes on 2 cores)
    PYTHONPATH=. .venv/bin/python bench/build.py --quick    # a short smoke run (Table-2 scale 0.1, 1 repeat)

Run as root: the images hold device nodes and files of other owners.

Trees, each made in a temporary directory and deleted at the end:

- ``table2-copyset``: the synthetic Table-2 image (labs.table2, the paper's
  Fedora Core 1 workload; --scale, default 1.0 ≈ 2.4 GB, 173k files) with
  /bin /boot /lib /sbin /usr pruned (they go over NFS): what SLIM copies,
  /dev /etc /var and the empty top-level directories;
- ``debootstrap-copyset``: a Debian bookworm minbase image, /usr pruned (the
  copy set of an image whose /usr goes over NFS);
- ``debootstrap-whole``: the same image, everything.

The debootstrap image comes from the import cache
(``CACHE/debootstrap/bookworm-minbase-ARCH-base.tar.zst``, CACHE being
$SLIM_CACHE_DIR or /var/cache/slim); without it, ``slim.core.build.image.import_image``
runs debootstrap (network to the machine's default Debian mirror, ~30 s) and
fills the cache.  "Pruned" is what the builder does: the directory itself is
archived, its contents are not (``scan(prune=...)``; for tar, ``--anchored
--exclude=./usr/*``).

Build variants, on each tree, side by side:

- ``slim-zstd-L``: ``slim.core.build.copyset.write_archive`` at zstd level L for each of
  --levels (default 1, 3, 9 = SLIM's default, 19), scan included: Python's
  tarfile writing pax headers, zstd with all cores (threads=-1) and a frame
  checksum, and sha256 of every file (whole, and per 1 MiB chunk above 4 MiB)
  in the same pass, which the manifest needs and plain tar does not do;
- ``slim-hash-only``: ``slim.core.build.copyset.hash_tree``, SLIM's pass without the
  archive: what the hashing alone costs;
- ``tar-gzip-6``: ``tar --numeric-owner --xattrs --sort=name -cf - -C DIR . | gzip -6``;
- ``tar-zstd-L``: the same tar ``| zstd -L -T0`` for each of --tar-zstd-levels (3, 19).

Each is timed (time.perf_counter) around the whole pipeline, writing to a file in
the temporary directory (page cache, no fsync), with its CPU time (user + system,
all threads and child processes).  Variants at zstd level >= 16 take 20-60 s
each here and run --slow-repeat times (default 1); the others --repeat times
(default 3), interleaved.  Medians and minimums are reported; the archive size is
the same on every run (all variants are deterministic).  Next to each size, the
lower bound of moving it over the paper's links: bytes * 8 / 100 Mb/s (LAN) and
/ 3 Mb/s (WAN).

Unpack, into a fresh directory (deleted after each run): SLIM's level-9 archive
with ``slim.core.build.tarimport.extract_tar`` (what the builder does) and with ``tar
--zstd -xpf``, and the ``tar | gzip`` archive with ``tar -xzpf``.  The first
unpack of each kind is compared with the source tree (paths, types, modes,
owners, sizes, link targets, devices, xattrs, modification times).

Results go to docs/benchmarks/build.json.  This machine is shared (2 cores):
read medians and ratios.  This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import zstandard
from rich.console import Console
from rich.table import Table

from labs.table2 import generate
from slim.agent.tree import DIR, FILE, Entry, scan
from slim.core.build.copyset import DEFAULT_LEVEL, hash_tree, write_archive
from slim.core.build.image import import_image
from slim.core.build.tarimport import extract_tar

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks" / "build.json"
LAN_BPS = 100e6  # the paper's Fast Ethernet to each node
WAN_BPS = 3e6  # the paper's broadband link
SLOW_LEVEL = 16  # zstd levels from here on are "slow" (--slow-repeat)
SUBPROCESS_TIMEOUT = 1800
TAR_CREATE = ["tar", "--numeric-owner", "--xattrs", "--sort=name"]
TAR_EXTRACT = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*"]
TABLE2_NFS = ("bin", "boot", "lib", "sbin", "usr")  # Table 2's read-only directories
console = Console() if sys.stdout.isatty() else Console(width=150)  # a log file: wide tables


@dataclass(frozen=True)
class Tree:
    name: str
    what: str
    source: str  # "table2" or "debootstrap"
    prune: tuple[str, ...]


TREES = (
    Tree(
        "table2-copyset",
        "Table-2 image, copy set: /dev /etc /var (/bin /boot /lib /sbin /usr pruned: NFS)",
        "table2",
        TABLE2_NFS,
    ),
    Tree(
        "debootstrap-copyset",
        "Debian bookworm minbase, copy set: all but /usr (pruned)",
        "debootstrap",
        ("usr",),
    ),
    Tree("debootstrap-whole", "Debian bookworm minbase, the whole image", "debootstrap", ()),
)


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    kind: str  # "slim", "hash", "tar"
    level: int = 0  # zstd level (slim, tar | zstd)
    compressor: tuple[str, ...] = ()  # tar's filter

    @property
    def slow(self) -> bool:
        return self.level >= SLOW_LEVEL


@dataclass
class Run:
    seconds: float
    cpu_seconds: float
    bytes: int | None


@dataclass
class Measured:
    runs: list[Run] = field(default_factory=list)

    def median(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    def summary(self) -> dict[str, Any]:
        sizes = {r.bytes for r in self.runs}
        return {
            "median_seconds": round(self.median(), 4),
            "min_seconds": round(min(r.seconds for r in self.runs), 4),
            "median_cpu_seconds": round(statistics.median(r.cpu_seconds for r in self.runs), 4),
            "bytes": self.runs[0].bytes,
            "same_size_every_run": len(sizes) == 1,
            "runs": [
                {"seconds": round(r.seconds, 4), "cpu_seconds": round(r.cpu_seconds, 4), "bytes": r.bytes}
                for r in self.runs
            ],
        }


def variants(levels: Iterable[int], tar_zstd_levels: Iterable[int]) -> list[Variant]:
    out = [Variant(f"slim-zstd-{lv}", f"SLIM write_archive, zstd -{lv}", "slim", lv) for lv in levels]
    out.append(Variant("slim-hash-only", "SLIM hash pass only (sha256, no archive)", "hash"))
    out.append(Variant("tar-gzip-6", "tar | gzip -6", "tar", 0, ("gzip", "-6")))
    out += [
        Variant(f"tar-zstd-{lv}", f"tar | zstd -{lv} -T0", "tar", lv, ("zstd", f"-{lv}", "-T0", "-q"))
        for lv in tar_zstd_levels
    ]
    return out


# -- measuring -------------------------------------------------------------------------
def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_pipeline(cmds: list[list[str]], out: Path | None) -> Run:
    """Run ``cmds`` as a shell-like pipeline (stdout of each into the next), the last
    writing to ``out``; wall and CPU time of the whole."""
    cpu0 = _cpu(resource.RUSAGE_CHILDREN)
    procs: list[subprocess.Popen[bytes]] = []
    with open(out, "wb") if out is not None else open(os.devnull, "wb") as sink:
        t0 = time.perf_counter()
        prev = None
        try:
            for i, cmd in enumerate(cmds):
                last = i == len(cmds) - 1
                p = subprocess.Popen(cmd, stdin=prev, stdout=sink if last else subprocess.PIPE)
                if prev is not None:
                    prev.close()  # the parent's copy: the pipe closes when its reader exits
                prev = p.stdout
                procs.append(p)
            codes = [p.wait(timeout=SUBPROCESS_TIMEOUT) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        seconds = time.perf_counter() - t0
    if any(codes):
        raise SystemExit(f"{' | '.join(' '.join(c) for c in cmds)} failed: exit codes {codes}")
    return Run(seconds, _cpu(resource.RUSAGE_CHILDREN) - cpu0, out.stat().st_size if out else None)


def run_inprocess(work: Callable[[], None], out: Path | None) -> Run:
    cpu0 = _cpu(resource.RUSAGE_SELF)  # every thread, zstd's workers included
    t0 = time.perf_counter()
    work()
    seconds = time.perf_counter() - t0
    return Run(seconds, _cpu(resource.RUSAGE_SELF) - cpu0, out.stat().st_size if out else None)


def tar_create(root: Path, prune: tuple[str, ...]) -> list[str]:
    excludes = [f"--exclude=./{p}/*" for p in prune]
    return [*TAR_CREATE, *(["--anchored", *excludes] if prune else []), "-cf", "-", "-C", str(root), "."]


def build_once(v: Variant, root: Path, prune: tuple[str, ...], out: Path) -> Run:
    if v.kind == "tar":
        return run_pipeline([tar_create(root, prune), list(v.compressor)], out)
    if v.kind == "hash":
        return run_inprocess(lambda: _discard(hash_tree(root, scan(root, prune=prune))), None)

    def slim() -> None:
        with open(out, "wb") as f:
            write_archive(root, scan(root, prune=prune), f, v.level)

    return run_inprocess(slim, out)


def _discard(_: object) -> None:
    pass


def unpack_slim(archive: Path, dest: Path) -> None:
    with open(archive, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
        extract_tar(stream, dest)


def signature(entries: Iterable[Entry]) -> list[tuple[Any, ...]]:
    return [
        (e.path, e.kind, e.mode, e.uid, e.gid, e.size, e.target, e.rdev, e.xattrs, e.mtime_ns)
        for e in entries
    ]


# -- the trees -------------------------------------------------------------------------
def make_table2(tmp: Path, scale: float, seed: int) -> tuple[Path, dict[str, Any]]:
    target = tmp / "table2"
    console.print(f"[bold]generating the Table-2 image[/] (scale {scale:g}, seed {seed}) ...")
    t0 = time.perf_counter()
    generate(target, scale, seed)
    seconds = time.perf_counter() - t0
    console.print(f"  done in {seconds:.1f} s")
    return target, {"scale": scale, "seed": seed, "generate_seconds": round(seconds, 2)}


def make_debootstrap(tmp: Path) -> tuple[Path, dict[str, Any]]:
    target = tmp / "debootstrap"
    console.print("[bold]importing debootstrap:bookworm[/] (from the import cache if there) ...")
    result = import_image("debootstrap:bookworm", target)
    console.print(
        f"  done in {result.seconds:.1f} s ({'from the cache' if result.cached else 'debootstrap ran'})"
    )
    return target, {
        "source": "debootstrap:bookworm (variant minbase)",
        "from_cache": result.cached,
        "import_seconds": round(result.seconds, 2),
    }


def tree_stats(root: Path, prune: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[Any, ...]]]:
    entries = list(scan(root, prune=prune))
    return {
        "entries": len(entries),
        "directories": sum(e.kind == DIR for e in entries),
        "files": sum(e.kind != DIR for e in entries),  # every non-directory, as Table 2 counts
        "regular_files": sum(e.kind == FILE for e in entries),
        "bytes": sum(e.size for e in entries if e.kind == FILE),
    }, signature(entries)


# -- one tree --------------------------------------------------------------------------
def bench_tree(
    tree: Tree, root: Path, work: Path, vs: list[Variant], repeat: int, slow_repeat: int
) -> dict[str, Any]:
    stats, source_sig = tree_stats(root, tree.prune)
    console.print(
        f"[bold]{tree.name}[/]: {stats['files']:,} files, {stats['directories']:,} directories, "
        f"{stats['bytes'] / 1e6:,.1f} MB"
    )
    archives = work / "archives"
    archives.mkdir()
    measured = {v.name: Measured() for v in vs}
    for rep in range(max(repeat, slow_repeat)):
        for v in vs:
            if rep >= (slow_repeat if v.slow else repeat):
                continue
            out = archives / v.name
            r = build_once(v, root, tree.prune, out)
            measured[v.name].runs.append(r)
            size = f"{r.bytes / 1e6:8.2f} MB" if r.bytes is not None else "           "
            console.print(
                f"  [dim]{v.name:16} run {rep + 1}  {r.seconds:7.2f} s  {size}  cpu {r.cpu_seconds:6.2f} s[/]"
            )
    build: dict[str, Any] = {}
    gz = measured.get("tar-gzip-6")
    z3 = measured.get("tar-zstd-3")
    for v in vs:
        m = measured[v.name]
        s = m.summary()
        s["label"] = v.label
        s["repeats"] = len(m.runs)
        if m.runs[0].bytes is not None:
            b = m.runs[0].bytes
            s["compression_ratio"] = round(stats["bytes"] / b, 3)
            s["lan_100mbps_lower_bound_seconds"] = round(b * 8 / LAN_BPS, 2)
            s["wan_3mbps_lower_bound_seconds"] = round(b * 8 / WAN_BPS, 1)
            for ref_name, ref in (("tar_gzip", gz), ("tar_zstd_3", z3)):
                if ref is not None and ref.runs[0].bytes:
                    s[f"size_vs_{ref_name}"] = round(b / ref.runs[0].bytes, 3)
        for ref_name, ref in (("tar_gzip", gz), ("tar_zstd_3", z3)):
            if ref is not None:
                s[f"time_vs_{ref_name}"] = round(m.median() / ref.median(), 3)
        if v.kind == "slim" and f"tar-zstd-{v.level}" in measured:
            s["time_vs_tar_zstd_same_level"] = round(m.median() / measured[f"tar-zstd-{v.level}"].median(), 3)
        build[v.name] = s
    unpack = bench_unpack(tree, root, work, archives, vs, repeat, source_sig)
    shutil.rmtree(archives)
    return {
        "what": tree.what,
        "pruned": ["/" + p for p in tree.prune],
        **stats,
        "build": build,
        "unpack": unpack,
    }


def bench_unpack(
    tree: Tree,
    root: Path,
    work: Path,
    archives: Path,
    vs: list[Variant],
    repeat: int,
    source_sig: list[tuple[Any, ...]],
) -> dict[str, Any]:
    slim9 = archives / f"slim-zstd-{DEFAULT_LEVEL}"
    if not slim9.exists():  # not among --levels: made here, untimed
        with open(slim9, "wb") as f:
            write_archive(root, scan(root, prune=tree.prune), f, DEFAULT_LEVEL)
    gz = archives / "tar-gzip-6"
    if not gz.exists():
        run_pipeline([tar_create(root, tree.prune), ["gzip", "-6"]], gz)
    kinds: list[tuple[str, str, Callable[[Path], Run]]] = [
        (
            "slim-extract_tar",
            f"SLIM extract_tar (Python), SLIM zstd -{DEFAULT_LEVEL} archive",
            lambda d: run_inprocess(lambda: unpack_slim(slim9, d), None),
        ),
        (
            "tar-zstd-x",
            f"tar --zstd -xpf, the same SLIM zstd -{DEFAULT_LEVEL} archive",
            lambda d: run_pipeline([[*TAR_EXTRACT, "--zstd", "-xpf", str(slim9), "-C", str(d)]], None),
        ),
        (
            "tar-gzip-x",
            "tar -xzpf, the tar | gzip -6 archive",
            lambda d: run_pipeline([[*TAR_EXTRACT, "-xzpf", str(gz), "-C", str(d)]], None),
        ),
    ]
    measured = {name: Measured() for name, _, _ in kinds}
    same: dict[str, bool] = {}
    for rep in range(repeat):
        for name, _, fn in kinds:
            dest = work / "unpack"
            dest.mkdir()
            try:
                r = fn(dest)
                measured[name].runs.append(r)
                console.print(
                    f"  [dim]unpack {name:16} run {rep + 1}  {r.seconds:7.2f} s  "
                    f"cpu {r.cpu_seconds:6.2f} s[/]"
                )
                if rep == 0:
                    same[name] = signature(scan(dest, prune=tree.prune)) == source_sig
            finally:
                shutil.rmtree(dest)
    out: dict[str, Any] = {}
    ref = measured["tar-gzip-x"].median()
    for name, label, _ in kinds:
        s = measured[name].summary()
        del s["bytes"], s["same_size_every_run"]
        for run in s["runs"]:
            del run["bytes"]
        s["label"] = label
        s["same_tree_as_source"] = same[name]
        s["time_vs_tar_gzip_x"] = round(measured[name].median() / ref, 3)
        out[name] = s
    return out


# -- reporting -------------------------------------------------------------------------
def _mb(b: int | None) -> str:
    return "-" if b is None else f"{b / 1e6:,.2f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def print_tree(name: str, r: dict[str, Any]) -> None:
    title = f"{name}: {r['files']:,} files, {r['bytes'] / 1e6:,.1f} MB ({r['what']})"
    t = Table(title=title, title_justify="left")
    for col in ("build", "MB", "ratio", "median s", "min s", "CPU s", "size/gzip", "size/zstd-3",
                "time/gzip", "time/zstd-3", "100 Mb/s", "3 Mb/s"):  # fmt: skip
        t.add_column(col, justify="left" if col == "build" else "right")
    for vname, s in r["build"].items():
        t.add_row(
            vname,
            _mb(s["bytes"]),
            f"{s['compression_ratio']:.2f}" if "compression_ratio" in s else "-",
            f"{s['median_seconds']:.2f}",
            f"{s['min_seconds']:.2f}",
            f"{s['median_cpu_seconds']:.2f}",
            _x(s.get("size_vs_tar_gzip")),
            _x(s.get("size_vs_tar_zstd_3")),
            _x(s.get("time_vs_tar_gzip")),
            _x(s.get("time_vs_tar_zstd_3")),
            f"{s['lan_100mbps_lower_bound_seconds']:.1f} s"
            if "lan_100mbps_lower_bound_seconds" in s
            else "-",
            f"{s['wan_3mbps_lower_bound_seconds']:.0f} s" if "wan_3mbps_lower_bound_seconds" in s else "-",
        )
    console.print(t)
    u = Table(title=f"{name}: unpack", title_justify="left")
    for col in ("unpack", "median s", "min s", "CPU s", "time/tar -xz", "same tree"):
        u.add_column(col, justify="left" if col == "unpack" else "right")
    for s in r["unpack"].values():
        u.add_row(
            s["label"],
            f"{s['median_seconds']:.2f}",
            f"{s['min_seconds']:.2f}",
            f"{s['median_cpu_seconds']:.2f}",
            _x(s["time_vs_tar_gzip_x"]),
            "yes" if s["same_tree_as_source"] else "[red]NO[/]",
        )
    console.print(u)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(results: dict[str, Any]) -> str:
    """The README's tables (medians) from a results file."""
    trees = results["trees"]
    names = list(trees)
    variants_ = list(trees[names[0]]["build"])
    lines = [
        "| | "
        + " | ".join(f"{n}<br>{trees[n]['files']:,} files, {trees[n]['bytes'] / 1e6:,.0f} MB" for n in names)
        + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for v in variants_:
        cells = []
        for n in names:
            s = trees[n]["build"][v]
            size = f"{s['bytes'] / 1e6:,.1f} MB, " if s["bytes"] is not None else ""
            cells.append(f"{size}{s['median_seconds']:.2f} s")
        lines.append(f"| {_md(trees[names[0]]['build'][v]['label'])} | " + " | ".join(cells) + " |")
    lines += ["", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in trees[names[0]]["unpack"]:
        cells = [f"{trees[n]['unpack'][k]['median_seconds']:.2f} s" for n in names]
        lines.append(f"| {_md(trees[names[0]]['unpack'][k]['label'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _first_line(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    return (p.stdout or p.stderr).strip().splitlines()[0]


def machine(tmp: Path) -> dict[str, Any]:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                      if ln.startswith("model name")), "")  # fmt: skip
    libzstd = ".".join(map(str, zstandard.ZSTD_VERSION))
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "tmp_filesystem": _first_line(["stat", "-f", "-c", "%T", str(tmp)]),
        "tools": {
            "tar": _first_line(["tar", "--version"]),
            "zstd": _first_line(["zstd", "-V"]),
            "gzip": _first_line(["gzip", "-V"]),
            "python-zstandard": f"{zstandard.__version__} (libzstd {libzstd})",
        },
    }


def _levels(text: str) -> list[int]:
    out = [int(x) for x in text.split(",") if x.strip()]
    if not out or not all(1 <= x <= 19 for x in out):
        raise argparse.ArgumentTypeError(f"levels are comma-separated zstd levels 1-19, not {text!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="Table-2 image scale (1.0 ≈ 2.4 GB, 173k files)")
    ap.add_argument("--seed", type=int, default=0, help="Table-2 image seed")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement (median reported)")
    ap.add_argument(
        "--slow-repeat", type=int, default=1, help=f"runs of the zstd level >= {SLOW_LEVEL} builds"
    )
    ap.add_argument(
        "--levels", type=_levels, default=[1, 3, 9, 19], help="SLIM's zstd levels (default 1,3,9,19)"
    )
    ap.add_argument(
        "--tar-zstd-levels", type=_levels, default=[3, 19], help="tar | zstd levels (default 3,19)"
    )
    ap.add_argument(
        "--trees", default=",".join(t.name for t in TREES), help="comma-separated subset of trees"
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: scale 0.1, 1 repeat, levels 3,9, zstd -3"
    )
    ap.add_argument("--tmp-dir", type=Path, help="where the temporary directory goes (default: $TMPDIR)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (trees, archives)")
    ap.add_argument("--out", type=Path, default=OUT, help="where to write the JSON results")
    ap.add_argument("--markdown", type=Path, metavar="JSON", help="print a results file's tables as Markdown")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())), end="")
        return
    if args.quick:
        args.scale, args.repeat, args.slow_repeat, args.levels, args.tar_zstd_levels = 0.1, 1, 1, [3, 9], [3]
    if args.repeat < 1 or args.slow_repeat < 1:
        ap.error("--repeat and --slow-repeat must be at least 1")
    wanted = [n.strip() for n in args.trees.split(",") if n.strip()]
    trees = [t for t in TREES if t.name in wanted]
    if len(trees) != len(wanted):
        ap.error(f"--trees: choose among {', '.join(t.name for t in TREES)}")
    if os.geteuid() != 0:
        raise SystemExit("run as root: the images hold device nodes and files of other owners")
    for tool in ("tar", "gzip", "zstd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")

    started = time.perf_counter()
    vs = variants(args.levels, args.tar_zstd_levels)
    tmp = Path(tempfile.mkdtemp(prefix="slim-bench-build-", dir=args.tmp_dir))
    results: dict[str, Any] = {
        "benchmark": "build: SLIM copy-set archives vs tar | gzip and tar | zstd, same trees",
        "command": " ".join(["python", "bench/build.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(tmp),
        "parameters": {
            k: v
            for k, v in vars(args).items()
            if k not in ("out", "quick", "keep_tmp", "tmp_dir", "trees", "markdown")
        },
        "notes": [
            "wall time around the whole pipeline: scan or tar, compression, the output file "
            "(in the page cache, no fsync)",
            "SLIM's builds include sha256 of every file (the manifest); tar's do not hash anything",
            "SLIM and zstd -T0 use every core; gzip -6 uses one",
            f"zstd levels >= {SLOW_LEVEL} run --slow-repeat times, the rest --repeat times",
            "transfer lower bounds: bytes * 8 / 1e8 (100 Mb/s LAN) and / 3e6 (3 Mb/s WAN), seconds",
        ],
        "sources": {},
        "trees": {},
    }
    try:
        roots: dict[str, Path] = {}
        if any(t.source == "table2" for t in trees):
            roots["table2"], results["sources"]["table2"] = make_table2(tmp, args.scale, args.seed)
        if any(t.source == "debootstrap" for t in trees):
            roots["debootstrap"], results["sources"]["debootstrap"] = make_debootstrap(tmp)
        for tree in trees:
            work = tmp / f"work-{tree.name}"
            work.mkdir()
            results["trees"][tree.name] = bench_tree(
                tree, roots[tree.source], work, vs, args.repeat, args.slow_repeat
            )
            shutil.rmtree(work)
            print_tree(tree.name, results["trees"][tree.name])
    finally:
        if args.keep_tmp:
            console.print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    shown = args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out
    console.print(f"whole run {results['total_seconds']:.0f} s; wrote {shown}")


if __name__ == "__main__":
    main()
