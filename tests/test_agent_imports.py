"""The agent's deferred imports: every standard-library module it imports inside a function
(for its start-up time) is in slim.agent.DEFERRED, which the initrd's probe imports too, so
that the initrd has it; and what the agent imports when it starts stays small."""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from slim import agent
from slim.agent import __main__ as agent_main

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
    starts it): none of DEFERRED (argparse among them), nor typing, logging, dataclasses or
    inspect."""
    code = "import sys, slim.agent.__main__; print(' '.join(sorted(sys.modules)))"
    root = AGENT.parent.parent
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], env={"PYTHONPATH": str(root)}, capture_output=True, text=True,
        check=True, timeout=60,
    ).stdout.split()  # fmt: skip
    loaded = set(out) & {*agent.DEFERRED, "typing", "logging", "dataclasses", "inspect"}
    assert not loaded, loaded


WORDS = [
    "--node", "--relay", "--trust", "--target", "--no-reboot", "--follow-endorsements", "--ca",
    "--cmdline", "--state-dir", "--cache-dir", "--token-file", "--targ", "--no-reboot=1", "--",
    "-h", "n1", "http://127.0.0.1:1", "-x", "", "a=b", "--node=n2", "--relay=", "--trust=k.pub",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=8))
def test_the_agent_reads_its_command_line_as_argparse_does(argv: list[str]) -> None:
    """The agent reads its usual command lines itself (argparse is not imported): whatever
    the command line, the result is argparse's, or argparse's own error."""

    def parsed(parse: Callable[[list[str]], object]) -> object:
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                return vars(parse(argv))
        except SystemExit as exc:
            return ("exit", exc.code, out.getvalue(), err.getvalue())

    assert parsed(agent_main.parse_args) == parsed(agent_main._argparse)
