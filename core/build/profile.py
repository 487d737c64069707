"""The paper's EE profiler: Table 2 for any image, and the registry policies it suggests.

:func:`profile_image` walks an image (with :func:`slim.agent.tree.scan`) and
reports, per top-level entry, how many files and bytes it holds, whether it is
read-only or modified at run time, and the policy the paper would give it:
read-only system directories are mounted over NFS, directories modified at run
time are copied to the node (``ram`` by default), and user data is shared over
NFS (paper, sections 4.3 and 4.4).  The classification is the table
:data:`RULES` (standard FHS names), plus two structural rules: a symbolic link
follows the directory it points to, and an empty directory is a mount point.
An administrator who disagrees writes the environment's ``directories:`` in the
registry; :meth:`Profile.registry_snippet` gives a starting point.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from slim.agent import tree
from slim.errors import InvalidArgument, NotFound
from slim.vocabulary import Policy

MIB = 1 << 20  # a "MB" of the paper's Table 2, as du -m counts

READ_ONLY = "read-only"
READ_WRITE = "read/write"
VIRTUAL = "virtual"
SHARED = "shared"
UNKNOWN = "unknown"
ACCESS_CLASSES = (READ_ONLY, READ_WRITE, VIRTUAL, SHARED, UNKNOWN)

DIR = "dir"
SYMLINK = "symlink"
FILES = "files"  # the row of non-directory entries directly in the image's root
ROOT_FILES = "/"


@dataclass(frozen=True, slots=True)
class Rule:
    access: str
    why: str


_RO_SYSTEM = "changed only by package updates"
RULES: dict[str, Rule] = {
    # read-only: programs, libraries and data of the installed system (FHS "static")
    "bin": Rule(READ_ONLY, f"essential commands; {_RO_SYSTEM}"),
    "sbin": Rule(READ_ONLY, f"system commands; {_RO_SYSTEM}"),
    "lib": Rule(READ_ONLY, f"libraries and kernel modules; {_RO_SYSTEM}"),
    "lib32": Rule(READ_ONLY, f"32-bit libraries; {_RO_SYSTEM}"),
    "lib64": Rule(READ_ONLY, f"64-bit libraries; {_RO_SYSTEM}"),
    "libx32": Rule(READ_ONLY, f"x32 libraries; {_RO_SYSTEM}"),
    "usr": Rule(READ_ONLY, f"programs and data; {_RO_SYSTEM}"),
    "boot": Rule(READ_ONLY, "kernels and boot loader; nodes boot from the network"),
    "opt": Rule(READ_ONLY, f"add-on packages; {_RO_SYSTEM}"),
    # read/write: what a running system modifies (FHS "variable")
    "etc": Rule(READ_WRITE, "host configuration, written at boot (mtab, resolv.conf)"),
    "var": Rule(READ_WRITE, "logs, spools, caches and state"),
    "dev": Rule(READ_WRITE, "a static /dev: nodes and permissions change at run time"),
    "root": Rule(READ_WRITE, "the administrator's home, written at run time"),
    "srv": Rule(READ_WRITE, "data served by this system, which services may write"),
    # shared: user data
    "home": Rule(SHARED, "user data, the same on every node"),
    # virtual: mounted at run time, or mount points
    "proc": Rule(VIRTUAL, "the kernel's process file system, mounted at boot"),
    "sys": Rule(VIRTUAL, "the kernel's sysfs, mounted at boot"),
    "run": Rule(VIRTUAL, "run-time state on a tmpfs mounted at boot"),
    "tmp": Rule(VIRTUAL, "scratch space, emptied at boot"),
    "mnt": Rule(VIRTUAL, "mount point for temporary file systems"),
    "media": Rule(VIRTUAL, "mount points for removable media"),
    "lost+found": Rule(VIRTUAL, "fsck's directory for recovered files"),
    "selinux": Rule(VIRTUAL, "mount point of selinuxfs (Fedora)"),
    "initrd": Rule(VIRTUAL, "mount point of the old initrd after pivot_root (Fedora Core)"),
    "misc": Rule(VIRTUAL, "autofs mount point"),
    "net": Rule(VIRTUAL, "autofs mount point"),
}
EMPTY_RULE = Rule(VIRTUAL, "empty: a mount point or placeholder")
UNKNOWN_RULE = Rule(UNKNOWN, "not a standard (FHS) directory")


@dataclass(frozen=True, slots=True)
class DirectoryProfile:
    """One row: a top-level directory, a top-level symbolic link, or the files in ``/``."""

    path: str  # "/usr"; "/" for the row of files directly in the root
    kind: str  # DIR, SYMLINK or FILES
    access: str  # one of ACCESS_CLASSES (a symlink: that of the directory it follows)
    policy: str | None  # a registry policy; None for a symlink (it travels with "/")
    reason: str  # one line: why this class and this policy
    files: int = 0  # non-directory entries of every kind (a symlink row: 1, itself)
    bytes: int = 0  # bytes of regular files; a hard-linked file once
    target: str | None = None  # a symlink's target, as written
    follows: str | None = None  # the top-level directory a symlink resolves into

    @property
    def name(self) -> str:
        return self.path.lstrip("/")


@dataclass(frozen=True, slots=True)
class Profile:
    root: str
    default_policy: str  # the policy of "/": everything the registry does not list
    rows: tuple[DirectoryProfile, ...]
    notes: tuple[str, ...] = ()  # what the walk left out (sockets, other file systems)

    @property
    def files(self) -> int:
        return sum(r.files for r in self.rows)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    def row(self, path: str) -> DirectoryProfile:
        want = "/" + path.strip("/")
        for r in self.rows:
            if r.path == want:
                return r
        raise NotFound(f"{self.root} has no top-level entry {want}")

    def files_pct(self, row: DirectoryProfile) -> float:
        return _pct(row.files, self.files)

    def bytes_pct(self, row: DirectoryProfile) -> float:
        return _pct(row.bytes, self.bytes)

    def share(self, access: str) -> tuple[int, int]:
        """(files, bytes) of the rows of class ``access``."""
        rows = [r for r in self.rows if r.access == access]
        return sum(r.files for r in rows), sum(r.bytes for r in rows)

    @property
    def read_only_files_pct(self) -> float:
        return _pct(self.share(READ_ONLY)[0], self.files)

    @property
    def read_only_bytes_pct(self) -> float:
        return _pct(self.share(READ_ONLY)[1], self.bytes)

    def listed(self) -> list[DirectoryProfile]:
        """The directories the registry must name: those whose policy is not the default."""
        return [
            r for r in self.rows if r.kind == DIR and r.policy is not None and r.policy != self.default_policy
        ]

    def as_json(self) -> dict[str, Any]:
        ro_files, ro_bytes = self.share(READ_ONLY)
        return {
            "root": self.root,
            "default_policy": self.default_policy,
            "mb": MIB,
            "totals": {"files": self.files, "bytes": self.bytes},
            "read_only": {
                "files": ro_files,
                "bytes": ro_bytes,
                "files_pct": round(self.read_only_files_pct, 2),
                "bytes_pct": round(self.read_only_bytes_pct, 2),
            },
            "directories": [
                {
                    "path": r.path,
                    "kind": r.kind,
                    "target": r.target,
                    "follows": r.follows,
                    "access": r.access,
                    "policy": r.policy,
                    "reason": r.reason,
                    "files": r.files,
                    "bytes": r.bytes,
                    "files_pct": round(self.files_pct(r), 2),
                    "bytes_pct": round(self.bytes_pct(r), 2),
                }
                for r in self.rows
            ],
            "notes": list(self.notes),
        }

    def registry_snippet(self, indent: int = 0) -> str:
        """The environment's ``default_policy:`` and ``directories:`` as YAML, ready to
        paste under ``environments.<name>:`` (``indent`` spaces before every line)."""
        lines = [
            f"# From `slim profile {self.root}`: paste under environments.<name> in the registry",
            "# (docs/registry.md).  Directories not listed follow default_policy.",
            f"default_policy: {self.default_policy}",
        ]
        listed = self.listed()
        lines.append("directories:" if listed else "directories: {}")
        for r in listed:
            summary = f"{r.access}: {r.files} files, {r.bytes / MIB:.1f} MB"
            lines.append(f"  {_yaml_key(r.path)}: {r.policy}  # {summary}")
        rest = [r for r in self.rows if r not in listed]
        if rest:
            lines.append(f"# not listed, so {self.default_policy} (default_policy):")
            for r in rest:
                what = f"{_yaml_key(r.path)} {r.access}, {r.files} files, {r.bytes / MIB:.1f} MB"
                if r.kind == SYMLINK:
                    target = _yaml_key(r.target or "")
                    what = f"{_yaml_key(r.path)} -> {target} (symlink, follows {r.follows or 'nothing'})"
                lines.append(f"#   {what}")
        pad = " " * indent
        return "".join(f"{pad}{line}\n" for line in lines)


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def _yaml_key(path: str) -> str:
    """``path`` as a plain YAML scalar if it is one, else double-quoted (JSON escapes)."""
    return path if re.fullmatch(r"[A-Za-z0-9._+/-]+", path) else json.dumps(path)


def classify(name: str, files: int) -> Rule:
    """The access class of the top-level directory ``name`` holding ``files`` entries."""
    rule = RULES.get(name)
    if files == 0 and (rule is None or rule.access != SHARED):
        if rule is not None and rule.access == VIRTUAL:
            return rule
        return EMPTY_RULE
    return rule or UNKNOWN_RULE


def recommend(access: str, copy_policy: str) -> tuple[str, str]:
    """(policy, why) for a directory of class ``access``."""
    if access == READ_ONLY:
        return Policy.NFS.value, "NFS, read-only (paper 4.3)"
    if access == SHARED:
        return copy_policy, (
            "user data: the EE mounts the site's file server here (fstab, autofs); "
            "SLIM's own exports are read-only images"
        )
    if access == READ_WRITE:
        return copy_policy, "copied, so writes stay on the node"
    if access == VIRTUAL:
        return copy_policy, "travels with / as an empty directory"
    return copy_policy, "copied to be safe; check whether it is written"


def profile_image(
    root: Path,
    progress: Callable[[str], None] | None = None,
    *,
    copy_policy: str = Policy.RAM.value,
) -> Profile:
    """Profile the image at ``root`` (its top-level directories, like the paper's Table 2).

    ``progress(path)`` is called with each directory as the walk enters it
    ("/", "/usr", "/usr/bin", ...).  ``copy_policy`` is what directories
    modified at run time get, and the profile's ``default_policy``.
    """
    try:
        copy = Policy(copy_policy)
    except ValueError:
        raise InvalidArgument(f"unknown policy {copy_policy!r} (known: ram, disk, sync, nfs)") from None
    if copy is Policy.NFS:
        raise InvalidArgument("the copy policy must copy (ram, disk or sync), not nfs")
    root = Path(root)
    if not root.exists():
        raise NotFound(f"no image at {root}")
    if not root.is_dir():
        raise InvalidArgument(f"{root} is not a directory")

    tops: dict[str, tree.Entry] = {}
    files: dict[str, int] = {}
    sizes: dict[str, int] = {}
    report = tree.ScanReport()
    on_dir = (lambda rel: progress("/" + rel)) if progress is not None else None
    for entry in tree.scan(root, report=report, on_dir=on_dir):
        top, sep, _ = entry.path.partition("/")
        if not sep:
            tops[top] = entry
            if entry.kind in (tree.DIR, tree.SYMLINK):
                files.setdefault(top, 0)
                sizes.setdefault(top, 0)
                if entry.kind == tree.DIR:
                    continue
            else:
                top = ROOT_FILES
        if entry.kind == tree.DIR:
            continue
        files[top] = files.get(top, 0) + 1
        if entry.kind == tree.FILE:
            sizes[top] = sizes.get(top, 0) + entry.size

    rows: list[DirectoryProfile] = []
    classes: dict[str, str] = {}
    for name, entry in tops.items():
        if entry.kind != tree.DIR:
            continue
        rule = classify(name, files[name])
        policy, why = recommend(rule.access, copy.value)
        classes[name] = rule.access
        rows.append(
            DirectoryProfile(
                f"/{name}", DIR, rule.access, policy, f"{rule.why}; {why}", files[name], sizes[name]
            )
        )
    for name, entry in tops.items():
        if entry.kind != tree.SYMLINK:
            continue
        follows = _follows(name, tops)
        access = classes.get(follows, UNKNOWN) if follows else UNKNOWN
        why = (
            f"symbolic link into /{follows}: not a separate directory; the link travels with /"
            if follows
            else "symbolic link to no top-level directory of the image; the link travels with /"
        )
        rows.append(
            DirectoryProfile(
                f"/{name}",
                SYMLINK,
                access,
                None,
                why,
                files[name],
                sizes[name],
                target=entry.target,
                follows=f"/{follows}" if follows else None,
            )
        )
    if ROOT_FILES in files:
        why = "files directly in /; " + recommend(UNKNOWN, copy.value)[1]
        rows.append(
            DirectoryProfile(
                ROOT_FILES, FILES, UNKNOWN, copy.value, why, files[ROOT_FILES], sizes.get(ROOT_FILES, 0)
            )
        )
    rows.sort(key=lambda r: os.fsencode(r.name))
    notes = [f"/{p}: another file system, its contents not counted" for p in report.other_filesystems]
    notes += [f"/{p}: a socket, not counted" for p in report.sockets]
    return Profile(os.fspath(root), copy.value, tuple(rows), tuple(notes))


def _follows(name: str, tops: dict[str, tree.Entry]) -> str | None:
    """The top-level directory the top-level symlink ``name`` resolves into, if any."""
    seen = {name}
    while True:
        target = tops[name].target
        # at the root, ".." is the root itself, and an absolute target is the image's
        parts = [p for p in posixpath.normpath("/" + target).split("/") if p]
        if not parts or parts[0] not in tops:
            return None
        name = parts[0]
        entry = tops[name]
        if entry.kind == tree.DIR:
            return name
        if entry.kind != tree.SYMLINK or name in seen:
            return None
        seen.add(name)


_ACCESS_STYLE = {READ_ONLY: "green", READ_WRITE: "yellow", VIRTUAL: "dim", SHARED: "cyan", UNKNOWN: "red"}


def render_table(profile: Profile) -> Table:
    """The profile as a table like the paper's Table 2, with the suggested policies."""
    table = Table(
        title=f"EE profile of {profile.root}",
        caption=(
            f"read-only: {profile.read_only_files_pct:.1f}% of files, "
            f"{profile.read_only_bytes_pct:.1f}% of bytes"
            f" · MB = 2^20 bytes · not listed: {profile.default_policy} (default_policy)"
        ),
        show_footer=True,
    )
    table.add_column("directory", footer="total")
    table.add_column("access")
    table.add_column("files (%)", justify="right", footer=f"{profile.files} (100)")
    table.add_column("MB (%)", justify="right", footer=f"{profile.bytes / MIB:.1f} (100)")
    table.add_column("policy")
    table.add_column("why", overflow="fold")
    for r in profile.rows:
        name = f"{r.path} -> {r.target}" if r.kind == SYMLINK else r.path
        if r.kind == FILES:
            name = "/ (files)"
        policy = f"follows {r.follows}" if r.kind == SYMLINK and r.follows else (r.policy or "-")
        table.add_row(
            name,
            Text(r.access, style=_ACCESS_STYLE.get(r.access, "")),
            f"{r.files} ({profile.files_pct(r):.1f})",
            f"{r.bytes / MIB:.1f} ({profile.bytes_pct(r):.1f})",
            policy,
            r.reason,
        )
    for note in profile.notes:
        table.add_row(Text(note, style="dim"), "", "", "", "", "")
    return table
