"""slim.core.build.agentrt: the agent's runtime in the initrd — its standard library as one zip
of bytecode compiled by the initrd's own Python, the agent's bytecode beside its sources, and
an unpacked runtime that imports the agent without compiling anything and without warnings.

The agent itself booting from its initrd is in tests/test_agent.py (chrooted) and
tests/test_vm_boot.py (QEMU)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import shutil
import subprocess
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from labs import initrdroot
from slim.agent import report_up
from slim.agent.ee import UNZSTD
from slim.core.build import smallbusybox, smallpython, unzstd
from slim.core.build.agentrt import (
    AGENT_DIR,
    AGENT_ROOT,
    APPLETS,
    BUSYBOX,
    BUSYBOX_APPLETS,
    INIT,
    PYTHON,
    UDHCPC,
    ZSTD,
    Runtime,
    add_runtime,
    byte_compile,
    collect,
    stored_zip,
)
from slim.core.build.image import default_cache_dir
from slim.core.build.initrd import CpioArchive
from slim.core.build.medium import MEDIUM_INIT
from slim.errors import FailedPrecondition
from slim.signing import SigningKey
from tests.support import need, need_tool

PYC_HEADER = 16  # magic, flags, source hash (PEP 552)


@cache
def runtime() -> Runtime:
    """The runtime as `slim ee build` collects it: Python linked small, in SLIM's cache."""
    need(PYTHON.exists() and shutil.which("ldd") is not None, "Debian's python3 and ldd")
    rt = collect(build_cache=default_cache_dir())
    assert rt.warnings == []  # ./run installs gcc and python3-dev
    return rt


@cache
def python_facts() -> dict[str, str]:
    """The initrd's Python: its magic number, the zip its sys.path names, its cache tag."""
    out = subprocess.run(
        [str(PYTHON.resolve()), "-S", "-I", "-c", "import importlib.util, json, sys; print(json.dumps({"
         "'magic': importlib.util.MAGIC_NUMBER.hex(), 'zip': [p for p in sys.path if p.endswith('.zip')][0],"
         "'tag': sys.implementation.cache_tag, 'stdlib': sys.path[1]}))"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    facts: dict[str, str] = json.loads(out)
    return facts


def stdlib_zip(rt: Runtime) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(rt.data[python_facts()["zip"]]))


def test_the_standard_library_is_one_zip_of_bytecode() -> None:
    rt, facts = runtime(), python_facts()
    z = stdlib_zip(rt)
    names = z.namelist()
    assert names == sorted(names) and all(n.endswith(".pyc") for n in names)
    assert all(
        i.compress_type == zipfile.ZIP_STORED and i.date_time == (1980, 1, 1, 0, 0, 0) for i in z.infolist()
    )
    # what the agent imports, found by importing it: json, http.client, argparse...
    for needed in ("json/__init__.pyc", "json/decoder.pyc", "http/client.pyc", "argparse.pyc"):
        assert needed in names, needed
    # ...not what is frozen into the interpreter, nor what is left out
    for frozen in ("os.pyc", "abc.pyc", "codecs.pyc", "io.pyc", "importlib/_bootstrap.pyc", "zipimport.pyc"):
        assert frozen not in names, frozen
    assert "ssl.pyc" not in names and "lzma.pyc" not in names
    for name in names:
        pyc = z.read(name)
        assert pyc[:4].hex() == facts["magic"], name
        assert int.from_bytes(pyc[4:8], "little") == 0b01, name  # hash-based, never checked: no source
    # no standard-library source but the landmark by which Python finds its prefix
    stdlib = facts["stdlib"]
    sources = [d for d in rt.files if d.startswith(f"{stdlib}/") and d.endswith(".py")]
    assert sources == [f"{stdlib}/os.py"]
    # extension modules stay files; _uuid (and libuuid) are left out
    assert any(d.startswith(f"{stdlib}/lib-dynload/_json.") for d in rt.files)
    assert not any("_uuid" in d or "libuuid" in d for d in rt.files)


def test_the_agent_has_its_bytecode_beside_its_sources() -> None:
    rt, facts = runtime(), python_facts()
    sources = sorted(p.name for p in AGENT_DIR.glob("*.py"))
    assert sorted(Path(d).name for d in rt.files if d.startswith(f"{AGENT_ROOT}/")) == sources
    for name in sources:
        pyc = rt.data[f"{AGENT_ROOT}/slim/agent/__pycache__/{name[:-3]}.{facts['tag']}.pyc"]
        assert pyc[:4].hex() == facts["magic"]
        assert int.from_bytes(pyc[4:8], "little") == 0b11  # hash-based, checked against the source


def test_collect_gives_the_same_bytes_twice() -> None:
    first = runtime()
    second = collect(build_cache=default_cache_dir())
    assert second.data.keys() == first.data.keys()
    assert all(second.data[k] == first.data[k] for k in first.data)
    assert second.files == first.files


FACTS = "import json, sys; print(json.dumps([sys.version, sys.builtin_module_names]))"


def test_the_initrds_python_is_debians_without_what_the_agent_never_uses(tmp_path: Path) -> None:
    """Linked again from Debian's libpython3.11.a without smallpython.LEFT_OUT: the same
    version, at Debian's path in the initrd, smaller, without libexpat; the same bytes
    when linked again (a fresh cache), and taken from the cache the next time."""
    rt = runtime()
    debian = PYTHON.resolve()
    small = rt.files[str(debian)]
    assert small != debian and small.stat().st_size < debian.stat().st_size - 1_000_000
    assert not any("libexpat" in p for p in rt.files)

    def facts(python: Path) -> dict[str, Any]:
        out = subprocess.run(
            [str(python), "-S", "-I", "-c", FACTS],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        version, builtins = json.loads(out)
        return {"version": version, "builtins": set(builtins)}

    mine, theirs = facts(small), facts(debian)
    assert mine["version"] == theirs["version"]
    assert mine["builtins"] == theirs["builtins"] - set(smallpython.LEFT_OUT)
    again = smallpython.link(debian, tmp_path)
    assert again != small and again.read_bytes() == small.read_bytes()
    assert smallpython.link(debian, tmp_path) == again


MATH = """
import json, math, random
r = random.Random(20)
xs = [r.uniform(-3, 3) for _ in range(400)] + [r.uniform(-700, 700) for _ in range(400)]
xs += [0.5, 1.0, 2.0, 10.0]
out = {}
for name in "exp log sin cos tan atan sqrt floor ceil erf expm1 log1p cbrt tanh".split():
    values = []
    for x in xs:
        try:
            values.append(getattr(math, name)(x))
        except ValueError:
            values.append("ValueError")
    out[name] = values
out["pow"] = [abs(x) ** 1.7 for x in xs]
errors = []
for expression in ("2.0 ** 5000", "math.exp(1000)", "math.log(-1)", "math.fmod(1, 0)", "math.cosh(1000)"):
    try:
        eval(expression)
        errors.append("none")
    except (OverflowError, ValueError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
exact = [math.exp(1), math.sqrt(2), 2 ** 0.5, math.pi / 4]
print(json.dumps({"values": out, "errors": errors, "exact": exact}))
"""


def test_the_initrds_python_has_its_libm_linked_in() -> None:
    """No libm.so: the functions it calls are linked in from glibc's static libm, their
    baseline x86-64 code (the same within two ulps of what Debian's python3 gives where it picks
    FMA code, with the same errors)."""
    rt = runtime()
    debian = PYTHON.resolve()
    small = rt.files[str(debian)]
    assert not any("libm.so" in p for p in rt.files)
    assert (
        "libm.so"
        not in subprocess.run(["ldd", str(small)], capture_output=True, text=True, check=True).stdout
    )

    def ask(python: Path, code: str) -> Any:
        out = subprocess.run(
            [str(python), "-S", "-I", "-c", code], capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout)

    mine, theirs = ask(small, MATH), ask(debian, MATH)
    assert mine["errors"] == theirs["errors"] and mine["exact"] == theirs["exact"]
    assert (
        mine["errors"][0].startswith("OverflowError") and mine["errors"][2] == "ValueError: math domain error"
    )
    for name, values in theirs["values"].items():
        for a, b in zip(mine["values"][name], values, strict=True):
            assert a == b or (isinstance(a, float) and abs(a - b) <= 2 * math.ulp(b)), (name, a, b)


def test_the_initrds_busybox_is_static_with_only_the_applets_slim_runs() -> None:
    """Built from Debian's source of busybox-static, linked with musl: static (the agent
    copies it into any EE), the applets of the boot and of the EE's scripts and no other,
    a fifth of Debian's size."""
    need_tool("musl-gcc", "musl-tools")
    rt = runtime()
    ours = rt.files["/bin/busybox"]
    assert ours != BUSYBOX and ours.stat().st_size < BUSYBOX.stat().st_size / 4
    ldd = subprocess.run(["ldd", str(ours)], capture_output=True, text=True, check=False)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr
    listed = subprocess.run([str(ours), "--list"], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(listed) == sorted({*APPLETS, *report_up.APPLETS, "busybox"})
    assert all(rt.links[f"/bin/{applet}"] == "busybox" for applet in APPLETS)
    assert rt.links["/sbin/modprobe"] == "../bin/busybox"
    # the init script's and the report's shell: parameter expansion, read, case, arithmetic
    script = 'i=/sys/class/net/eth0; r="10.0.0.1 10.0.0.2"; ' \
        'printf "a b\n" | while read -r x y; do echo "$y"; done; ' \
        'case "${i##*/}" in eth*) echo "${r%% *}" "${mask:-24}";; esac; echo $((2 + 7 % 4))'  # fmt: skip
    out = subprocess.run([str(ours), "sh", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout == "b\n10.0.0.1 24\n5\n"
    assert smallbusybox.build(default_cache_dir(), BUSYBOX_APPLETS) == ours  # from the cache


SHELL = {  # ash's keywords and builtins (busybox's ash has test, echo and printf built in)
    "if", "then", "else", "elif", "fi", "for", "in", "do", "done", "while", "until", "case", "esac",
    "[", "test", "echo", "printf", "read", "exit", "export", "set", "shift", "break", "continue", "return",
    "local", "exec", "command", ":", "true", "false", "cd", "umask", "trap", "wait", "eval",
}  # fmt: skip


def shell_commands(script: str) -> set[str]:
    """The commands a shell script runs (roughly: the first word of each simple command,
    after exec and variable assignments), less the functions it defines."""
    lines = [
        re.sub(r"^\s*[^\s()]+\)", " ", line)
        for line in script.splitlines()
        if not line.lstrip().startswith("#")
    ]
    functions = {m.group(1) for line in lines if (m := re.match(r"\s*(\w+)\(\)", line))}
    found = set()
    text = re.sub(r"\d*[<>]&\d+", " ", "\n".join(lines))  # 2>&1: not a command separator
    for segment in re.split(r"[\n;|&]+|\$\(|`|\bdo\b|\bthen\b|\belse\b", text):
        words = [w for w in segment.split() if not re.fullmatch(r"\w+=\S*", w)]
        while words and words[0] in ("exec", "!"):
            words.pop(0)
        if words and re.fullmatch(r"[\w.\[:/-]+", words[0]) and words[0] not in functions:
            found.add(words[0])
    return found


def test_the_initrds_scripts_run_only_busybox_applets_and_shell_builtins() -> None:
    """busybox has only agentrt.APPLETS (and the EE's scripts' own): every command the
    initrd's /init, its DHCP script and a boot medium's /init run is one of them, or the shell's."""
    for name, script, some in (
        ("init", INIT.format(root=AGENT_ROOT), {"mount", "insmod", "ip", "udhcpc", "env"}),
        ("udhcpc.sh", UDHCPC, {"ip"}),
        ("medium init", MEDIUM_INIT.format(medium="m1", root=AGENT_ROOT), {"mount", "cat", "sleep", "env"}),
    ):
        used = shell_commands(script)
        assert some <= used, (name, used)  # the parser sees the commands
        assert used - SHELL - set(APPLETS) == set(), name


def test_the_initrds_zstd_is_the_decompression_only_one() -> None:
    """tests/test_unzstd.py checks it against Debian's; here: it is the one in the initrd,
    where the agent looks for the zstd that checks digests, and zstd's compression
    libraries are not."""
    rt = runtime()
    assert rt.files[UNZSTD] == unzstd.build(default_cache_dir()) != ZSTD
    assert "/usr/bin/zstd" not in rt.files and rt.links["/usr/bin/zstd"] == "../lib/slim/unzstd"
    assert not any("libz.so" in p for p in rt.files)  # the interpreter has zlib linked in
    assert not any(lib in p for p in rt.files for lib in ("liblzma", "liblz4"))


def test_without_gcc_the_initrd_takes_debians_python_zstd_and_busybox_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need(PYTHON.exists() and shutil.which("ldd") is not None, "Debian's python3 and ldd")
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("ldd", "ar", "nm"):  # everything but gcc
        (bare / tool).symlink_to(shutil.which(tool) or "/nonexistent")
    monkeypatch.setenv("PATH", str(bare))
    with pytest.raises(FailedPrecondition, match="gcc is missing on the build host"):
        smallpython.link(PYTHON.resolve(), tmp_path / "cache")
    rt = collect(build_cache=tmp_path / "cache")
    assert rt.files[str(PYTHON.resolve())] == PYTHON.resolve() and rt.files["/usr/bin/zstd"] == ZSTD
    assert rt.files["/bin/busybox"] == BUSYBOX
    assert UNZSTD not in rt.files  # the agent checks digests itself: Debian's zstd takes no --sha256
    assert len(rt.warnings) == 3 and all("gcc is missing on the build host" in w for w in rt.warnings)
    assert any("Debian's python3.11, about 0.5 MB more" in w for w in rt.warnings)
    assert any("Debian's zstd, about 0.5 MB more" in w for w in rt.warnings)
    assert any("Debian's busybox, about 0.4 MB more" in w for w in rt.warnings)


def test_stored_zip_is_deterministic_and_uncompressed() -> None:
    members = {"b.pyc": b"x" * 1000, "a/__init__.pyc": b"y"}
    data = stored_zip(members)
    assert data == stored_zip(dict(reversed(members.items())))
    z = zipfile.ZipFile(io.BytesIO(data))
    assert z.namelist() == ["a/__init__.pyc", "b.pyc"]
    assert z.getinfo("b.pyc").compress_size == 1000 and z.read("b.pyc") == b"x" * 1000


def test_byte_compile_names_the_file_that_does_not_compile(tmp_path: Path) -> None:
    need(PYTHON.exists(), "Debian's python3")
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text('"""doc"""\nassert True\n')
    bad.write_text("def (:\n")
    one, two = byte_compile(PYTHON, [(good, "/x/good.py", 0, True), (good, "/x/good.py", 2, False)])
    assert one[16:] != two[16:]  # -OO: no docstring, no assert
    with pytest.raises(FailedPrecondition, match=r"bad\.py"):
        byte_compile(PYTHON, [(good, "good.py", 0, False), (bad, "bad.py", 0, False)])


# What the unpacked runtime's Python says about the modules it imported for the agent.
_CHECK = """
import json, sys
import slim.agent.__main__, slim.agent.ee, slim.agent.fetch, slim.agent.plan, slim.agent.medium
import json as j, http.client, socket
slim.agent.fetch.Relays(["http://127.0.0.1:1"])  # every path to a relay (the agent, a medium)
socket.getaddrinfo("127.0.0.1", 1)  # the socket module encodes every host name with "idna"
import importlib, slim.agent
for name in slim.agent.DEFERRED:  # what the agent imports only when it needs it is there too
    importlib.import_module(name)
out = {}
for name, mod in sys.modules.items():
    spec = getattr(mod, "__spec__", None)
    if spec is not None:
        loader = spec.loader if isinstance(spec.loader, type) else type(spec.loader)  # a class or an instance
        out[name] = [loader.__name__, spec.origin, spec.cached]
print(json.dumps({"modules": out, "optimize": sys.flags.optimize, "agent_doc": slim.agent.__main__.__doc__,
                  "json_doc": j.__doc__, "builtins": sys.builtin_module_names}))
"""


def test_the_unpacked_runtime_imports_the_agent_from_bytecode_only(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "root (chroot)")
    need_tool("cpio")
    assert shutil.which("chroot") is not None
    rt = dataclasses.replace(runtime(), data=dict(runtime().data))
    rt.trust([SigningKey.load_or_create(tmp_path / "keys").public])
    archive = CpioArchive()
    add_runtime(archive, rt)
    root = initrdroot.unpack(archive, tmp_path / "root")
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    def python(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            initrdroot.python(root, *args, "-c", _CHECK), env=initrdroot.ENV,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    proc = python()
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no "Could not find platform independent libraries"
    got = json.loads(proc.stdout)
    # -v names each code object's file: bytecode only (slim/__init__.py is empty)
    verbose = python("-v")
    loaded = [
        line.split(" from ", 1)[1].strip("'")
        for line in verbose.stderr.splitlines()
        if "code object from" in line
    ]
    assert loaded and all(f.endswith(".pyc") for f in loaded if f != f"{AGENT_ROOT}/slim/__init__.py"), loaded
    zip_path = python_facts()["zip"]
    for name, (loader, origin, cached) in got["modules"].items():
        if name in ("__main__", "slim"):  # -c; slim/__init__.py is empty
            continue
        if name.startswith("slim"):  # from the agent's own bytecode, checked against its source
            if origin is not None:
                assert loader == "SourceFileLoader" and cached and (root / cached.lstrip("/")).is_file(), name
        else:  # never compiled from a source
            assert loader in ("zipimporter", "FrozenImporter", "BuiltinImporter", "ExtensionFileLoader"), (
                name,
                loader,
            )
            if loader == "zipimporter":
                assert origin.startswith(f"{zip_path}/"), (name, origin)
    assert "unicodedata" not in got["builtins"] and "unicodedata" not in got["modules"]
    assert got["optimize"] == 0  # the agent's asserts hold
    assert got["agent_doc"] and got["json_doc"] is None  # the standard library's as -OO
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before  # nothing written
