"""Write docs/cli.md from the `slim` command's own help texts.

python tools/clidoc.py           # regenerate docs/cli.md
python tools/clidoc.py --check   # exit 1 if docs/cli.md is stale (run by the tests)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import click
from click.testing import CliRunner

from slim.cli import main as slim_main

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
HEADER = """\
# The `slim` command

Generated from the command's own help by `python tools/clidoc.py`; a test
checks it is current.  Admin commands talk to a running core (`--core
HOST:PORT` or `$SLIM_CORE`, default 127.0.0.1:50051), print tables or, with
`--json`, JSON; errors print `error: ...` and exit with status 1.
"""


def commands(cmd: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            yield from commands(cmd.commands[name], (*path, name))


def render() -> str:
    runner = CliRunner(env={"COLUMNS": "100"})
    parts = [HEADER]
    for path in commands(slim_main):
        result = runner.invoke(slim_main, [*path, "--help"], prog_name="slim")
        if result.exit_code != 0:
            raise SystemExit(f"slim {' '.join(path)} --help failed: {result.output}")
        parts.append(f"## slim {' '.join(path)}".rstrip() + "\n\n```\n" + result.output.rstrip() + "\n```\n")
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python tools/clidoc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
