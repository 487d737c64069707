"""The long fuzzing pass: atheris (libFuzzer, coverage-guided) over every parser target.

    ./run bench fuzz                       # 60 s per target (about 12 minutes)
    ./run bench fuzz --seconds 300         # longer
    ./run bench fuzz --target plan --target tar   # these again; the others keep their record

Each target of ``labs/fuzzing.py`` runs in a process of its own, for
--seconds, starting from a copy of its seeds (``tests/fuzz_seeds/<target>/``),
with the product's modules instrumented for coverage.  Only the parser's
declared errors are expected; anything else (or a property that fails) is a
crash, and an input that takes longer than --hang seconds is a hang: libFuzzer
stops that target and writes the input to a ``crash-*`` / ``timeout-*`` file
under --artifacts, which the record names.  Results (executions, executions
per second, libFuzzer's coverage counters ``cov``/``ft``, corpus size,
findings) go to docs/benchmarks/fuzz.json.  The CI pass is tests/test_fuzz.py
(hypothesis).  This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks" / "fuzz.json"


def child(name: str, libfuzzer_args: list[str]) -> None:
    """Run one target under atheris (this process ends when libFuzzer does)."""
    import atheris

    with atheris.instrument_imports(include=["slim", "labs", "tftpy", "yaml", "zstandard"]):
        from labs import fuzzing
    fuzzing.quiet()
    target = fuzzing.TARGETS[name]

    def one(data: bytes) -> None:
        fuzzing.run(target, data)

    atheris.Setup([sys.argv[0], *libfuzzer_args], one)
    atheris.Fuzz()


def _stat(text: str, key: str) -> int | None:
    m = re.search(rf"stat::{key}:\s*(\d+)", text)
    return int(m.group(1)) if m else None


def _last(text: str, key: str) -> int | None:
    found = re.findall(rf"\b{key}: (\d+)", text)
    return int(found[-1]) if found else None


def _finding(text: str, artifacts: Path, before: set[str]) -> dict[str, Any] | None:
    new = sorted(set(os.listdir(artifacts)) - before)
    if not new and "Uncaught Python exception" not in text and "ALARM" not in text:
        return None
    kind = "hang" if "ALARM" in text or any(n.startswith("timeout-") for n in new) else "crash"
    error = ""
    m = re.search(r"=== Uncaught Python exception: ===\n(?:.*\n)*?(\w[\w.]*(?:Error|Exception)[^\n]*)", text)
    if m:
        error = m.group(1)[:300]
    return {"kind": kind, "error": error, "inputs": new}


def run_target(name: str, seconds: float, hang: float, artifacts: Path) -> dict[str, Any]:
    from labs import fuzzing

    target = fuzzing.TARGETS[name]
    with tempfile.TemporaryDirectory(prefix=f"slim-fuzz-{name}-") as tmp:
        corpus = Path(tmp) / "corpus"
        shutil.copytree(fuzzing.SEEDS / name, corpus)
        before = set(os.listdir(artifacts))
        args = [
            str(corpus),
            f"-max_total_time={int(seconds)}",
            f"-timeout={int(hang)}",
            "-rss_limit_mb=2048",
            "-max_len=65536",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/{name}-",
        ]
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name, "--", *args],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=seconds + hang + 120,
            check=False,
            cwd=ROOT,
        )
        wall = time.monotonic() - started
        text = proc.stderr + "\n" + proc.stdout  # libFuzzer: stderr; the Python exception: stdout
        executions = _stat(text, "number_of_executed_units") or _last(text, "#") or 0
        finding = _finding(text, artifacts, before) if proc.returncode != 0 else None
        if proc.returncode != 0 and finding is None:
            finding = {"kind": "error", "error": text.strip().splitlines()[-1][:300], "inputs": []}
        return {
            "parser": target.parser,
            "declared": [e.__name__ for e in target.declared],
            "seeds": len(target.seeds()),
            "seconds": round(wall, 1),
            "executions": executions,
            "executions_per_second": round(executions / wall) if wall else 0,
            "coverage_edges": _last(text, "cov"),
            "coverage_features": _last(text, "ft"),
            "corpus": len(os.listdir(corpus)),
            "findings": [finding] if finding else [],
        }


def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        rest = sys.argv[i + 2 :]
        child(sys.argv[i + 1], rest[1:] if rest[:1] == ["--"] else rest)
        return
    from labs import fuzzing

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60, help="fuzzing time per target (default 60)")
    ap.add_argument("--hang", type=float, default=10, help="seconds one input may take before it is a hang")
    ap.add_argument(
        "--target", action="append", choices=sorted(fuzzing.TARGETS), help="only these targets (repeatable)"
    )
    ap.add_argument(
        "--artifacts",
        type=Path,
        default=Path(tempfile.gettempdir()) / "slim-fuzz-artifacts",
        help="where crashing or hanging inputs are written",
    )
    ap.add_argument(
        "--out", type=Path, default=OUT, help="the JSON record (default docs/benchmarks/fuzz.json)"
    )
    args = ap.parse_args()
    args.artifacts.mkdir(parents=True, exist_ok=True)
    names = args.target or list(fuzzing.TARGETS)
    results: dict[str, Any] = {}
    for name in names:
        print(f"fuzzing {name} for {args.seconds:g}s ...", flush=True)
        results[name] = r = run_target(name, args.seconds, args.hang, args.artifacts)
        print(
            f"  {r['executions']} executions ({r['executions_per_second']}/s), cov {r['coverage_edges']}, "
            f"ft {r['coverage_features']}, corpus {r['corpus']}, findings {len(r['findings'])}",
            flush=True,
        )
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "fuzzer": f"atheris {version('atheris')} (libFuzzer)",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "seconds_per_target": args.seconds,
        "hang_seconds": args.hang,
        "targets": results,
        "total_executions": sum(r["executions"] for r in results.values()),
        "total_findings": sum(len(r["findings"]) for r in results.values()),
    }
    if args.target and args.out.exists():  # some targets again: the others keep their record
        old = json.loads(args.out.read_text())
        merged: dict[str, Any] = {**old.get("targets", {}), **results}
        doc["targets"] = merged
        doc["total_executions"] = sum(r["executions"] for r in merged.values())
        doc["total_findings"] = sum(len(r["findings"]) for r in merged.values())
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
