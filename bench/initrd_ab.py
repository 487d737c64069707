"""The agent's initrd of another checkout against this one's, in the same run: the agent's
start chrooted and the VM's boot (the kernel's unpacking, the agent's starts), alternated.

    PYTHONPATH=. .venv/bin/python bench/initrd_ab.py --before /path/to/old-checkout [--boots 5]

(as root: chroot and QEMU; `git worktree add /tmp/old REV` makes the other checkout).  Each
checkout builds its own initrd with its own code (bench/initrd_size.py's builder: the VM
test's 22 modules and the start loop of its --vm), so a change to the runtime is measured
against what it replaced on the same machine at the same time: figures of separate runs
differ by 10 % and more here.  Writes docs/benchmarks/initrd_ab.json (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
OUT_DIR = HERE / "docs" / "benchmarks"

# Run with a checkout's own code: its initrd for the VM, its runtime unpacked for chroot.
_BUILD = """
import sys
from pathlib import Path
checkout, image, root = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
sys.path[:0] = [checkout, checkout + "/bench"]
import initrd_size as b
from labs import initrdroot
from slim.core.build.agentrt import AGENT_ROOT, add_runtime, collect
from slim.core.build.image import default_cache_dir
from slim.core.build.initrd import CpioArchive
from slim.signing import SigningKey
rt = collect(build_cache=default_cache_dir())
if rt.warnings:
    raise SystemExit(f"not the build's runtime: {rt.warnings}")
rt.trust([SigningKey.load_or_create(image.parent / "keys").public])
kernel = b.kernel_modules(None, image.parent)
if kernel is None:
    raise SystemExit("no kernel package in SLIM's cache")
init = b.VM_INIT.format(root=AGENT_ROOT, imports=b.IMPORTS)
image.write_bytes(b.zstd_whole(b.cpio(b.builder(rt, (kernel[0], kernel[1]), init))))
archive = CpioArchive()
add_runtime(archive, rt)
initrdroot.unpack(archive, root)
print(kernel[2])
"""


def build(checkout: Path, work: Path) -> tuple[Path, Path, Path]:
    """``checkout``'s initrd (for the VM), its runtime unpacked (for chroot), and the kernel."""
    work.mkdir()
    image, root = work / "initrd.img", work / "root"
    out = subprocess.run(
        [sys.executable, "-c", _BUILD, str(checkout), str(image), str(root)],
        capture_output=True, text=True, check=False, cwd=checkout,
        env={**os.environ, "PYTHONPATH": str(checkout)},
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"{checkout}: {out.stderr.strip()[-1500:]}")
    return image, root, Path(out.stdout.strip().splitlines()[-1])


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--before", type=Path, required=True, help="the other checkout (a git worktree)")
    parser.add_argument("--boots", type=int, default=5, help="VM boots of each initrd (default 5)")
    parser.add_argument("--starts", type=int, default=15, help="chrooted starts of each (default 15)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    sys.path[:0] = [str(HERE), str(HERE / "bench")]
    import initrd_size as b

    def rev(checkout: Path) -> str:
        argv = ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"]
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()

    checkouts = {"before": args.before.resolve(), "after": HERE}
    with tempfile.TemporaryDirectory(prefix="initrd-ab.") as tmp:
        built = {name: build(path, Path(tmp) / name) for name, path in checkouts.items()}
        kernel = built["after"][2]
        starts: dict[str, list[float]] = {name: [] for name in built}
        for _, root, _ in built.values():
            b.chrooted_start(root)  # the page cache warm for both
        for _ in range(args.starts):
            for name, (_, root, _) in built.items():
                starts[name].append(round(b.chrooted_start(root), 4))
        boots: dict[str, list[dict[str, Any]]] = {name: [] for name in built}
        for _ in range(args.boots):
            for name, (image, _, _) in built.items():
                boots[name].append(b.vm_boot(kernel, image))
                print(name, boots[name][-1], flush=True)
        results: dict[str, Any] = {
            "benchmark": "the agent's initrd of two checkouts, alternated in one run",
            "command": " ".join(["python", "bench/initrd_ab.py", *sys.argv[1:]]),
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": {"cpus": os.cpu_count()},
        }
        for name, (image, _, _) in built.items():
            runs = boots[name]
            later = [s for r in runs for s in r["starts_s"][1:]]
            results[name] = {
                "revision": rev(checkouts[name]),
                "initrd_bytes": image.stat().st_size,
                "start_chrooted_s": {
                    "median": round(statistics.median(starts[name]), 4),
                    "runs": starts[name],
                },
                "vm": {
                    "unpack_s_median": round(statistics.median(r["unpack_s"] for r in runs), 3),
                    "first_start_s_median": round(statistics.median(r["starts_s"][0] for r in runs), 3),
                    "unpack_and_first_start_s_median": round(
                        statistics.median(r["unpack_s"] + r["starts_s"][0] for r in runs), 3
                    ),
                    "later_starts_s_median": round(statistics.median(later), 3),
                    "boots": runs,
                },
            }
            summary = {k: v for k, v in results[name].items() if k != "vm"}
            print(name, json.dumps(summary), results[name]["vm"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "initrd_ab.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out / 'initrd_ab.json'}")


if __name__ == "__main__":
    main()
