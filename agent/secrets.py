"""A node's secret files: fetched from a relay after the environment is built, written into
it (standard library only).

The core sends them only to the node they belong to (its token over TLS, or a site that
allows MAC identity for secrets); the registry allows them only in ``ram`` directories, so
on a real boot they land in RAM.  The agent writes each one atomically with its mode and
owner (names from the environment's own ``/etc/passwd`` and ``/etc/group``), never through
a symbolic link, and never says their contents anywhere: events name how many there were.
"""

from __future__ import annotations

import base64
import json
import os
import posixpath
import re
from pathlib import Path

from slim.agent.plan import PlanError
from slim.agent.value import Value

MAX_SECRETS = 256
MAX_SECRET_BYTES = 1 << 20
_OWNER = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.-]{0,31})(?::([A-Za-z0-9_][A-Za-z0-9_.-]{0,31}))?")


class Secret(Value):
    """One secret file for the node (its content is never printed)."""

    __slots__ = ("content", "mode", "owner", "path")
    _hidden = ("content",)

    def __init__(self, path: str, mode: int, owner: str, content: bytes) -> None:
        self.path = path
        self.mode = mode
        self.owner = owner
        self.content = content


def parse(data: bytes) -> list[Secret]:
    """The secrets of a relay's answer (``{"secrets": [...]}``); PlanError names what is wrong
    (never the content)."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise PlanError("secrets: the answer is not JSON") from None
    records = doc.get("secrets") if isinstance(doc, dict) else None
    if not isinstance(records, list) or len(records) > MAX_SECRETS:
        raise PlanError(f"secrets: expected a list of at most {MAX_SECRETS}")
    out = []
    for i, rec in enumerate(records):
        where = f"secret {i + 1}"
        if not isinstance(rec, dict):
            raise PlanError(f"{where}: expected an object")
        path, mode, owner, content = rec.get("path"), rec.get("mode"), rec.get("owner"), rec.get("content")
        if (
            not isinstance(path, str)
            or not path.startswith("/")
            or posixpath.normpath(path) != path
            or path == "/"
            or "\0" in path
            or len(path) > 4096
        ):
            raise PlanError(f"{where}: path {str(path)[:80]!r} is not a normalised absolute file path")
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
            raise PlanError(f"{where}: mode must be a file mode")
        if not isinstance(owner, str) or not _OWNER.fullmatch(owner):
            raise PlanError(f"{where}: owner must be USER or USER:GROUP")
        if not isinstance(content, str) or len(content) > MAX_SECRET_BYTES * 4 // 3 + 4:
            raise PlanError(f"{where}: content must be base64 of at most {MAX_SECRET_BYTES} bytes")
        try:
            raw = base64.b64decode(content, validate=True)
        except ValueError:  # binascii.Error, and non-ASCII text (found by the long fuzzing pass)
            raise PlanError(f"{where}: content is not base64") from None
        out.append(Secret(path, mode, owner, raw))
    return out


def _ids(root: Path, name: str, table: str) -> int:
    if name.isdigit():
        return int(name)
    if name == "root":
        return 0
    try:
        lines = (root / "etc" / table).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":")
        if len(parts) > 2 and parts[0] == name and parts[2].isdigit():
            return int(parts[2])
    raise PlanError(f"secrets: the environment has no {'user' if table == 'passwd' else 'group'} {name!r}")


def owner_ids(root: Path, owner: str) -> tuple[int, int]:
    """(uid, gid) of ``USER[:GROUP]`` in the environment under ``root`` (GROUP: the user's)."""
    found = _OWNER.fullmatch(owner)
    assert found is not None
    user, group = found.group(1), found.group(2)
    uid = _ids(root, user, "passwd")
    if group is not None:
        return uid, _ids(root, group, "group")
    if user.isdigit() or user == "root":
        return uid, uid
    for line in (root / "etc" / "passwd").read_text(errors="replace").splitlines():
        parts = line.split(":")
        if len(parts) > 3 and parts[0] == user and parts[3].isdigit():
            return uid, int(parts[3])
    return uid, uid


def _install_one(top: str, s: Secret, index: int) -> None:
    dest = Path(top) / s.path.lstrip("/")
    parent = Path(top)
    for part in dest.parent.relative_to(top).parts:  # made one by one, never through a link
        parent = parent / part
        if parent.is_symlink():
            raise PlanError(f"secrets: {s.path}: {parent} is a symbolic link: refused")
        if not parent.exists():
            parent.mkdir(mode=0o755)
        elif not parent.is_dir():
            raise PlanError(f"secrets: {s.path}: {parent} is not a directory")
    uid, gid = owner_ids(Path(top), s.owner)
    tmp = parent / f".slim-secret-{os.getpid()}-{index}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(s.content)
        while view:  # a short write (a nearly full tmpfs) must not cut the secret
            view = view[os.write(fd, view) :]
        os.fchown(fd, uid, gid)
        os.fchmod(fd, s.mode)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    if dest.is_dir() and not dest.is_symlink():
        tmp.unlink()
        raise PlanError(f"secrets: {s.path} is a directory in the environment")
    os.replace(tmp, dest)  # a symbolic link at dest is replaced, not followed


def install(root: Path, secrets: list[Secret]) -> list[str]:
    """Write each secret under ``root`` at its path, mode and owner; the paths written.  A
    parent directory that is a symbolic link, or leads out of ``root``, is refused."""
    top = os.path.realpath(root)
    written: list[str] = []
    for s in secrets:
        try:
            _install_one(top, s, len(written))
        except OSError as exc:
            raise PlanError(f"secrets: {s.path}: cannot write it ({exc.strerror or exc})") from None
        written.append(s.path)
    return written
