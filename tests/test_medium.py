"""Boot media for home PCs (slim media build, slim.agent.medium).

The fast tests check the pieces: the medium's description, the cpio archive that carries the
token to the release, the release kernel's command line, the GRUB configuration.  The slow
one builds a real medium with ``slim media build`` and boots a QEMU VM (TCG) from it with no
PXE at all, as a home PC boots: UEFI from a USB stick and BIOS from a CD, each to ``up`` in the
environment through the release's own kernel and initrd (kexec), and a revoked token to a
clear message on the console.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Literal

import pytest

from labs.desktopdisk import disk_sha256
from labs.host import free_port
from labs.vmlab import OVMF_CODE, SLIM, Boot, Lab, owner_disk
from slim.agent.cache import CacheCorrupt, LocalObjects, ext_uuid, fs_bytes
from slim.agent.medium import Medium, MediumError, kexec_cmdline, newc
from slim.agent.plan import parse_cmdline
from slim.core.build.medium import MediumSpec, grub_cfg
from slim.errors import InvalidArgument
from slim.v1 import core_pb2 as pb
from tests.support import need, need_tool

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


# -- a VM booted from a medium ---------------------------------------------------------------------
CACHE_MODULES = (
    "xhci_pci",
    "usb_storage",
    "sd_mod",
    "ext4",
    "crc32c_generic",
)  # the release's, for the cache


def _in_order(boot: Boot) -> list[pb.BootEvent]:
    return sorted(boot.events, key=lambda e: e.time.ToNanoseconds())


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_pc_with_no_pxe_boots_its_environment_from_the_medium(tmp_path: Path) -> None:
    """A VM with no PXE and its owner's disk attached boots from the image slim media build wrote.
    From a USB stick (UEFI), the medium grows its cache partition to the end of the stick and
    keeps the kernel, initrd and copy set there; the next boot from it (BIOS) moves only the
    plan.  From a CD (BIOS) it runs from RAM, its first relay down: it asks the next.  A new
    release boots from the same stick, under Secure Boot, moving only what changed.  Each boot
    reaches ``up`` through the release's own kernel (kexec), with nothing of the token on the
    kernel's command line, and the owner's disk is the same, byte for byte.  Then the node's
    token is revoked: the medium stops at a message that says so."""
    qemu = need_tool("qemu-system-x86_64", "qemu-system-x86")
    tools = (("ganesha.nfsd", "nfs-ganesha"), ("debootstrap", None), ("xorriso", None), ("mformat", "mtools"),
             ("grub-mkimage", "grub-common"), ("sfdisk", "fdisk"))  # fmt: skip
    for tool, package in tools:
        need_tool(tool, package)
    need(OVMF_CODE.is_file(), f"{OVMF_CODE} is missing (apt-get install ovmf)")
    with Lab(tmp_path, qemu=qemu, https=True, modules=CACHE_MODULES) as lab:
        lab.start()
        token = tmp_path / "vm1.token"
        env = {**os.environ, "SLIM_IDENTITY": str(tmp_path / "admin-lab")}
        subprocess.run([*SLIM, "node", "enroll", "vm1", "--out", str(token), "--core", lab.core],
                       check=True, env=env, capture_output=True, timeout=60)  # fmt: skip
        medium = tmp_path / "vm1.iso"
        relay = f"https://10.0.2.2:{lab.https_port}"
        built = json.loads(
            lab.slim("media", "build", str(medium), "--node", "vm1", "--token-file", str(token),
                     "--relay", f"https://10.0.2.2:{free_port()}", "--relay", relay,
                     "--registry", str(lab.registry), "--keys", str(lab.keys), "--ca", str(tmp_path / "ca"),
                     "--console", "serial", "--json")
        )  # fmt: skip
        assert built["node"] == "vm1" and built["relays"][1] == relay
        assert stat.S_IMODE(medium.stat().st_mode) == 0o600  # it holds the token
        stick = tmp_path / "stick.img"  # the image written to a 256 MiB stick
        shutil.copyfile(medium, stick)
        with open(stick, "r+b") as f:
            f.truncate(256 << 20)
        owner = tmp_path / "owner.img"  # the PC's own disk, which nothing may touch
        owners = owner_disk(owner)
        disk = ("-drive", f"file={owner},format=raw,if=virtio")
        release = lab.built["release"]
        boots: list[tuple[Literal["uefi", "bios"], Path, bool]] = [
            ("uefi", stick, True), ("bios", stick, True), ("bios", medium, False),
        ]  # fmt: skip
        done_bytes = []
        for firmware, image, usb in boots:
            lab.firmware = firmware
            boot = lab.boot(*disk, medium=image, usb=usb)
            assert boot.status is not None and boot.status.state == "up", (firmware, usb, boot.status)
            events = _in_order(boot)
            stages = [e.stage for e in events]
            assert [s for s in stages if s in MEDIUM_STAGES + AGENT_STAGES] == MEDIUM_STAGES + AGENT_STAGES
            assert boot.active["release"] == release and boot.active["boot_id"] == boot.status.boot_id
            by_stage = {e.stage: e for e in events}
            assert release in by_stage["medium"].message
            assert ("Secure boot disabled" in boot.console) == (firmware == "uefi")
            assert token.read_text().strip() not in boot.console
            assert ("medium:cache" in by_stage) == usb, stages
            moved = by_stage["medium:kernel"].bytes + by_stage["medium:initrd"].bytes + by_stage["done"].bytes
            done_bytes.append(moved)
            assert disk_sha256(owner) == owners
        first, second, cd = done_bytes
        # the stick's first boot fetched everything and kept it; its second moved only the plan
        assert first > 5_000_000 and cd > 5_000_000, done_bytes
        assert second == 0, done_bytes
        # a new release boots from the old medium, under Secure Boot, moving only what changed
        (lab.image / "etc" / "slim-test-release").write_text("the next release\n")
        new = lab.build()["release"]
        assert new != release
        lab.firmware, lab.secure_boot = "uefi", True
        boot = lab.boot(*disk, medium=stick, usb=True)
        assert boot.status is not None and boot.status.state == "up", boot.status
        assert boot.active["release"] == new
        assert "Secure boot enabled" in boot.console and "Kernel is locked down" in boot.console
        by_stage = {e.stage: e for e in boot.events}
        assert (
            by_stage["medium:kernel"].bytes == 0
            and "from the medium's cache" in by_stage["medium:kernel"].message
        )
        assert 0 < by_stage["done"].bytes < first, by_stage["done"]
        assert disk_sha256(owner) == owners
        subprocess.run([*SLIM, "node", "revoke", "vm1", "--core", lab.core], check=True, env=env,
                       capture_output=True, timeout=60)  # fmt: skip
        lab.firmware = "bios"
        console = lab.console_until(r"slim-medium: this PC stays here", medium=medium)
        assert "cannot boot: the relays refused this medium's token" in console, console[-2000:]
        assert "Ask your SLIM administrator for a new medium" in console


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
