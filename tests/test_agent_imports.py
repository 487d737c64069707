"""The agent's deferred imports: every standard-library module it imports inside a function
(for its start-up time) is in slim.agent.DEFERRED, which the initrd's probe imports too, so
that the initrd has it; and what the agent imports when it starts stays small."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

from slim import agent

AGENT = Path(agent.__file__).resolve().parent
HTTPS_ONLY = {"ssl"}  # the initrd has it only when the registry has an https relay (agentrt)


def _deferred_imports(tree: ast.Module) -> set[str]:
    """Modules imported anywhere but at module level or under ``if TYPE_CHECKING:``."""
    found: set[str] = set()

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING":
                for stmt in child.orelse:
                    visit(stmt, nested)
                continue
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            if inner and isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif inner and isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.add(child.module)
            visit(child, inner)

    visit(tree, False)
    return {m for m in found if not m.startswith("slim")}


def test_every_import_inside_a_function_is_listed_as_deferred() -> None:
    found = {
        f"{path.name}: {m}"
        for path in sorted(AGENT.glob("*.py"))
        for m in _deferred_imports(ast.parse(path.read_text()))
        if m not in agent.DEFERRED and m not in HTTPS_ONLY
    }
    assert not found, f"add these to slim.agent.DEFERRED (agent/__init__.py): {sorted(found)}"
    for name in agent.DEFERRED:
        importlib.import_module(name)


def test_starting_the_agent_imports_none_of_the_deferred_modules() -> None:
    """What `python3 -S -m slim.agent` imports before it does anything (as the initrd
    starts it): none of DEFERRED, nor typing, logging or inspect."""
    code = "import sys, slim.agent.__main__; print(' '.join(sorted(sys.modules)))"
    root = AGENT.parent.parent
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], env={"PYTHONPATH": str(root)}, capture_output=True, text=True,
        check=True, timeout=60,
    ).stdout.split()  # fmt: skip
    loaded = set(out) & {*agent.DEFERRED, "typing", "logging"}
    assert not loaded, loaded
