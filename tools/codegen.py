"""Generate slim/v1 (messages, gRPC stubs and their type stubs) from protos/slim/v1.

    python tools/codegen.py           # regenerate in place (commit the result)
    python tools/codegen.py --check   # exit 1 if the committed code is stale

Uses the pinned grpcio-tools and mypy-protobuf from constraints.txt, so the
output is reproducible.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "slim" / "v1"
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every .proto under protos/slim/v1 into ``out_root``; return the files."""
    protos = sorted(PROTOS.glob("slim/v1/*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTOS / 'slim' / 'v1'}")
    bindir = Path(sys.executable).parent
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTOS}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(str(p.relative_to(PROTOS)) for p in protos),
    ]
    subprocess.run(cmd, check=True, cwd=PROTOS)
    return sorted(p for p in (out_root / "slim" / "v1").iterdir() if p.name.endswith(GENERATED))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        current = sorted(p for p in OUT.iterdir() if p.name.endswith(GENERATED))
        if args.check:
            stale = [
                p.name
                for p in fresh
                if not (OUT / p.name).exists() or not filecmp.cmp(p, OUT / p.name, shallow=False)
            ]
            extra = sorted({p.name for p in current} - {p.name for p in fresh})
            if stale or extra:
                print(f"slim/v1 is stale (changed: {stale}, not generated: {extra}); run ./run codegen")
                return 1
            print("slim/v1 is up to date")
            return 0
        for p in current:
            p.unlink()
        for p in fresh:
            shutil.copyfile(p, OUT / p.name)
            print(f"wrote {(OUT / p.name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
