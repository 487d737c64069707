"""The initrd's Python interpreter, linked without what the agent never uses.

Debian's ``python3.11`` has about sixty modules built in (its ``config.c``), linked
from its static ``libpython3.11.a``.  A few of them are large and nothing the agent
runs imports them: ``unicodedata`` alone, the Unicode database, is 1.1 MB of the
6.8 MB binary, and ``pyexpat`` brings ``libexpat``.  :func:`link` links the same
interpreter again, from the same objects of Debian's ``libpython3.11-dev`` with the
flags Python was linked with, leaving out the modules in :data:`LEFT_OUT`: the same
code as ``/usr/bin/python3.11`` for everything else, about 0.5 MB less in the
compressed initrd (docs/benchmarks/, initrd size).  More cuts, 0.2 MB, then 0.35 MB:

- zlib is linked in from its static library (Debian's ``zlib1g-dev``, which
  ``python3-dev`` brings): ``binascii`` uses its CRC-32, nothing the agent runs
  compresses (the ``zlib`` module is left out; the standard library's zip is stored),
  and ``libz.so.1`` need not come along;
- the call-frame tables (``.eh_frame``, for unwinding C frames: C++ exceptions,
  ``pthread_exit`` and ``pthread_cancel``) are removed from the result.  Python's
  tracebacks and ``faulthandler``'s are its own; the one unwinding is glibc's
  ``pthread_exit``, which Python 3.11 calls for a daemon thread still running when the
  interpreter shuts down, and which needs ``libgcc_s``: no initrd has it, with or without
  the tables (the agent ends with ``os._exit``, which shuts nothing down);
- on x86-64, the functions it calls from ``libm`` are linked in from glibc's static ``libm.a``
  (0.31 MB) instead of loading the whole ``libm.so.6`` (0.91 MB).  That library picks each
  function's code for the CPU (FMA, AVX2) from the C library's record of the CPU's
  features, which in a dynamically linked program is the loader's and not reachable:
  :data:`_CPU_FEATURES_C` gives it one with no feature, so each function is glibc's
  baseline x86-64 code, what glibc runs on a CPU without them.  Against Debian's
  interpreter on a machine with FMA: the same errors and exceptions, and the same
  results but for a rare one that differs in its last bit or two (tests/test_agentrt.py
  compares them).

The agent copes with what is gone: the socket module's host-name codec, ``idna``,
needs ``unicodedata``; the agent registers an ASCII one in its place
(:func:`slim.agent.fetch.ascii_host_names`).  What the agent imports is found by
importing it with this interpreter (:mod:`slim.core.build.agentrt`), so a module it
imports and lost fails the build, naming it (a module imported only inside a function
is found only if ``slim.agent.DEFERRED`` lists it; the standard library's own lazy
imports of ``unicodedata``, for non-ASCII URLs, are refused first by the agent).

Needs on the build host: ``gcc`` and binutils, and Debian's ``python3-dev`` (for
``libpython3.11.a``, ``config.c`` and ``libz.a``; it brings ``libc6-dev``, whose ``libm.a``
is linked in).  The result is cached in SLIM's cache under a
key of its inputs (the library's digest, ``config.c``, the flags, gcc's version);
without those packages :func:`link` raises :class:`~slim.errors.FailedPrecondition`
saying what is missing, and the initrd takes Debian's binary (agentrt says so).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from slim.errors import FailedPrecondition

# Built into Debian's interpreter, imported by nothing the agent runs (the build checks
# by importing the agent with the result), and linked from objects nothing else needs.
LEFT_OUT = (
    "unicodedata",  # the Unicode database; only the "idna" codec and NFKC uses need it
    "pyexpat",  # XML, with libexpat
    "_elementtree",
    "_pickle",  # pickle falls back to its Python implementation
    "_csv",
    "cmath",
    "_statistics",
    "_symtable",
    "spwd",
    "syslog",
    "xxsubtype",  # an example module
    "zlib",  # compression: shutil and zipfile do without it (the zip of the standard library is stored)
    "_datetime",  # datetime's C half: its Python half (in the zip either way) does the same
)

_STRIPPED = (".eh_frame", ".eh_frame_hdr")  # sections removed from the result (the module docstring)
# glibc's static libm picks each function's code for the CPU (FMA, AVX2...) from the C
# library's record of its features, which only a static program has (in a dynamic one it is
# the loader's, not exported): all zero here, so that every function is its baseline
# x86-64 code, which is what glibc runs on a CPU without those features.
_CPU_FEATURES_C = (
    "/* no CPU feature usable: libm's functions are their baseline x86-64 code */\n"
    '__attribute__((visibility("hidden"), aligned(64))) const unsigned char _dl_x86_cpu_features[4096];\n'
    "/* two of libc's functions by the names libm calls them (static libc has both names) */\n"
    "double frexp(double, int *);\n"
    "double ldexp(double, int);\n"
    '__attribute__((visibility("hidden"))) double __frexp(double x, int *e) { return frexp(x, e); }\n'
    '__attribute__((visibility("hidden"))) double __ldexp(double x, int e) { return ldexp(x, e); }\n'
)
_MAIN_C = '#include "Python.h"\nint main(int argc, char **argv) { return Py_BytesMain(argc, argv); }\n'
_CONFIG = (
    "import json, sys, sysconfig\n"
    "v = {k: sysconfig.get_config_var(k) or '' for k in "
    "('LIBPL', 'LIBRARY', 'INCLUDEPY', 'LINKFORSHARED', 'LIBS', 'SYSLIBS', 'MODLIBS', 'VERSION')}\n"
    "print(json.dumps({**v, 'version': sys.version, 'builtins': list(sys.builtin_module_names)}))"
)
_LDD_RE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")  # ldd: [NAME =>] /PATH (0xADDR)
_PYINIT = re.compile(r"\.a:([^:/]+\.o):[0-9a-f]*\s+T\s+PyInit_(\w+)$")  # nm -A: LIB.a:OBJ.o:ADDR T NAME


def tool(name: str, package: str) -> str:
    """The path of a build tool, or FailedPrecondition naming the Debian package it comes in."""
    path = shutil.which(name)
    if path is None:
        raise FailedPrecondition(f"{name} is missing on the build host (Debian's {package} package)")
    return path


def run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """A build tool's output, or FailedPrecondition with the end of what it said (``env``:
    more environment)."""
    proc = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, check=False, env={**os.environ, **env} if env else None
    )
    if proc.returncode != 0:
        raise FailedPrecondition(
            f"{' '.join(argv[:3])} … failed: {(proc.stderr or proc.stdout).strip()[-800:]}"
        )
    return proc.stdout


def cached(path: Path) -> bool:
    """``path`` is a build kept before, and nobody else could have changed it: a regular
    file of ours that only we may write (it runs as root on every node).  A file that is
    not is built again and replaced."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def keep(built: Path, out: Path) -> Path:
    """Put ``built`` (made in a private directory beside ``out``'s) at ``out`` in one rename,
    executable by all and writable only by us (:func:`cached` checks that)."""
    os.chmod(built, 0o755)  # noqa: S103 - an executable for everyone, like /usr/bin/python3
    out.parent.mkdir(exist_ok=True)
    os.replace(built, out)
    return out


def shared_libraries(binary: Path, env: dict[str, str] | None = None) -> list[Path]:
    """The libraries (and the loader) ``ldd`` lists for ``binary``, none for a static one
    (``env``: more environment for ldd, e.g. LD_LIBRARY_PATH)."""
    try:
        out = subprocess.run(
            ["ldd", str(binary)],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "LC_ALL": "C", **(env or {})},  # its messages untranslated
        ).stdout
    except FileNotFoundError:
        raise FailedPrecondition("ldd is missing on the build host (Debian's libc-bin)") from None
    if "not a dynamic executable" in out or "statically linked" in out:
        return []
    return [Path(m.group(1)) for m in _LDD_RE.finditer(out)]


def static_library(gcc: str, name: str, package: str) -> Path:
    """Where gcc finds the static library ``name``, or FailedPrecondition naming its package."""
    library = Path(run([gcc, f"-print-file-name={name}"]).strip())
    if not library.is_absolute() or not library.is_file():
        raise FailedPrecondition(f"{name} is missing: install Debian's {package} on the build host")
    return library


def _libm_members(libm: Path) -> list[Path]:
    """The archives ``libm.a`` stands for (a linker script naming glibc's libm and libmvec)."""
    text = libm.read_bytes()
    if text.startswith(b"!<arch>"):
        return [libm]
    found = [Path(p) for p in re.findall(rb"(/\S+\.a)\b", text) for p in [p.decode()]]
    if not found or not all(p.is_file() for p in found):
        raise FailedPrecondition(f"{libm} names no static library this can read")
    return found


def link(python: Path, cache: Path) -> Path:
    """The interpreter ``python`` (Debian's) linked again without :data:`LEFT_OUT`, from
    ``cache`` when it was linked before from the same inputs."""
    gcc, ar, nm = tool("gcc", "gcc"), tool("ar", "binutils"), tool("nm", "binutils")
    objcopy = tool("objcopy", "binutils")
    config = json.loads(run([str(python), "-S", "-I", "-c", _CONFIG]))
    libpl = Path(config["LIBPL"])
    library, config_c = libpl / config["LIBRARY"], libpl / "config.c"
    if not config["LIBRARY"].endswith(".a") or not library.is_file() or not config_c.is_file():
        raise FailedPrecondition(
            f"{library} or {config_c} is missing: install Debian's python3-dev package on the build host"
        )
    left_out = [m for m in LEFT_OUT if m in config["builtins"]]
    cflags = ["-O2", "-fwrapv", "-fno-pie", f"-I{config['INCLUDEPY']}"]
    ldflags = ["-no-pie", "-s", *config["LINKFORSHARED"].split(), "-Wl,--as-needed"]
    libz = static_library(gcc, "libz.a", "zlib1g-dev")
    static = {"-lz": str(libz)}
    libm_members: list[Path] = []
    x86_64 = platform.machine() == "x86_64"  # where _CPU_FEATURES_C is libm's own record
    if x86_64:
        libm = static_library(gcc, "libm.a", "libc6-dev")
        static["-lm"] = str(libm)
        libm_members = _libm_members(libm)
    libs = [
        static.get(lib, lib)
        for lib in (*config["LIBS"].split(), *config["SYSLIBS"].split(), *config["MODLIBS"].split())
    ]
    key = hashlib.sha256()
    for lib in (library, libz, *libm_members):
        with open(lib, "rb") as f:
            key.update(hashlib.file_digest(f, "sha256").digest())
    key.update(config_c.read_bytes())
    tools = [run([gcc, "--version"]), run([objcopy, "--version"])]
    inputs = [
        config,
        left_out,
        _MAIN_C,
        _CPU_FEATURES_C if x86_64 else "",
        cflags,
        ldflags,
        libs,
        _STRIPPED,
        tools,
    ]
    key.update(json.dumps(inputs).encode())
    out = cache / "python" / key.hexdigest()[:32] / f"python{config['VERSION']}"
    if cached(out):
        return out
    out.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent.parent, prefix=".link.") as tmp:
        work = Path(tmp)
        objs = work / "objs"
        objs.mkdir()
        # the object that defines each left-out module's PyInit_ function goes
        defines = {}
        for line in run([nm, "-A", "--defined-only", str(library)]).splitlines():
            if m := _PYINIT.search(line):
                defines[m.group(2)] = m.group(1)
        missing = [m for m in left_out if m not in defines]
        if missing:
            raise FailedPrecondition(
                f"{library} has no object for the built-in module(s) {', '.join(missing)}"
            )
        run([ar, "x", str(library)], cwd=objs)
        for name in {defines[m] for m in left_out} | {"config.o", "python.o"}:
            (objs / name).unlink(missing_ok=True)
        text = config_c.read_text()
        for module in left_out:
            text, n = re.subn(rf"^.*\bPyInit_{module}\b.*\n", "", text, flags=re.M)
            if n != 2:  # its declaration and its line in the table
                raise FailedPrecondition(f"{config_c}: {module} is not built in as expected ({n} lines)")
        (work / "config.c").write_text(text)
        (work / "python.c").write_text(_MAIN_C)
        ours = ["python.c", "config.c"]
        if x86_64:
            (work / "cpu.c").write_text(_CPU_FEATURES_C)
            ours.append("cpu.c")
        run([gcc, *cflags, "-c", *ours], cwd=work)
        linked = work / out.name
        objects = [*(c.replace(".c", ".o") for c in ours), *sorted(str(p) for p in objs.glob("*.o"))]
        run([gcc, "-o", str(linked), *objects, *ldflags, *libs], cwd=work)
        run([objcopy, *(f"--remove-section={section}" for section in _STRIPPED), str(linked)])
        loads = " ".join(p.name for p in shared_libraries(linked))
        for lib in ("libz.so", "libm.so") if x86_64 else ("libz.so",):
            if lib in loads:
                raise FailedPrecondition(f"{linked} still loads {lib}")
        check = json.loads(run([str(linked), "-S", "-I", "-c", _CONFIG]))
        if check["version"] != config["version"] or set(check["builtins"]) & set(left_out):
            raise FailedPrecondition(f"{linked} is not {python} without {', '.join(left_out)}")
        return keep(linked, out)
