"""What the plan verifier and HTTPS add to the agent's initrd, side by side in one run.

    ./run bench initrd          # = PYTHONPATH=. .venv/bin/python bench/initrd_size.py (seconds)

Three initrds of the agent's runtime, built as ``slim ee build`` builds them
(core/build/agentrt.py's ``collect`` and ``add_runtime``, one zstd frame at the build's
level 19, :class:`slim.core.build.initrd.InitrdBuilder`) from this machine's files:

- **without the verifier**: no ``signify-openbsd`` (such an initrd refuses every plan; it
  is only the baseline);
- **with the verifier**: what every initrd carries today (signify and the core's key);
- **with the verifier and ssl**: what a registry with an ``https://`` relay URL gets:
  Python's ``ssl``, ``_ssl`` and OpenSSL's ``libssl``/``libcrypto``, and SLIM's CA
  certificate.

No kernel modules (they depend on the image and the hardware profile, and are the same
in all three: the VM benchmark's initrd had 22).  Sizes in bytes and MB (1e6); the files
each step adds, with their sizes.  Results: docs/benchmarks/initrd_size.json.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slim.core.build.agentrt import PYTHON, Runtime, add_runtime, collect
from slim.core.build.initrd import InitrdBuilder
from slim.pki import CertificateAuthority
from slim.signing import SigningKey

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "docs" / "benchmarks"
LEVEL = 19  # what the build uses (InitrdBuilder.write's default)


def build(runtime: Runtime) -> dict[str, Any]:
    builder = InitrdBuilder()
    add_runtime(builder, runtime)
    t0 = time.perf_counter()
    info = builder.write(io.BytesIO(), level=LEVEL)
    return {
        "compressed_bytes": info.compressed_size,
        "uncompressed_bytes": info.uncompressed_size,
        "files": info.files,
        "seconds_to_compress": round(time.perf_counter() - t0, 2),
    }


def sizes(runtime: Runtime) -> dict[str, int]:
    """Each file of the runtime and its size (data written as bytes included)."""
    out = {dest: src.stat().st_size for dest, src in runtime.files.items()}
    out |= {dest: len(data) for dest, data in runtime.data.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="where initrd_size.json goes")
    args = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="slim-bench-initrd-") as tmp:
        key = SigningKey.load_or_create(Path(tmp) / "keys").public  # a throwaway key and CA
        ca = CertificateAuthority.init(Path(tmp) / "ca").cert_pem
    variants: dict[str, Runtime] = {
        "without_verifier": collect(signify=None),
        "with_verifier": collect(),
        "with_verifier_and_ssl": collect(https=True),
    }
    for name, runtime in variants.items():
        runtime.trust([key])
        if name == "with_verifier_and_ssl":
            runtime.trust_ca(ca)
    results: dict[str, Any] = {
        "benchmark": "the agent's initrd: without the plan verifier, with it, with it and ssl",
        "command": " ".join(["python", "bench/initrd_size.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"platform": platform.platform()},
        "initrd_python": subprocess.run(
            [str(PYTHON), "-c", "import sys, ssl; print(sys.version.split()[0], ssl.OPENSSL_VERSION)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip(),
        "zstd_level": LEVEL,
        "notes": [
            "the agent's runtime only (busybox, zstd, python3 and the modules the agent imports, the "
            "agent); no kernel modules, which are the same in all three",
            "1 MB = 1e6 bytes",
        ],
        "initrds": {},
        "added": {},
    }
    for name, runtime in variants.items():
        results["initrds"][name] = build(runtime)
        print(f"{name:24} {results['initrds'][name]}", flush=True)
    steps = [
        ("verifier", "without_verifier", "with_verifier"),
        ("ssl", "with_verifier", "with_verifier_and_ssl"),
    ]
    for what, before, after in steps:
        a, b = results["initrds"][before], results["initrds"][after]
        old, new = sizes(variants[before]), sizes(variants[after])
        results["added"][what] = {
            "compressed_bytes": b["compressed_bytes"] - a["compressed_bytes"],
            "uncompressed_bytes": b["uncompressed_bytes"] - a["uncompressed_bytes"],
            "files": {path: size for path, size in sorted(new.items()) if path not in old},
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "initrd_size.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    mb = 1e6
    print(f"{'':24}{'zstd -19 MB':>12}{'unpacked MB':>13}{'files':>7}")
    for name, r in results["initrds"].items():
        print(
            f"{name:24}{r['compressed_bytes'] / mb:12.2f}{r['uncompressed_bytes'] / mb:13.2f}{r['files']:7}"
        )
    for what, r in results["added"].items():
        added = ", ".join(f"{Path(p).name} ({s:,})" for p, s in r["files"].items())
        print(
            f"{what} adds {r['compressed_bytes'] / mb:.2f} MB compressed, "
            f"{r['uncompressed_bytes'] / mb:.2f} MB unpacked: {added}"
        )
    shown = args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out
    print(f"wrote {shown}/initrd_size.json")


if __name__ == "__main__":
    main()
