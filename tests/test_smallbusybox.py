"""slim.core.build.smallbusybox: the initrd's busybox, built from Debian's source with only
the applets SLIM runs — how it reads the build host's apt sources, configures the applets,
and refuses what it cannot build.  The built busybox itself is in tests/test_agentrt.py,
its scripts in tests/test_agent.py and tests/test_harvest.py, and it boots in
tests/test_vm_boot.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from slim.core.build import smallbusybox
from slim.core.build.smallbusybox import applet_symbols, check, configure, deb_src
from slim.errors import FailedPrecondition
from tests.support import initrd_busybox, need_tool

DEBIAN_CONFIG = """\
CONFIG_HAVE_DOT_CONFIG=y
CONFIG_STATIC=y
CONFIG_CAT=y
CONFIG_FEATURE_CATN=y
CONFIG_WGET=y
CONFIG_FEATURE_WGET_HTTPS=y
CONFIG_VI=y
CONFIG_FEATURE_VI_COLON=y
# CONFIG_ED is not set
CONFIG_HALT=y
CONFIG_POWEROFF=y
"""


def source_tree(root: Path) -> Path:
    """A few of busybox's applet declarations, as its sources write them."""
    (root / "coreutils").mkdir(parents=True)
    (root / "coreutils" / "cat.c").write_text(
        "//applet:IF_CAT(APPLET(cat, BB_DIR_BIN, BB_SUID_DROP))\n//config:config CAT\n"
    )
    (root / "networking").mkdir()
    (root / "networking" / "wget.c").write_text(
        "//applet:IF_WGET(APPLET(wget, BB_DIR_USR_BIN, BB_SUID_DROP))\n"
    )
    (root / "editors").mkdir()
    (root / "editors" / "vi.c").write_text("//applet:IF_VI(APPLET(vi, BB_DIR_BIN, BB_SUID_DROP))\n")
    (root / "editors" / "ed.c").write_text("//applet:IF_ED(APPLET(ed, BB_DIR_BIN, BB_SUID_DROP))\n")
    (root / "init").mkdir()
    (root / "init" / "halt.c").write_text(
        "//applet:IF_HALT(APPLET(halt, BB_DIR_SBIN, BB_SUID_DROP))\n"
        "//                  APPLET_ODDNAME:name      main\n"
        "//applet:IF_POWEROFF(APPLET_ODDNAME(poweroff, halt, BB_DIR_SBIN, BB_SUID_DROP, poweroff))\n"
    )
    return root


def test_applets_are_read_from_the_sources_declarations(tmp_path: Path) -> None:
    symbols = applet_symbols(source_tree(tmp_path))
    assert symbols == {
        "CAT": {"cat"}, "WGET": {"wget"}, "VI": {"vi"}, "ED": {"ed"},
        "HALT": {"halt"}, "POWEROFF": {"poweroff"},
    }  # fmt: skip


def test_configure_keeps_debians_settings_of_the_applets_kept_and_turns_the_rest_off(tmp_path: Path) -> None:
    symbols = applet_symbols(source_tree(tmp_path))
    config = configure(DEBIAN_CONFIG, symbols, ["cat", "wget", "poweroff"]).splitlines()
    for kept in ("CONFIG_CAT=y", "CONFIG_FEATURE_CATN=y", "CONFIG_WGET=y", "CONFIG_FEATURE_WGET_HTTPS=y",
                 "CONFIG_POWEROFF=y", "CONFIG_STATIC=y", "# CONFIG_ED is not set"):  # fmt: skip
        assert kept in config, kept
    assert "# CONFIG_VI is not set" in config and "# CONFIG_HALT is not set" in config
    assert "CONFIG_FEATURE_VI_COLON=y" in config  # kconfig drops it: it depends on VI
    assert len(config) == len(DEBIAN_CONFIG.splitlines())
    with pytest.raises(FailedPrecondition, match="busybox has no applet frobnicate, telnet"):
        configure(DEBIAN_CONFIG, symbols, ["cat", "telnet", "frobnicate"])


def test_deb_src_reads_both_apt_formats_and_skips_what_is_off(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# a comment\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/a.gpg] "
        "http://mirror.example/debian bookworm main contrib\n"
        "deb-src http://mirror.example/debian bookworm main\n"
        "#deb http://off.example/debian bookworm main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n"
    )
    (tmp_path / "sources.list.d" / "old.list.disabled").write_text("deb http://old.example/ x main\n")
    text = deb_src(tmp_path)
    stanzas = text.strip().split("\n\n")
    assert stanzas == [
        "Types: deb-src\nURIs: http://mirror.example/debian\nSuites: bookworm\nComponents: main contrib\n"
        "Signed-By: /usr/share/keyrings/a.gpg",
        "Types: deb-src\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg",
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FailedPrecondition, match="no apt source under"):
        deb_src(empty)


def test_build_without_apt_sources_or_the_package_says_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_tool("musl-gcc", "musl-tools")
    need_tool("dpkg-source", "dpkg-dev")
    (tmp_path / "apt").mkdir()
    monkeypatch.setattr(smallbusybox, "APT_SOURCES", tmp_path / "apt")
    with pytest.raises(FailedPrecondition, match="no apt source under"):
        smallbusybox.build(tmp_path / "cache", ["sh"])
    left = [p.name for p in (tmp_path / "cache" / "busybox").rglob("*")]
    assert left == ["src"]  # nothing half-built or half-fetched is left
    monkeypatch.setattr(smallbusybox, "PACKAGE", "slim-no-such-package")
    with pytest.raises(FailedPrecondition, match="slim-no-such-package is not installed on the build host"):
        smallbusybox.build(tmp_path / "cache", ["sh"])


def test_check_refuses_a_dynamic_busybox_or_one_without_an_applet(tmp_path: Path) -> None:
    ours = Path(initrd_busybox())
    check(ours, ["sh", "wget", "switch_root"])
    with pytest.raises(FailedPrecondition, match="has no telnet, vi"):
        check(ours, ["sh", "vi", "telnet"])
    dynamic = shutil.which("ls")
    assert dynamic is not None
    with pytest.raises(FailedPrecondition, match="is not linked statically"):
        check(Path(dynamic), ["sh"])
