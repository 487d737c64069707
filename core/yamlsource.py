"""Load YAML keeping the line of every key, and refusing duplicate keys.

PyYAML silently keeps the last of two equal keys; in a registry that hides a
mistake (two nodes named alike, two policies for one directory), so a
duplicate key is an error here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slim.errors import ConfigError, Problem

Loc = tuple[str | int, ...]


@dataclass
class YamlSource:
    """A parsed YAML document and the line (1-based) of every path in it."""

    file: str
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: Loc) -> int | None:
        """The line of ``loc``, or of its nearest ancestor that has one."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:end]))
            if line is not None:
                return line
        return None

    def problem(self, loc: Loc, message: str) -> Problem:
        return Problem(self.file, self.line_of(loc), format_loc(loc), message)


def format_loc(loc: Loc) -> str:
    """``("environments", "base", "directories", "/usr")`` → ``environments.base.directories[/usr]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.replace("_", "").replace("-", "").isalnum() and out:
            out += f".{part}"
        elif not out:
            out = part
        else:
            out += f"[{part}]"
    return out or "(document)"


def load_yaml_text(text: str, file: str) -> YamlSource:
    """Parse ``text``; ConfigError names the file, the line and what is wrong."""
    try:
        loader = yaml.SafeLoader(text)  # refuses control characters at once
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(file, None, "(syntax)", str(exc).replace("\n", " "))]) from None
    try:
        return _load(loader, file)
    except RecursionError:  # PyYAML's composer and constructor recurse once per level
        raise ConfigError([Problem(file, None, "(syntax)", "nested too deeply")]) from None
    finally:
        loader.dispose()


def _load(loader: yaml.SafeLoader, file: str) -> YamlSource:
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = exc.problem or exc.context or "invalid YAML"
        raise ConfigError([Problem(file, line, "(syntax)", what)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(file, None, "(syntax)", str(exc))]) from None
    if root is None:
        return YamlSource(file, {})
    source = YamlSource(file, None)
    problems: list[Problem] = []
    _index(loader, root, (), source.lines, problems, file, set())
    if problems:
        raise ConfigError(problems)
    try:
        source.data = loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise ConfigError(
            [Problem(file, mark.line + 1 if mark else None, "(syntax)", str(exc.problem))]
        ) from None
    except (ValueError, OverflowError) as exc:  # a date like 2001-13-45, an int of 5000 digits
        raise ConfigError([Problem(file, None, "(syntax)", f"a value cannot be read: {exc}")]) from None
    return source


def load_yaml_file(path: str | Path) -> YamlSource:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem(str(p), None, "(file)", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(str(p), None, "(file)", f"cannot read: {exc}")]) from None
    return load_yaml_text(text, str(p))


def _index(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    loc: Loc,
    lines: dict[Loc, int],
    problems: list[Problem],
    file: str,
    seen_nodes: set[int],
) -> None:
    # An alias makes the composer hand out the same node twice.  Aliases are
    # refused: a registry should read as it is, and an alias can loop forever
    # or expand exponentially ("billion laughs").
    if id(node) in seen_nodes and isinstance(node, yaml.MappingNode | yaml.SequenceNode):
        problems.append(
            Problem(
                file, node.start_mark.line + 1, format_loc(loc), "YAML anchors and aliases are not supported"
            )
        )
        return
    seen_nodes.add(id(node))
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(
                    Problem(file, key_node.start_mark.line + 1, format_loc(loc), "keys must be plain")
                )
                continue
            key = str(loader.construct_scalar(key_node))
            line = key_node.start_mark.line + 1
            if key == "<<":
                problems.append(Problem(file, line, format_loc(loc), "YAML merge keys are not supported"))
                continue
            if key in seen:
                problems.append(
                    Problem(
                        file,
                        line,
                        format_loc((*loc, key)),
                        f"duplicate key {key!r} (first given on line {seen[key]})",
                    )
                )
                continue
            seen[key] = line
            lines[(*loc, key)] = line
            _index(loader, value_node, (*loc, key), lines, problems, file, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(loader, item, (*loc, i), lines, problems, file, seen_nodes)
