"""What `pip install .` installs: every product module, no lab, and a `slim` command that
lists only product commands (the labs live in labs/, run from a checkout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import ROOT

PRODUCT = {"slim": ROOT / "slim", "slim/core": ROOT / "core", "slim/relay": ROOT / "relay",
           "slim/agent": ROOT / "agent", "slim/plugin": ROOT / "plugin"}  # fmt: skip
LINKS = {"core", "relay", "agent", "plugin"}  # slim/core -> ../core etc.
COMMANDS = {
    "admin",
    "ca",
    "core",
    "dhcp",
    "ee",
    "harvest",
    "keys",
    "media",
    "nfs",
    "node",
    "profile",
    "registry",
    "relay",
    "serve",
    "simulate",
    "slurm",
    "store",
}


def product_modules() -> set[str]:
    """Every .py file of the product as the wheel names it (slim/core/control/server.py)."""
    out = set()
    for prefix, folder in PRODUCT.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder)
            if prefix == "slim" and rel.parts[0] in LINKS:
                continue  # the symbolic links: counted under their own folder
            out.add(f"{prefix}/{rel}")
    return out


@pytest.mark.slow
def test_the_wheel_holds_the_product_and_no_lab(tmp_path: Path) -> None:
    # built from a copy of the files git tracks, as they are: nothing left in the checkout,
    # nothing stale (a build/ directory) taken
    source = tmp_path / "source"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    for name in filter(None, listed.stdout.decode().split("\0")):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name, follow_symlinks=False)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(source)],
        check=True, capture_output=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("slim-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert product_modules() <= names, sorted(product_modules() - names)
    assert not {n for n in names if n.startswith(("labs/", "tests/", "bench/", "tools/"))}
    assert {"slim/py.typed", "slim/v1/core_pb2.pyi"} <= names

    # installed on its own, the package imports no lab and offers only product commands
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}

    def python(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )

    where = python("import slim.core.control.server as s; print(s.__file__)")
    assert where.returncode == 0 and where.stdout.startswith(str(target)), where
    for lab in ("labs", "labs.vmlab", "slim.vmlab", "slim.stormlab", "slim.demo", "slim.core.table2"):
        found = python(f"import {lab}")
        assert found.returncode != 0 and "ModuleNotFoundError" in found.stderr, (lab, found)
    helped = subprocess.run(
        [sys.executable, "-m", "slim.cli", "--help"], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert helped.returncode == 0, helped.stderr
    commands = {
        line.split()[0] for line in helped.stdout.split("Commands:", 1)[1].splitlines() if line.strip()
    }
    assert commands == COMMANDS


def test_every_package_folder_is_a_package_in_git() -> None:
    """Each folder of the product with Python files has its __init__.py, and git tracks it
    (a namespace package would import here and be missing from the wheel and the contracts)."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    files = set(tracked.stdout.splitlines())
    for folder in [*PRODUCT.values(), ROOT / "labs"]:
        for init_dir in {p.parent for p in folder.rglob("*.py")}:
            if "v1" in init_dir.parts and init_dir.name != "v1":
                continue
            init = (init_dir / "__init__.py").relative_to(ROOT)
            if init.parts[0] == "slim" and len(init.parts) > 2 and init.parts[1] in LINKS:
                continue  # seen through the symbolic link: checked under its own folder
            assert str(init) in files, f"{init} is missing or not tracked by git"
