"""The EE profiler on small hand-made images."""

from __future__ import annotations

import io
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from slim.core.build.profile import (
    ACCESS_CLASSES,
    MIB,
    READ_ONLY,
    READ_WRITE,
    RULES,
    SHARED,
    UNKNOWN,
    VIRTUAL,
    Profile,
    profile_image,
    render_table,
)
from slim.core.registry import load_registry_text
from slim.errors import InvalidArgument, NotFound
from slim.vocabulary import Policy

REGISTRY_HEAD = """\
profiles:
  p: {}
environments:
  e:
    image: /srv/images/e
"""


def make(root: Path, files: dict[str, int | str]) -> Path:
    """Files (size in bytes, or "->target" for a symlink, "=path" for a hard link);
    a path ending in "/" is an empty directory."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, spec in files.items():
        path = root / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(spec, int):
            path.write_bytes(b"x" * spec)
        elif spec.startswith("->"):
            path.symlink_to(spec[2:])
        elif spec.startswith("="):
            os.link(root / spec[1:], path)
    return root


@pytest.fixture
def merged_usr(tmp_path: Path) -> Path:
    """A Debian-like image: merged /usr, empty mount points, a home, an unknown directory."""
    return make(
        tmp_path / "img",
        {
            "usr/bin/bash": 1000,
            "usr/bin/ls": 200,
            "usr/sbin/init": 300,
            "usr/lib/libc.so.6": 5000,
            "usr/lib64/ld.so": 100,
            "bin": "->usr/bin",
            "sbin": "->/usr/sbin",  # absolute: the image's /usr
            "lib": "->usr/lib",
            "lib64": "->lib",  # a chain: lib64 -> lib -> usr/lib
            "libx": "->../../nowhere",  # ".." at the root is the root: /nowhere
            "etc/passwd": 50,
            "etc/hosts": 30,
            "etc/mtab": "->/proc/self/mounts",
            "var/log/syslog": 70,
            "var/lib/dpkg/status": 900,
            "dev/": 0,
            "dev/pts/": 0,
            "proc/": 0,
            "sys/": 0,
            "run/": 0,
            "tmp/": 0,
            "mnt/": 0,
            "media/cdrom/": 0,
            "home/": 0,
            "opt/": 0,
            "data/set1/a.csv": 400,
            "vmlinuz": "->boot/vmlinuz-6.1",
            "boot/vmlinuz-6.1": 2048,
            ".autorelabel": 0,
            "README.image": 10,
        },
    )


def test_merged_usr_symlinks_follow_usr(merged_usr: Path) -> None:
    p = profile_image(merged_usr)
    usr = p.row("/usr")
    assert (usr.kind, usr.access, usr.policy, usr.files, usr.bytes) == ("dir", READ_ONLY, "nfs", 5, 6600)
    for name, target in (("/bin", "usr/bin"), ("/sbin", "/usr/sbin"), ("/lib", "usr/lib"), ("/lib64", "lib")):
        row = p.row(name)
        assert (row.kind, row.target, row.follows) == ("symlink", target, "/usr"), row
        assert (row.access, row.policy, row.files, row.bytes) == (READ_ONLY, None, 1, 0)
        assert "not a separate directory" in row.reason
    dangling = p.row("/libx")
    assert (dangling.follows, dangling.access, dangling.policy) == (None, UNKNOWN, None)
    kernel = p.row("/vmlinuz")
    assert (kernel.follows, kernel.access) == ("/boot", READ_ONLY)
    # the snippet names directories only: a symlink travels with /
    assert "/bin:" not in p.registry_snippet() and "  /usr: nfs" in p.registry_snippet()


def test_classes_policies_and_reasons(merged_usr: Path) -> None:
    p = profile_image(merged_usr)
    expect = {
        "/etc": (READ_WRITE, "ram", 3, 80),
        "/var": (READ_WRITE, "ram", 2, 970),
        "/boot": (READ_ONLY, "nfs", 1, 2048),
        "/home": (SHARED, "ram", 0, 0),
        "/dev": (VIRTUAL, "ram", 0, 0),  # empty: the kernel's devtmpfs is mounted there
        "/opt": (VIRTUAL, "ram", 0, 0),  # read-only by name, but empty: a mount point
        "/media": (VIRTUAL, "ram", 0, 0),  # only empty subdirectories
        "/data": (UNKNOWN, "ram", 1, 400),
        "/": (UNKNOWN, "ram", 2, 10),  # .autorelabel and README.image
    }
    for path, want in expect.items():
        row = p.row(path)
        assert (row.access, row.policy, row.files, row.bytes) == want, row
    for path in ("/proc", "/sys", "/run", "/tmp", "/mnt"):
        assert p.row(path).access == VIRTUAL
        assert p.row(path).reason == RULES[path[1:]].why + "; travels with / as an empty directory"
    assert "site's file server" in p.row("/home").reason
    assert "not a standard" in p.row("/data").reason
    assert p.row("/").kind == "files"
    # rows come sorted by name, like the paper's table
    assert [r.name for r in p.rows] == sorted(r.name for r in p.rows)
    assert all(r.access in ACCESS_CLASSES for r in p.rows)
    assert p.files == 5 + 5 + 3 + 2 + 1 + 1 + 2 + 1  # usr, 5 links, etc, var, boot, data, /, vmlinuz
    assert p.bytes == 6600 + 80 + 970 + 2048 + 400 + 10


def test_a_static_dev_is_read_write(tmp_path: Path) -> None:
    p = profile_image(make(tmp_path / "img", {"dev/MAKEDEV": "->../sbin/MAKEDEV", "dev/.udev.tdb": 10}))
    dev = p.row("/dev")
    assert (dev.access, dev.policy, dev.files, dev.bytes) == (READ_WRITE, "ram", 2, 10)


def test_hard_links_count_as_files_but_their_bytes_once(tmp_path: Path) -> None:
    root = make(
        tmp_path / "img",
        {
            "bin/gzip": 1000,
            "bin/gunzip": "=bin/gzip",
            "bin/zcat": "=bin/gzip",
            "usr/bin/gzip": "=bin/gzip",  # across directories: counted where scan meets it first
            "usr/bin/other": 10,
        },
    )
    p = profile_image(root)
    assert (p.row("/bin").files, p.row("/bin").bytes) == (3, 1000)
    assert (p.row("/usr").files, p.row("/usr").bytes) == (2, 10)
    assert p.bytes == 1010 < sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def test_percentages_and_read_only_share(tmp_path: Path) -> None:
    root = make(tmp_path / "img", {"usr/a": 3 * MIB, "usr/b": 0, "usr/c": 0, "etc/x": MIB})
    p = profile_image(root)
    assert p.files_pct(p.row("/usr")) == 75.0 and p.bytes_pct(p.row("/usr")) == 75.0
    assert (p.read_only_files_pct, p.read_only_bytes_pct) == (75.0, 75.0)
    assert p.share(READ_WRITE) == (1, MIB)
    empty = profile_image(make(tmp_path / "empty", {}))
    assert (empty.files, empty.read_only_files_pct, empty.rows) == (0, 0.0, ())


def test_as_json_shape(merged_usr: Path) -> None:
    doc = profile_image(merged_usr).as_json()
    assert json.loads(json.dumps(doc)) == doc
    assert list(doc) == ["root", "default_policy", "mb", "totals", "read_only", "directories", "notes"]
    assert doc["root"] == str(merged_usr) and doc["default_policy"] == "ram" and doc["mb"] == 1 << 20
    assert list(doc["read_only"]) == ["files", "bytes", "files_pct", "bytes_pct"]
    keys = ["path", "kind", "target", "follows", "access", "policy", "reason"]
    keys += ["files", "bytes", "files_pct", "bytes_pct"]
    assert all(list(d) == keys for d in doc["directories"])
    by_path = {d["path"]: d for d in doc["directories"]}
    assert by_path["/bin"]["policy"] is None and by_path["/bin"]["follows"] == "/usr"
    assert by_path["/usr"]["target"] is None
    assert sum(d["files"] for d in doc["directories"]) == doc["totals"]["files"]
    assert abs(sum(d["bytes_pct"] for d in doc["directories"]) - 100) < 0.1
    assert doc["notes"] == []


def load_snippet(p: Profile) -> dict[str, str]:
    """The snippet pasted into a minimal registry; the policies the loader sees."""
    text = REGISTRY_HEAD + p.registry_snippet(indent=4)
    env = load_registry_text(text, "snippet.yaml").environment("e")
    assert env.default_policy.value == p.default_policy
    return {d: spec.policy.value for d, spec in env.directories.items()}


def test_registry_snippet_loads_into_a_registry(merged_usr: Path) -> None:
    p = profile_image(merged_usr)
    snippet = p.registry_snippet()
    assert snippet.startswith("#") and "default_policy: ram\ndirectories:\n" in snippet
    assert load_snippet(p) == {"/boot": "nfs", "/usr": "nfs"}
    assert "#   /home shared" in snippet  # the EE mounts user data itself; nothing to list
    # what is left to default_policy is said in comments
    assert "#   /etc read/write" in snippet and "#   /bin -> usr/bin (symlink, follows /usr)" in snippet


def test_registry_snippet_with_another_copy_policy_and_nothing_to_list(tmp_path: Path) -> None:
    p = profile_image(make(tmp_path / "img", {"etc/x": 1, "lost+found/": 0}), copy_policy="sync")
    assert p.default_policy == "sync" and p.row("/etc").policy == "sync"
    assert "directories: {}" in p.registry_snippet()
    assert load_snippet(p) == {}


def test_odd_names_cannot_break_the_snippet(tmp_path: Path) -> None:
    root = make(tmp_path / "img", {"a b: #c/x": 1, "evil\n/usr: ram/x": 1, "opt/y": 1, "l": "->x\ny: z"})
    p = profile_image(root, copy_policy="disk")
    snippet = p.registry_snippet()
    assert '#   "/evil\\n" unknown' in snippet and '#   /l -> "x\\ny: z"' in snippet
    assert yaml.safe_load(snippet) == {"default_policy": "disk", "directories": {"/opt": "nfs"}}
    assert load_snippet(p) == {"/opt": "nfs"}


def test_render_table(merged_usr: Path) -> None:
    p = profile_image(merged_usr)
    table = render_table(p)
    assert [c.header for c in table.columns] == [
        "directory",
        "access",
        "files (%)",
        "MB (%)",
        "policy",
        "why",
    ]
    assert table.row_count == len(p.rows)
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(table)
    text = out.getvalue()
    assert "/bin -> usr/bin" in text and "follows /usr" in text
    assert f"{p.row('/usr').files} ({p.files_pct(p.row('/usr')):.1f})" in text
    assert f"{p.files} (100)" in text  # the footer
    assert "read-only: " in text


def test_progress_names_each_directory(merged_usr: Path) -> None:
    seen: list[str] = []
    profile_image(merged_usr, progress=seen.append)
    assert seen[0] == "/" and "/usr/bin" in seen and "/var/lib/dpkg" in seen
    assert "/bin" not in seen  # a symlink is not walked into


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    root = make(tmp_path / "i", {"run/x": 1})
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "run" / "s"))
        yield root
    finally:
        sock.close()


def test_sockets_are_noted_not_counted(unix_socket: Path) -> None:
    p = profile_image(unix_socket)
    assert p.row("/run").files == 1
    assert p.notes == ("/run/s: a socket, not counted",)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        profile_image(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidArgument, match="not a directory"):
        profile_image(tmp_path / "file")
    with pytest.raises(InvalidArgument, match="must copy"):
        profile_image(tmp_path, copy_policy="nfs")
    with pytest.raises(InvalidArgument, match="unknown policy"):
        profile_image(tmp_path, copy_policy="tape")
    with pytest.raises(NotFound):
        profile_image(tmp_path).row("/usr")


def test_rules_table() -> None:
    assert all(rule.access in ACCESS_CLASSES and rule.why for rule in RULES.values())
    assert {n for n, r in RULES.items() if r.access == READ_ONLY} >= {"bin", "sbin", "lib", "usr", "boot"}
    assert {n for n, r in RULES.items() if r.access == READ_WRITE} >= {"etc", "var", "dev"}
    assert RULES["home"].access == SHARED
    assert {n for n, r in RULES.items() if r.access == VIRTUAL} >= {
        "proc",
        "sys",
        "run",
        "tmp",
        "mnt",
        "media",
    }
    assert set(Policy) >= {Policy.NFS, Policy.RAM}
