"""The agent's initrd: what each part costs, the verifier and ssl, how it is compressed, and
how fast the agent starts from it — side by side in one run.

    ./run bench initrd          # = PYTHONPATH=. .venv/bin/python bench/initrd_size.py (as root, ~5 minutes)
    ./run bench initrd --vm     # and in QEMU (TCG, as the VM test): the kernel's unpacking, the agent's start
    PYTHONPATH=. .venv/bin/python bench/initrd_size.py --from-json docs/benchmarks/initrd_size.json  # P1 only

Initrds of the agent's runtime, built as ``slim ee build`` builds them (core/build/agentrt.py's
``collect`` and ``add_runtime``, :class:`slim.core.build.initrd.InitrdBuilder`'s zstd -19 with
the whole archive in one window) from this machine's files, with Python linked without the
built-in modules the agent never uses and a decompression-only zstd (core/build/smallpython.py,
core/build/unzstd.py), as the build does; and the same with Debian's ``python3.11`` and ``zstd``
as they are, for comparison (in sizes, start-up and the VM):

- **without the verifier**: no ``signify-openbsd`` (such an initrd refuses every plan; it
  is only the baseline);
- **with the verifier**: what every initrd carries (signify and the core's key);
- **with the verifier and ssl**: what a registry with an ``https://`` relay URL gets:
  Python's ``ssl``, ``_ssl`` and OpenSSL's ``libssl``/``libcrypto``, and SLIM's CA certificate;
- **with the verifier and the VM test's modules** (``tests/test_vm_boot.py``'s profile:
  virtio_pci, virtio_net, and the modules every initrd carries, with their dependencies: 22)
  from the kernel package ``slim ee import --add-kernel`` cached (``--kernel-deb``), when there
  is one: the whole initrd a node fetches.

Then, for the largest of those without ssl:

- **parts**: each part's cost compressed, alone and as its share (the initrd without it);
- **compression**: zstd -19 with its own 8 MiB window (the build until 2026-12-05), with the
  whole archive in one (the build), --ultra -22, and xz (x86 BCJ, LZMA2 -9e: what Linux also
  unpacks), each with its decompression time on this machine (median of 5, one core);
- **the standard library's form**: its sources (as until 2026-12-05, without the modules frozen
  into the interpreter), or bytecode in one zip at optimization level 0 with column positions
  (Python's default), level 0 and 2 without: each compressed alone;
- **start-up** (as root): the agent's imports in the unpacked runtime, chrooted, with the
  standard library as bytecode (the build) and as sources (and no bytecode for the agent),
  alternated, medians;
- with ``--vm``: the whole initrd (modules too) with a /init that only runs the agent's imports
  six times in a row, booted in QEMU (TCG, as the VM test) with the kernel: as the build makes
  it, with zstd's own 8 MiB window, with xz, and with the standard library as sources; the
  kernel's unpacking time and each start by the kernel's clock (the first start also waits for
  the kernel's random pool: the agent's imports read from it).

Last, P1's storms of 272 nodes (the paper's cluster, copy-if-needed and full copy) are simulated
again from P1's own calibration (docs/benchmarks/boot_storm.json) with this initrd in place of
the 7.0 MB one P1 counted.  Sizes in bytes and MB (1e6).  Results: docs/benchmarks/initrd_size.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import itertools
import json
import lzma
import os
import platform
import re
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import zstandard

from labs import initrdroot
from slim.core.build.agentrt import (
    AGENT_ROOT,
    PYTHON,
    STDLIB_OPTIMIZE,
    Runtime,
    add_runtime,
    byte_compile,
    collect,
)
from slim.core.build.image import default_cache_dir
from slim.core.build.initrd import WINDOW_LOG, CpioArchive, CpioEntry, InitrdBuilder
from slim.core.build.kernel import install_kernel
from slim.core.build.release import EXTRA_MODULES
from slim.pki import CertificateAuthority
from slim.signing import SigningKey
from slim.simulate import PAPER, simulate, workload_from_dict

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "docs" / "benchmarks"
LEVEL = 19  # what the build uses (InitrdBuilder.write's default)
VM_MODULES = ("virtio_pci", "virtio_net", *EXTRA_MODULES)  # labs/vmlab.py's virtio-net-pci profile
XZ_FILTERS = [
    {"id": lzma.FILTER_X86},
    {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 32 << 20},
]
IMPORTS = "import slim.agent.__main__, slim.agent.ee, slim.agent.fetch, slim.agent.plan"
MB = 1e6
P1_RUN = OUT_DIR / "boot_storm.json"  # P1's measurements, its full-scale calibration among them
P1_KERNEL, P1_INITRD = 7.9e6, 7.0e6  # what P1's nodes fetch first (labs/stormlab.py BOOT_BYTES, 14.9 MB)


# --- building ------------------------------------------------------------------------------------


def builder(
    runtime: Runtime, modules: tuple[Path, str] | None = None, init: str | None = None
) -> InitrdBuilder:
    out = InitrdBuilder()
    if modules is not None:
        out.add_modules(modules[0], modules[1], VM_MODULES)
    add_runtime(out, runtime, init=init)
    return out


def cpio(archive: CpioArchive) -> bytes:
    buf = io.BytesIO()
    archive.write_cpio(buf)
    return buf.getvalue()


def compressed(archive: InitrdBuilder) -> int:
    """Its size as the build writes it."""
    return archive.write(io.BytesIO(), level=LEVEL).compressed_size


def subset(archive: InitrdBuilder, keep: Callable[[CpioEntry], bool]) -> InitrdBuilder:
    """The entries of ``archive`` that ``keep`` keeps (directories come implied)."""
    out = InitrdBuilder()
    for e in archive.entries():
        if not stat.S_ISREG(e.mode) or not keep(e):
            if stat.S_ISLNK(e.mode) and keep(e):
                out.add_symlink(e.path, e.data.decode())
            continue
        if e.source is not None:
            out.add_file(e.path, e.source, mode=stat.S_IMODE(e.mode))
        else:
            out.add_bytes(e.path, e.data, mode=stat.S_IMODE(e.mode))
    return out


def zstd_whole(data: bytes, level: int = LEVEL) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=len(data), window_log=WINDOW_LOG, write_checksum=True
    )
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


def zstd_own_window(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=LEVEL, write_checksum=True).compress(data)


def zstd_ultra(data: bytes) -> bytes:
    return zstd_whole(data, 22)


def xz(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=XZ_FILTERS)


def unzstd(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()


def unxz(data: bytes) -> bytes:
    return lzma.decompress(data)


def timed(f: Callable[[bytes], bytes], data: bytes, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f(data)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 3)


# --- the parts -------------------------------------------------------------------------------------


def part(path: str) -> str:
    """Which part of the initrd a file is."""
    name = path.rsplit("/", 1)[-1]
    if path.startswith("lib/modules/"):
        return "kernel modules"
    if re.fullmatch(r"usr/bin/python3\.\d+", path):
        return "python3 (the interpreter)"
    if name.startswith(("libc.so", "ld-linux")):
        return "libc and the loader"
    if name.startswith(("libm.so", "libz.so", "libexpat.so")):
        return "python3's libraries (Debian's: libm, libz, libexpat)"
    if "/lib-dynload/" in path:
        return "extension modules (lib-dynload)"
    if path.startswith("usr/lib/python") and path.endswith((".zip", ".py")):
        return "standard library (its zip, os.py)"
    if name == "busybox":
        return "busybox"
    if name.startswith(("zstd", "unzstd", "liblzma", "liblz4")):
        return "zstd (Debian's: and liblzma, liblz4)"
    if name.startswith(("signify", "libbsd", "libmd")):
        return "signify-openbsd (and libbsd, libmd)"
    if path.startswith(AGENT_ROOT.lstrip("/")):
        return "the agent (sources, bytecode)"
    return "the rest (init, keys, modules.dep, ...)"


def in_part(name: str, entry: CpioEntry) -> bool:
    return part(entry.path) == name


def not_in_part(name: str, entry: CpioEntry) -> bool:
    return part(entry.path) != name


def parts(archive: InitrdBuilder) -> dict[str, dict[str, int]]:
    whole = compressed(archive)
    names = sorted({part(e.path) for e in archive.entries() if stat.S_ISREG(e.mode)})
    jobs = {}
    for name in names:
        jobs[f"alone {name}"] = subset(archive, functools.partial(in_part, name))
        jobs[f"without {name}"] = subset(archive, functools.partial(not_in_part, name))
    with ProcessPoolExecutor(2) as pool:
        sizes = dict(zip(jobs, pool.map(compressed, jobs.values()), strict=True))
    out = {}
    for name in names:
        files = [e for e in archive.entries() if stat.S_ISREG(e.mode) and part(e.path) == name]
        out[name] = {
            "files": len(files),
            "unpacked_bytes": sum(e.source.stat().st_size if e.source else len(e.data) for e in files),
            "compressed_alone": sizes[f"alone {name}"],
            "compressed_share": whole - sizes[f"without {name}"],
        }
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["compressed_share"]))


# --- the standard library's form ---------------------------------------------------------------------


def stdlib_sources(runtime: Runtime) -> tuple[str, dict[str, Path]]:
    """The runtime's zip path and, for each member, its source: what the zip replaced."""
    zip_path = next(p for p in runtime.data if p.endswith(".zip"))
    stdlib = next(src.parent for dest, src in runtime.files.items() if dest.endswith("/os.py"))
    names = zipfile.ZipFile(io.BytesIO(runtime.data[zip_path])).namelist()
    return zip_path, {n: stdlib / (n.removesuffix(".pyc") + ".py") for n in names}


def with_sources(runtime: Runtime) -> Runtime:
    """The runtime with its standard library as sources and no bytecode for the agent."""
    zip_path, sources = stdlib_sources(runtime)
    files = dict(runtime.files)
    for src in sources.values():
        files[str(src)] = src
    data = {d: b for d, b in runtime.data.items() if d != zip_path and "/__pycache__/" not in d}
    return dataclasses.replace(runtime, files=files, data=data)


def stdlib_forms(runtime: Runtime) -> dict[str, int]:
    _, sources = stdlib_sources(runtime)
    py = list(sources.values())
    exe = PYTHON.resolve()
    out = {"sources": len(zstd_whole(b"".join(p.read_bytes() for p in py)))}
    for name, optimize, columns in (
        ("bytecode, level 0, with columns", 0, True),
        ("bytecode, level 0, no columns", 0, False),
        (f"bytecode, level {STDLIB_OPTIMIZE}, no columns (the build)", STDLIB_OPTIMIZE, False),
    ):
        pycs = byte_compile(exe, [(p, str(p), optimize, False) for p in py], columns=columns)
        members = dict(zip(sources, pycs, strict=True))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for n in sorted(members):
                z.writestr(zipfile.ZipInfo(n, (1980, 1, 1, 0, 0, 0)), members[n])
        out[name] = len(zstd_whole(buf.getvalue()))
    return out


# --- start-up --------------------------------------------------------------------------------------


def chrooted_start(root: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(initrdroot.python(root, "-c", IMPORTS), env=initrdroot.ENV, check=True)
    return time.perf_counter() - t0


VM_INIT = """#!/bin/sh
PATH=/bin:/usr/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for i in 1 2 3 4 5 6; do
    echo "<2>bench: start $i" > /dev/kmsg
    env SLIM_INITRD=1 PYTHONPATH={root} /usr/bin/python3 -S -B -c '{imports}'
    echo "<2>bench: end $i" > /dev/kmsg
done
poweroff -f
"""


def vm_boot(kernel: Path, initrd: Path) -> dict[str, Any]:
    """The kernel's unpacking and the agent's six starts, by the kernel's clock."""
    out = subprocess.run(
        ["qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-nographic", "-no-reboot", "-nic", "none",
         "-kernel", str(kernel), "-initrd", str(initrd),
         "-append", "console=ttyS0 panic=-1 quiet loglevel=7"],
        capture_output=True, text=True, errors="replace", timeout=600, check=False,
    ).stdout  # fmt: skip
    at = {}
    for m in re.finditer(
        r"\[\s*([\d.]+)\] (Trying to unpack rootfs|Freeing initrd memory|bench: \w+ \d)", out
    ):
        at[m.group(2)] = float(m.group(1))
    starts = [
        round(at[f"bench: end {i}"] - at[f"bench: start {i}"], 3)
        for i in range(1, 7)
        if f"bench: end {i}" in at and f"bench: start {i}" in at
    ]
    if len(starts) != 6 or "Freeing initrd memory" not in at:
        raise RuntimeError(f"the VM did not run the bench's init:\n{out[-3000:]}")
    return {
        "unpack_s": round(at["Freeing initrd memory"] - at["Trying to unpack rootfs"], 3),
        "starts_s": starts,
    }


# --- main ------------------------------------------------------------------------------------------


def kernel_modules(deb: Path | None, into: Path) -> tuple[Path, str, Path] | None:
    """(image root, KVER, vmlinuz) of the kernel package, unpacked under ``into``."""
    if deb is None:
        found = sorted((default_cache_dir() / "kernel").glob("linux-image-*.deb"))
        if not found:
            return None
        deb = found[-1]
    root = into / "kernel"
    root.mkdir()
    kver = install_kernel(deb, root)
    return root, kver, root / "boot" / f"vmlinuz-{kver}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="where initrd_size.json goes")
    ap.add_argument(
        "--kernel-deb",
        type=Path,
        help="the kernel package whose modules go in (default: the newest linux-image-*.deb in "
        "SLIM's cache, $SLIM_CACHE_DIR/kernel, which slim ee import --add-kernel fills)",
    )
    ap.add_argument("--repeat", type=int, default=9, help="start-ups timed per form, alternated (as root)")
    ap.add_argument(
        "--vm", action="store_true", help="also boot the initrds in QEMU (TCG): unpacking, start-up"
    )
    ap.add_argument("--vm-repeat", type=int, default=2, help="QEMU boots per initrd, alternated")
    ap.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="measure nothing: take an earlier run's initrd_size.json and redo P1's simulation only",
    )
    args = ap.parse_args()
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
    else:
        started = time.time()
        tmp = Path(tempfile.mkdtemp(prefix="slim-bench-initrd-"))
        try:
            results = measure(args, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        results["took_s"] = round(time.time() - started)
    if "with_verifier_and_modules" in results["initrds"] and P1_RUN.is_file():
        results["p1_272_nodes"] = p1(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "initrd_size.json").write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    shown = args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out
    print(f"wrote {shown}/initrd_size.json")


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    key = SigningKey.load_or_create(tmp / "keys").public  # a throwaway key and CA
    ca = CertificateAuthority.init(tmp / "ca").cert_pem
    kernel = kernel_modules(args.kernel_deb, tmp)
    modules = None if kernel is None else (kernel[0], kernel[1])
    small = default_cache_dir()  # the build's own Python and zstd, as slim ee build makes them
    variants: dict[str, Runtime] = {
        "without_verifier": collect(signify=None, build_cache=small),
        "with_verifier": collect(build_cache=small),
        "with_verifier_and_ssl": collect(https=True, build_cache=small),
        "with_verifier_debian_binaries": collect(),  # before: Debian's python3.11 and zstd as they are
    }
    for runtime in variants.values():
        if runtime.warnings:
            raise SystemExit(f"the runtime is not the build's: {runtime.warnings}")
    for name, runtime in variants.items():
        runtime.trust([key])
        if name == "with_verifier_and_ssl":
            runtime.trust_ca(ca)
    archives = {name: builder(rt) for name, rt in variants.items()}
    if modules is not None:
        archives["with_verifier_and_modules"] = builder(variants["with_verifier"], modules)
        archives["with_verifier_and_modules_debian_binaries"] = builder(
            variants["with_verifier_debian_binaries"], modules
        )
    results: dict[str, Any] = {
        "benchmark": "the agent's initrd: its parts, the verifier and ssl, compression, start-up",
        "command": " ".join(["python", "bench/initrd_size.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "initrd_python": subprocess.run(
            [str(PYTHON), "-c", "import sys, ssl; print(sys.version.split()[0], ssl.OPENSSL_VERSION)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip(),
        "compression": f"zstd -{LEVEL}, the whole archive in one window (up to 2^{WINDOW_LOG})",
        "kernel": None if kernel is None else {"kver": kernel[1], "modules": list(VM_MODULES)},
        "notes": ["1 MB = 1e6 bytes"],
        "initrds": {},
        "added": {},
    }
    for name, archive in archives.items():
        t0 = time.perf_counter()
        info = archive.write(io.BytesIO(), level=LEVEL)
        results["initrds"][name] = {
            "compressed_bytes": info.compressed_size,
            "uncompressed_bytes": info.uncompressed_size,
            "files": info.files,
            "seconds_to_compress": round(time.perf_counter() - t0, 2),
        }
        if archive.selection is not None:
            results["initrds"][name]["modules"] = len(archive.selection.modules)
        print(f"{name:26} {results['initrds'][name]}", flush=True)
    for what, before, after in (
        ("verifier", "without_verifier", "with_verifier"),
        ("ssl", "with_verifier", "with_verifier_and_ssl"),
        ("debian_binaries", "with_verifier", "with_verifier_debian_binaries"),  # what the build's own save
    ):
        a, b = results["initrds"][before], results["initrds"][after]
        old, new = sizes(variants[before]), sizes(variants[after])
        results["added"][what] = {
            "compressed_bytes": b["compressed_bytes"] - a["compressed_bytes"],
            "uncompressed_bytes": b["uncompressed_bytes"] - a["uncompressed_bytes"],
            "files": {path: size for path, size in sorted(new.items()) if path not in old},
        }
    biggest = "with_verifier_and_modules" if modules is not None else "with_verifier"
    results["parts_of"] = biggest
    results["parts"] = parts(archives[biggest])
    print("parts:", json.dumps(results["parts"]), flush=True)

    raw = cpio(archives[biggest])
    ways = {
        f"zstd -{LEVEL}, its own 8 MiB window": (zstd_own_window, unzstd),
        f"zstd -{LEVEL}, the whole archive in one window (the build)": (zstd_whole, unzstd),
        "zstd --ultra -22, the whole archive in one window": (zstd_ultra, unzstd),
        "xz (x86 BCJ, LZMA2 -9e, 32 MiB dictionary)": (xz, unxz),
    }
    with ProcessPoolExecutor(2) as pool:
        squeezed = pool.map(call, [pack for pack, _ in ways.values()], itertools.repeat(raw))
        packed = dict(zip(ways, squeezed, strict=True))
    results["compression_of"] = biggest
    results["compressions"] = {
        name: {"bytes": len(packed[name]), "decompress_s": timed(ways[name][1], packed[name])}
        for name in ways
    }
    print("compressions:", json.dumps(results["compressions"]), flush=True)
    results["stdlib_forms_compressed_alone"] = stdlib_forms(variants["with_verifier"])
    print("standard library:", json.dumps(results["stdlib_forms_compressed_alone"]), flush=True)

    forms = {
        "bytecode (the build)": variants["with_verifier"],
        "sources": with_sources(variants["with_verifier"]),
        "bytecode, Debian's python3.11 and zstd": variants["with_verifier_debian_binaries"],
    }
    if os.geteuid() == 0 and shutil.which("cpio") and shutil.which("chroot"):
        roots = {
            name: initrdroot.unpack(builder(rt), tmp / f"root-{i}")
            for i, (name, rt) in enumerate(forms.items())
        }
        runs: dict[str, list[float]] = {name: [] for name in roots}
        for root in roots.values():
            chrooted_start(root)  # the page cache warm for both
        for _ in range(args.repeat):
            for name, root in roots.items():
                runs[name].append(chrooted_start(root))
        results["start_chrooted_s"] = {
            name: {"median": round(statistics.median(r), 3), "runs": [round(x, 3) for x in r]}
            for name, r in runs.items()
        }
        print("start-up, chrooted:", json.dumps(results["start_chrooted_s"]), flush=True)
    else:
        results["notes"].append("start-up not measured: it needs root, cpio and chroot")
    if args.vm:
        if kernel is None or not shutil.which("qemu-system-x86_64"):
            raise SystemExit("--vm needs qemu-system-x86_64 and a kernel package (--kernel-deb)")
        init = VM_INIT.format(root=AGENT_ROOT, imports=IMPORTS)
        the_build = cpio(builder(forms["bytecode (the build)"], modules, init))
        packs = {
            "bytecode, zstd -19 whole window (the build)": zstd_whole(the_build),
            "bytecode, zstd -19 own 8 MiB window": zstd_own_window(the_build),
            "bytecode, xz": xz(the_build),
            "sources, zstd -19 whole window": zstd_whole(cpio(builder(forms["sources"], modules, init))),
            "bytecode, Debian's python3.11 and zstd, zstd -19 whole window": zstd_whole(
                cpio(builder(forms["bytecode, Debian's python3.11 and zstd"], modules, init))
            ),
        }
        images = {}
        for i, (name, packed_image) in enumerate(packs.items()):
            images[name] = tmp / f"vm-{i}.img"
            images[name].write_bytes(packed_image)
        boots: dict[str, list[dict[str, Any]]] = {name: [] for name in images}
        for _ in range(args.vm_repeat):
            for name, image in images.items():
                boots[name].append(vm_boot(kernel[2], image))
                print(name, boots[name][-1], flush=True)
        results["vm"] = {
            name: {
                "initrd_bytes": images[name].stat().st_size,
                "unpack_s_median": round(statistics.median(b["unpack_s"] for b in runs_), 3),
                "first_start_s": [b["starts_s"][0] for b in runs_],
                "later_starts_s_median": round(
                    statistics.median(s for b in runs_ for s in b["starts_s"][1:]), 3
                ),
                "boots": runs_,
            }
            for name, runs_ in boots.items()
        }
    return results


def call(f: Callable[[bytes], bytes], data: bytes) -> bytes:
    return f(data)


def p1(results: dict[str, Any]) -> dict[str, Any]:
    """P1's storms of 272 nodes on the paper's cluster, simulated again from P1's own full-scale
    calibration with each node's kernel and initrd: P1's 7.9 MB kernel and the initrd P1 counted
    (7.0 MB), the one built here, and the xz one."""
    storm = json.loads(P1_RUN.read_text())
    work = {k: workload_from_dict(w) for k, w in storm["full_scale_calibration"].items()}
    initrds = {
        "P1's (7.0 MB)": P1_INITRD,
        "the build's": results["initrds"]["with_verifier_and_modules"]["compressed_bytes"],
    }
    xz_name = next((n for n in results.get("compressions", {}) if n.startswith("xz")), None)
    if xz_name is not None:
        initrds["xz"] = results["compressions"][xz_name]["bytes"]
    out: dict[str, Any] = {"calibration": str(P1_RUN.relative_to(ROOT)), "kernel_bytes": P1_KERNEL}
    for name, size in initrds.items():
        out[name] = {"initrd_bytes": size}
        for policy in ("cin", "full"):
            workload = dataclasses.replace(work[policy], boot_bytes=P1_KERNEL + size)
            summary = simulate(dataclasses.replace(PAPER, nodes=272), workload).summary()
            out[name][policy] = {k: summary[k] for k in ("makespan_s", "lower_bound_s", "bottleneck")}
    return out


def sizes(runtime: Runtime) -> dict[str, int]:
    """Each file of the runtime and its size (data written as bytes included)."""
    out = {dest: src.stat().st_size for dest, src in runtime.files.items()}
    out |= {dest: len(data) for dest, data in runtime.data.items()}
    return out


def report(results: dict[str, Any]) -> None:
    print()
    print(f"{'':28}{'zstd -19 MB':>12}{'unpacked MB':>13}{'files':>7}")
    for name, r in results["initrds"].items():
        print(
            f"{name:28}{r['compressed_bytes'] / MB:12.2f}{r['uncompressed_bytes'] / MB:13.2f}{r['files']:7}"
        )
    for what, r in results["added"].items():
        added = ", ".join(f"{Path(p).name} ({s:,})" for p, s in r["files"].items())
        print(
            f"{what} adds {r['compressed_bytes'] / MB:.2f} MB compressed, "
            f"{r['uncompressed_bytes'] / MB:.2f} MB unpacked: {added}"
        )
    print(f"\nparts of {results['parts_of']}: {'share MB':>10}{'alone MB':>10}{'unpacked MB':>13}")
    for name, p in results["parts"].items():
        print(
            f"  {name:42}{p['compressed_share'] / MB:10.2f}{p['compressed_alone'] / MB:10.2f}"
            f"{p['unpacked_bytes'] / MB:13.2f}"
        )
    print(f"\ncompressions of {results['compression_of']}:")
    for name, c in results["compressions"].items():
        print(f"  {name:58}{c['bytes'] / MB:8.2f} MB  decompressed in {c['decompress_s']:.3f} s")
    print("\nthe standard library alone, compressed:")
    for name, size in results["stdlib_forms_compressed_alone"].items():
        print(f"  {name:50}{size / MB:8.3f} MB")
    for name, r in results.get("start_chrooted_s", {}).items():
        print(f"start-up, chrooted, {name}: median {r['median']:.3f} s")
    for name, r in results.get("vm", {}).items():
        print(
            f"VM, {name}: {r['initrd_bytes'] / MB:.2f} MB, unpacked in {r['unpack_s_median']:.2f} s; "
            f"the agent's start {r['first_start_s']} s first, then {r['later_starts_s_median']:.2f} s"
        )
    for name, r in results.get("p1_272_nodes", {}).items():
        if isinstance(r, dict):
            print(
                f"P1, 272 nodes, {name} initrd ({r['initrd_bytes'] / MB:.2f} MB): copy-if-needed "
                f"{r['cin']['makespan_s']:.1f} s, full copy {r['full']['makespan_s']:.1f} s (simulated)"
            )


if __name__ == "__main__":
    main()
