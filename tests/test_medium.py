"""Boot media for home PCs (slim media build, slim.agent.medium).

These check the pieces: the medium's description, the cpio archive that carries the token to
the release, the release kernel's command line, the GRUB configuration, the medium's cache.
tests/test_home.py builds real media with ``slim media build`` and boots a QEMU VM (TCG) from
them with no PXE at all, as a home PC boots, in every combination.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from labs.vmlab import SLIM
from slim.agent.cache import CacheCorrupt, LocalObjects, ext_uuid, fs_bytes
from slim.agent.medium import Medium, MediumError, kexec_cmdline, newc
from slim.agent.plan import parse_cmdline
from slim.core.build.medium import MediumSpec, grub_cfg
from slim.errors import InvalidArgument
from tests.support import need_tool

MEDIUM_STAGES = ["medium", "medium:kernel", "medium:initrd", "kexec"]
AGENT_STAGES = ["plan", "ram:/", "mount:/usr", "secrets", "done", "switch_root", "up"]


# -- the pieces --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ("not json", "is not JSON"),
        ({"id": "xyz", "node": "n1", "relays": ["https://r:1"]}, "is not a medium's id"),
        ({"id": "0123abcd", "node": "../n1", "relays": ["https://r:1"]}, "is not a node's name"),
        ({"id": "0123abcd", "node": "n1", "relays": []}, "names no relay"),
        ({"id": "0123abcd", "node": "n1", "relays": ["ftp://r"]}, "is not a relay's"),
    ],
)
def test_a_medium_description_that_is_wrong_says_what(tmp_path: Path, doc: object, says: str) -> None:
    path = tmp_path / "medium.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(MediumError, match=says):
        Medium.load(path)
    with pytest.raises(MediumError, match="not made by slim media build"):
        Medium.load(tmp_path / "missing.json")


def test_the_token_travels_in_a_cpio_archive_the_kernel_unpacks(tmp_path: Path) -> None:
    need_tool("cpio")
    archive = newc({"etc/slim/node.token": (b"t0ken\n", 0o400)})
    assert len(archive) % 4 == 0
    listed = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    lines = [line.split() for line in listed.splitlines()]
    assert [(w[0], w[-1]) for w in lines] == [
        ("drwxr-xr-x", "etc"), ("drwxr-xr-x", "etc/slim"), ("-r--------", "etc/slim/node.token"),
    ]  # fmt: skip
    got = subprocess.run(
        ["cpio", "-i", "--quiet", "--to-stdout", "etc/slim/node.token"], input=archive, capture_output=True
    )
    assert got.stdout == b"t0ken\n"


def test_the_release_kernel_is_told_the_relays_reached_and_the_boot() -> None:
    line = kexec_cmdline(
        "slim.node=n1 slim.relays=http://10.0.0.1:8080 slim.boot=old console=ttyS0",
        ["https://r2:8443"],
        "cafe",
    )
    args = parse_cmdline(line)
    assert args["slim.relays"] == "https://r2:8443" and args["slim.boot"] == "cafe"
    assert args["slim.node"] == "n1" and "console" in args
    assert line.count("slim.relays=") == 1 and line.count("slim.boot=") == 1
    assert "slim.cache" not in line and "slim.medium" not in line  # the medium adds its own


def test_a_medium_spec_is_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a medium id"):
        MediumSpec("nothex!!", "n1", ["https://r:1"])
    with pytest.raises(InvalidArgument, match="at least one relay"):
        MediumSpec("0123abcd", "n1", [])
    with pytest.raises(InvalidArgument, match="needs an https:// relay"):
        MediumSpec("0123abcd", "n1", ["http://r:1"], token="t")  # noqa: S106
    spec = MediumSpec("0123abcd", "n1", ["https://r:1"], token="t", title='x"; reboot; "')  # noqa: S106
    cfg = grub_cfg(spec)
    assert "search --no-floppy --file --set=root /.disk/slim-medium-0123abcd" in cfg
    assert '"SLIM: x reboot "' in cfg  # nothing a menu title could break out with
    cache = spec.cache_uuid  # the medium's own: from its id
    assert cache == MediumSpec("0123abcd", "n2", ["https://r:2"]).cache_uuid
    assert cache != MediumSpec("0123abce", "n1", ["https://r:1"]).cache_uuid
    doc = {"id": "0123abcd", "node": "n1", "relays": ["https://r:1"], "cache": cache}
    assert json.loads(spec.document()) == doc
    (tmp_path / "medium.json").write_bytes(spec.document())
    assert Medium.load(tmp_path / "medium.json") == Medium("0123abcd", "n1", ("https://r:1",), cache)


def test_a_cached_object_that_changes_while_it_is_sent_stops_the_object(tmp_path: Path) -> None:
    """A copy whose bytes differ the second time they are read (a failing stick) is not passed
    off as intact: the object stops (as a relay's wrong bytes do) and the copy is dropped."""
    local = LocalObjects(tmp_path)
    data = os.urandom(3 << 20)
    digest = hashlib.sha256(data).hexdigest()
    path = local.path(digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    got = bytearray()
    assert local.read(digest, len(data), got.extend) and bytes(got) == data and local.hits == 1

    def tamper(chunk: bytes) -> None:  # after the first chunk went out, the rest changes on "disk"
        if not got:
            with open(path, "r+b") as f:
                f.seek(2 << 20)
                f.write(b"\0" * 16)
        got.extend(chunk)

    got.clear()
    with pytest.raises(CacheCorrupt, match="other bytes"):
        local.read(digest, len(data), tamper)
    assert not path.exists()
    assert not local.read(digest, len(data), got.extend)  # gone: fetched again
    path.write_bytes(b"not it")
    assert not local.read(digest, len(data), got.extend) and not path.exists()  # damaged: dropped


def test_the_seed_filesystem_is_told_from_a_grown_one(tmp_path: Path) -> None:
    need_tool("mke2fs", "e2fsprogs")
    seed = tmp_path / "seed.img"
    with open(seed, "wb") as f:
        f.truncate(4 << 20)
    fs_uuid = "6b8f0e1c-0000-4000-8000-0123456789ab"
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-U", fs_uuid, str(seed)], check=True
    )
    assert ext_uuid(seed) == fs_uuid and fs_bytes(seed) == 4 << 20
    assert ext_uuid(tmp_path / "missing") is None and fs_bytes(tmp_path / "missing") == 0
    (tmp_path / "zeros").write_bytes(bytes(4096))
    assert ext_uuid(tmp_path / "zeros") is None and fs_bytes(tmp_path / "zeros") == 0


def grub_entry(iso: Path, path: str) -> subprocess.CompletedProcess[str]:
    argv = [*SLIM, "media", "grub-entry", str(iso), "--path", path]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_grub_entry_boots_a_medium_image_kept_on_the_pcs_disk(tmp_path: Path) -> None:
    """``slim media grub-entry``: GRUB's loopback of the image, with the medium's own kernel
    arguments (from its grub.cfg) and no cache; GRUB's own parser takes it."""
    xorriso = need_tool("xorriso")
    check = need_tool("grub-script-check", "grub-common")
    spec = MediumSpec("0123abcd", "n1", ["https://r:1"], kernel_args="console=ttyS0,115200")
    tree = tmp_path / "tree"
    (tree / "boot" / "grub").mkdir(parents=True)
    (tree / "boot" / "grub" / "grub.cfg").write_text(grub_cfg(spec))
    for name in ("vmlinuz", "initrd"):
        (tree / "boot" / name).write_bytes(b"stand-in")
    iso = tmp_path / "m.iso"
    subprocess.run(
        [xorriso, "-as", "mkisofs", "-quiet", "-o", str(iso), str(tree)], check=True, capture_output=True
    )
    done = grub_entry(iso, "/slim/home1.iso")
    assert done.returncode == 0, done.stderr
    entry = done.stdout
    assert 'menuentry "SLIM: node n1" --id slim-0123abcd {' in entry
    assert 'set isofile="/slim/home1.iso"' in entry and "loopback slimiso $isofile" in entry
    linux = next(line.split()[1:] for line in entry.splitlines() if line.strip().startswith("linux "))
    assert linux == [
        "(slimiso)/boot/vmlinuz",
        "slim.medium=0123abcd",
        "slim.grubroot=loop",
        "console=ttyS0,115200",
    ]
    script = tmp_path / "40_slim.cfg"
    script.write_text(entry)
    subprocess.run([check, str(script)], check=True, capture_output=True, timeout=30)
    for bad, says in (
        ("slim/home1.iso", "absolute path"),
        ("/a/../b.iso", "absolute path"),
        ('/a"b', "absolute"),
    ):
        wrong = grub_entry(iso, bad)
        assert wrong.returncode == 1 and says in wrong.stderr, wrong.stderr
    other = tmp_path / "other.iso"
    (tree / "boot" / "grub" / "grub.cfg").write_text("menuentry x {\n}\n")
    subprocess.run(
        [xorriso, "-as", "mkisofs", "-quiet", "-o", str(other), str(tree)], check=True, capture_output=True
    )
    wrong = grub_entry(other, "/x.iso")
    assert wrong.returncode == 1 and "is not a SLIM boot medium" in wrong.stderr
