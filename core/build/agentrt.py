"""The agent's runtime in the initrd: busybox, zstd, a minimal Python, the agent.

Everything comes from the build host (the core's machine: same architecture
as the nodes), at the same paths, so that binaries find their libraries and
Python finds its standard library without configuration:

- busybox, static, with only the applets the boot and the environment's report scripts
  run (:mod:`slim.core.build.smallbusybox`: Debian's source, linked with musl; Debian's
  ``busybox-static`` where the build host cannot build it, with a warning), and a link
  per applet the boot needs;
- ``zstd`` for decompression only, which also checks an archive's digest as it reads it
  (:mod:`slim.core.build.unzstd`, at ``/usr/lib/slim/unzstd``, where the agent looks for
  it: ``slim.agent.ee.UNZSTD``; Debian's whole ``zstd`` where the build host cannot
  compile it, with a warning, and then the agent checks digests itself) and the shared
  libraries ``ldd`` lists for it;
- Debian's ``python3`` linked again without the built-in modules the agent never
  uses (:mod:`slim.core.build.smallpython`; Debian's binary itself where the build host
  cannot link, with a warning), its libraries, and only the standard-library
  modules the agent imports — found by importing the agent with that very
  Python and listing ``sys.modules`` — plus the extension modules among them
  with their libraries.  The pure-Python ones are byte-compiled by that Python
  into one uncompressed zip at the path its ``sys.path`` names first
  (``/usr/lib/python311.zip``; :data:`STDLIB_OPTIMIZE`), so the agent starts
  without compiling them (a third of the time); those frozen into the interpreter
  are left out (``os.py`` stays: Python finds its prefix by it);
- Debian's ``signify-openbsd`` and its libraries, and the core's public keys under
  ``/etc/slim/keys`` (:meth:`Runtime.trust`): the agent checks each plan's signature
  with them before it fetches or mounts anything;
- with ``https`` (a registry with an ``https://`` relay URL): Python's ``ssl`` and
  ``_ssl`` with OpenSSL's libraries, and SLIM's CA certificate as ``/etc/slim/ca.pem``
  (:meth:`Runtime.trust_ca`), which relays' certificates must chain to.  Without it
  they are left out (they are most of the initrd's growth: docs/benchmarks/, initrd
  size) and the agent speaks plain HTTP only;
- the agent's package (``slim.agent``, standard library only) under
  ``/lib/slim``: its sources (for tracebacks) and their bytecode beside them
  (``__pycache__``, checked against the source by hash, optimization level 0:
  the agent uses ``assert``).

Nothing here runs the agent; :func:`add_runtime` only adds files to an
:class:`~slim.core.build.initrd.InitrdBuilder`.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import slim.agent
from slim.agent import report_up
from slim.agent.ee import UNZSTD
from slim.core.build import smallbusybox, smallpython, unzstd
from slim.core.build.initrd import CpioArchive
from slim.core.build.smallpython import shared_libraries
from slim.core.registry import Registry
from slim.errors import FailedPrecondition
from slim.signing import PublicKey

AGENT_DIR = Path(slim.agent.__file__).resolve().parent  # what goes under AGENT_ROOT/slim/agent
PYTHON = Path("/usr/bin/python3")
BUSYBOX = Path("/bin/busybox")
ZSTD = Path("/usr/bin/zstd")
SIGNIFY = Path("/usr/bin/signify-openbsd")  # checks the core's signature of each plan
KEYS_DIR = "/etc/slim/keys"  # the public keys the agent trusts (slim.agent.verify)
CA_FILE = "/etc/slim/ca.pem"  # SLIM's CA, for https relays (slim.agent.fetch.CA_FILE)
APPLETS = (
    "sh", "mount", "umount", "mkdir", "ln", "cat", "echo", "sleep", "ip", "udhcpc", "insmod",
    "modprobe", "switch_root", "mknod", "ls", "rm", "mke2fs", "poweroff", "reboot", "dmesg", "env",
)  # fmt: skip
BUSYBOX_APPLETS = (*APPLETS, *report_up.APPLETS)  # what the build's busybox has (smallbusybox)
AGENT_ROOT = "/lib/slim"  # PYTHONPATH in the initrd: /lib/slim/slim/agent/...


# Imports every module the agent needs and prints where the standard-library ones live.
# Optional to everything the agent uses (imported under try/except) and large (OpenSSL):
# left out, and blocked in the probe so that nothing that needs them is missed.  ssl is
# the exception when the initrd must speak HTTPS (collect(https=True)): then it is in.
# _uuid (and libuuid) only speeds up uuid.uuid1(); the agent parses UUIDs, and uuid works without it.
SSL_MODULES = ("_ssl", "ssl")
LEFT_OUT = (*SSL_MODULES, "_hashlib", "_bz2", "bz2", "_lzma", "lzma", "_uuid")
_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
for name in sys.argv[2].split(","):
    sys.modules[name] = None  # import fails as if absent
import slim.agent.__main__, slim.agent.ee, slim.agent.fetch, slim.agent.plan, slim.agent.medium  # noqa
import importlib, os, slim.agent  # noqa: every module of the agent, and what it imports only when needed
for f in sorted(os.listdir(slim.agent.__path__[0])):
    if f.endswith(".py") and f != "__init__.py":
        importlib.import_module("slim.agent." + f[:-3])
for name in slim.agent.DEFERRED:
    importlib.import_module(name)
import encodings.utf_8, encodings.latin_1, encodings.ascii, encodings.aliases  # noqa
import runpy, importlib.util, importlib.machinery  # noqa: python -m needs these
try:
    import encodings.idna  # noqa: socket encodes host names with it, lazily
except ImportError:
    pass  # an interpreter without unicodedata: the agent brings an ASCII codec (fetch.ascii_host_names)
if sys.argv[3] == "https":
    import ssl  # noqa: the agent imports it at its first https relay
    slim.agent.fetch.relay_connection()
import os
out = {}
frozen = []  # in the interpreter itself: no file needed
for name, mod in sorted(sys.modules.items()):
    f = getattr(mod, "__file__", None)
    if f and not name.startswith("slim") and mod is not None:
        out[name] = f
        if getattr(getattr(mod, "__spec__", None), "origin", None) == "frozen":
            frozen.append(name)
zips = [p for p in sys.path if p.endswith(".zip")]  # getpath's prefix/lib/pythonXY.zip
print(json.dumps({
    "prefix": sys.prefix, "stdlib": os.path.dirname(os.__file__), "zip": zips[0] if zips else "",
    "cache_tag": sys.implementation.cache_tag, "modules": out, "frozen": frozen,
}))
"""

# The standard library's bytecode in the zip is compiled as ``python -OO`` would (no docstrings,
# no asserts) and without column positions (``-X no_debug_ranges``: tracebacks keep their line
# numbers, lose the ^^^ under the column).  Compressed, that is 8 % more than the sources; at
# level 0 with columns it was 85 % more (docs/benchmarks/, initrd size).  The agent's own
# bytecode is compiled at level 0: it uses assert, and its docstrings (argparse's help).
STDLIB_OPTIMIZE = 2
AGENT_OPTIMIZE = 0

# Byte-compiles with the initrd's own Python (its magic number), deterministically: reads
# [source, file name for tracebacks, optimization level, checked] items as JSON on stdin and
# writes each .pyc (PEP 552, hash-based: no timestamps, which the initrd's cpio sets to 0) to
# stdout, preceded by its length in 8 bytes, big-endian.
_COMPILE = """
import importlib.util, json, marshal, sys
out = sys.stdout.buffer
for source, filename, optimize, checked in json.load(sys.stdin):
    with open(source, "rb") as f:
        data = f.read()
    code = compile(data, filename, "exec", dont_inherit=True, optimize=optimize)
    flags = 0b11 if checked else 0b01  # hash-based; checked against the source or never
    pyc = importlib.util.MAGIC_NUMBER + flags.to_bytes(4, "little") + importlib.util.source_hash(data)
    pyc += marshal.dumps(code)
    out.write(len(pyc).to_bytes(8, "big") + pyc)
"""


@dataclass
class Runtime:
    files: dict[str, Path] = field(default_factory=dict)  # path in the initrd -> source
    links: dict[str, str] = field(default_factory=dict)  # path in the initrd -> target
    data: dict[str, bytes] = field(default_factory=dict)  # path in the initrd -> contents
    python: str = ""
    https: bool = False  # Python's ssl and OpenSSL are in: the CA must be too (trust_ca)
    warnings: list[str] = field(default_factory=list)  # the runtime works, but is not what it should be

    def add(self, path: Path, dest: str | None = None) -> None:
        self.files[dest or str(path)] = path

    def trust_ca(self, pem: bytes) -> None:
        """SLIM's CA certificate, which https relays' certificates must chain to."""
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            raise FailedPrecondition("SLIM's CA certificate for the initrd is not a PEM certificate")
        self.data[CA_FILE] = pem

    def trust(self, keys: Sequence[PublicKey]) -> None:
        """The public keys the agent accepts plans from (the core's: during a key rotation,
        the new and the previous), instead of any trusted before."""
        if not keys:
            raise FailedPrecondition(
                "no public key to put into the initrd: the agent would refuse every plan"
            )
        for path in [p for p in self.data if p.startswith(f"{KEYS_DIR}/")]:
            del self.data[path]
        for key in keys:
            self.data[f"{KEYS_DIR}/{key.id}.pub"] = key.text().encode()

    @property
    def trusted(self) -> list[str]:
        """The ids of the keys the initrd trusts."""
        return sorted(p.rsplit("/", 1)[1].removesuffix(".pub") for p in self.data if p.startswith(KEYS_DIR))


def _require(path: Path, package: str) -> Path:
    if not path.exists():
        raise FailedPrecondition(f"{path} is missing: install Debian's {package} package on the build host")
    return path


def _with_libraries(rt: Runtime, binary: Path, dest: str | None = None) -> None:
    """``binary`` (at ``dest`` in the initrd, else at its own path) and the libraries it loads."""
    rt.add(binary, dest)
    for lib in shared_libraries(binary):
        rt.add(lib.resolve(), str(lib))  # the loader and libraries are often symlinks


def _own_or_debians(
    rt: Runtime, debian: Path, build: Callable[[], Path], cache: Path, costs: str = "0.5 MB"
) -> Path:
    """The build's own binary (``build()``, kept in ``cache``), or Debian's ``debian`` with
    a warning saying why and what it ``costs``."""
    try:
        return build()
    except (FailedPrecondition, subprocess.SubprocessError) as exc:  # (a build tool's timeout)
        rt.warnings.append(f"the initrd has Debian's {debian.name}, about {costs} more than needed: {exc}")
    except OSError as exc:  # the cache cannot be written, or what is built there cannot run
        rt.warnings.append(f"the initrd has Debian's {debian.name}: SLIM's cache {cache}: {exc}")
    return debian


def byte_compile(
    python: Path, items: Sequence[tuple[Path, str, int, bool]], *, columns: bool = False
) -> list[bytes]:
    """Each item's .pyc, compiled by ``python`` (the initrd's): (source, file name in
    tracebacks, optimization level, checked against the source by hash when imported).
    ``columns``: with column positions (only to measure what they cost)."""
    todo = [[str(source), name, optimize, checked] for source, name, optimize, checked in items]
    proc = subprocess.run(
        [str(python), "-S", "-I", *([] if columns else ["-X", "no_debug_ranges"]), "-c", _COMPILE],
        input=json.dumps(todo).encode(),
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise FailedPrecondition(
            f"{python} cannot byte-compile: {proc.stderr.decode(errors='replace')[-500:]}"
        )
    out: list[bytes] = []
    at = 0
    while at < len(proc.stdout):
        size = int.from_bytes(proc.stdout[at : at + 8], "big")
        out.append(proc.stdout[at + 8 : at + 8 + size])
        at += 8 + size
    if len(out) != len(todo) or at != len(proc.stdout):
        raise FailedPrecondition(f"{python} byte-compiled {len(out)} of {len(todo)} files")
    return out


def stored_zip(members: dict[str, bytes]) -> bytes:
    """A zip of ``members``, uncompressed (the initrd's compression does better across
    files, and zipimport reads it with nothing but the interpreter), the same bytes for
    the same members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            z.writestr(info, members[name])
    return buf.getvalue()


def registry_runtime(registry: Registry, ca_dir: Path) -> Runtime:
    """The agent's runtime for ``registry``'s initrds (keys still to be trusted): with
    Python's ssl and SLIM's CA (from ``ca_dir``, made if missing) when a relay of the
    registry has an ``https://`` URL, without them otherwise."""
    https = any(u.startswith("https:") for r in registry.relays.values() for u in r.urls)
    from slim.core.build.image import default_cache_dir  # (image imports release, which imports this)

    runtime = collect(https=https, build_cache=default_cache_dir())
    if https:  # the agent checks https relays against SLIM's CA
        from slim.pki import CertificateAuthority

        runtime.trust_ca(CertificateAuthority.load_or_create(ca_dir).cert_pem)
    return runtime


def collect(
    python: Path = PYTHON,
    busybox: Path = BUSYBOX,
    zstd: Path = ZSTD,
    signify: Path | None = SIGNIFY,
    *,
    https: bool = False,
    build_cache: Path | None = None,
) -> Runtime:
    """The runtime from the build host.  ``https``: with Python's ssl and OpenSSL (give the
    CA with :meth:`Runtime.trust_ca`).  ``signify`` None leaves the plan verifier out, for
    measuring what it adds only (bench/initrd_size.py): such an initrd refuses every plan.
    ``build_cache``: where the runtime's own builds are kept — ``python`` linked again
    without what the agent never uses (:func:`slim.core.build.smallpython.link`), a
    decompression-only ``zstd`` (:func:`slim.core.build.unzstd.build`) and busybox with
    only the applets SLIM runs (:func:`slim.core.build.smallbusybox.build`); where the build
    host cannot make them, Debian's binaries, with a warning.  None takes Debian's."""
    rt = Runtime(https=https)
    busybox_exe = _require(busybox, "busybox-static")
    if build_cache is not None:
        busybox_exe = _own_or_debians(
            rt, busybox_exe, lambda: smallbusybox.build(build_cache, BUSYBOX_APPLETS), build_cache, "0.4 MB"
        )
    rt.add(busybox_exe, "/bin/busybox")  # static: the agent copies it into the EE (report_up)
    for applet in APPLETS:
        rt.links[f"/bin/{applet}"] = "busybox"
    rt.links["/sbin/modprobe"] = "../bin/busybox"  # where the kernel runs it to load modules on demand
    zstd_exe = _require(zstd, "zstd")
    if build_cache is not None:
        zstd_exe = _own_or_debians(rt, zstd_exe, lambda: unzstd.build(build_cache), build_cache)
    if zstd_exe != zstd:  # the build's: where the agent looks for the zstd that checks digests
        _with_libraries(rt, zstd_exe, UNZSTD)
        rt.links["/usr/bin/zstd"] = os.path.relpath(UNZSTD, "/usr/bin")
    else:
        _with_libraries(rt, zstd_exe, "/usr/bin/zstd")
    if signify is not None:
        _with_libraries(rt, _require(signify, "signify-openbsd"))
    debian = _require(python, "python3").resolve()
    exe = debian
    if build_cache is not None:
        exe = _own_or_debians(rt, debian, lambda: smallpython.link(debian, build_cache), build_cache)
    _with_libraries(rt, exe, str(debian))  # at Debian's path: Python finds its prefix from it
    rt.links["/usr/bin/python3"] = debian.name
    rt.python = "/usr/bin/python3"
    left_out = ",".join(m for m in LEFT_OUT if not (https and m in SSL_MODULES))
    mode = "https" if https else "http"
    probe = subprocess.run(
        [str(exe), "-S", "-I", "-B", "-c", _PROBE, str(AGENT_DIR.parent), left_out, mode],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise FailedPrecondition(f"{exe} cannot import the agent: {probe.stderr.strip()[-500:]}")
    found = json.loads(probe.stdout)
    prefix, stdlib, zip_path = Path(found["prefix"]), Path(found["stdlib"]), found["zip"]
    if not zip_path or not Path(zip_path).is_relative_to(prefix):
        raise FailedPrecondition(f"{exe} has no zip of its standard library on sys.path under {prefix}")
    frozen = set(found["frozen"])
    zipped: list[tuple[Path, str]] = []  # (source, its name in the zip without .py)
    for name, file in found["modules"].items():
        path = Path(file)
        if not path.is_relative_to(prefix):
            raise FailedPrecondition(f"the agent imports {name} from outside Python's prefix ({file})")
        if path.suffix == ".so":
            _with_libraries(rt, path)
        elif name in frozen:
            continue  # the interpreter has it built in
        elif path.suffix == ".py" and path.is_relative_to(stdlib):
            zipped.append((path, path.relative_to(stdlib).with_suffix("").as_posix()))
        else:
            rt.add(path)
    # getpath() finds the standard library by this landmark (os itself is frozen)
    rt.add(stdlib / "os.py")
    agent = sorted(AGENT_DIR.glob("*.py"))
    pycs = byte_compile(
        exe,
        [(src, str(src), STDLIB_OPTIMIZE, False) for src, _ in zipped]
        + [(src, f"{AGENT_ROOT}/slim/agent/{src.name}", AGENT_OPTIMIZE, True) for src in agent],
    )
    rt.data[zip_path] = stored_zip(
        {f"{arc}.pyc": pyc for (_, arc), pyc in zip(zipped, pycs[: len(zipped)], strict=True)}
    )
    for src, pyc in zip(agent, pycs[len(zipped) :], strict=True):
        rt.add(src, f"{AGENT_ROOT}/slim/agent/{src.name}")
        rt.data[f"{AGENT_ROOT}/slim/agent/__pycache__/{src.stem}.{found['cache_tag']}.pyc"] = pyc
    return rt


INIT = """#!/bin/sh
# SLIM initrd: the basics, the hardware profile's drivers, DHCP, then the agent.
PATH=/bin:/usr/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "slim: initrd up" > /dev/console
if [ -f /etc/slim/modules ]; then
    while read -r m; do insmod "$m" 2>/dev/null; done < /etc/slim/modules
fi
ip link set lo up
for i in /sys/class/net/*; do
    n=${{i##*/}}
    [ "$n" = lo ] && continue
    ip link set "$n" up
    udhcpc -i "$n" -q -n -t 10 -s /etc/slim/udhcpc.sh && break
done
exec env SLIM_INITRD=1 PYTHONPATH={root} /usr/bin/python3 -S -B -m slim.agent
"""

UDHCPC = """#!/bin/sh
# busybox udhcpc calls this with bound/renew/deconfig; configure the interface.
case "$1" in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
    : > /etc/resolv.conf
    for s in $dns; do echo "nameserver $s" >> /etc/resolv.conf; done
    ;;
deconfig)
    ip addr flush dev "$interface"
    ;;
esac
exit 0
"""


def add_runtime(archive: CpioArchive, rt: Runtime, init: str | None = None) -> None:
    """Add the runtime's files and links, the agent's package, mount points and ``/init``
    (:data:`INIT`, or ``init``: a boot medium's; parent directories are implied)."""
    for d in ("proc", "sys", "dev", "run", "tmp", "newroot"):
        archive.add_dir(d)
    for dest, src in sorted(rt.files.items()):
        archive.add_file(dest, src)
    for dest, target in sorted(rt.links.items()):
        archive.add_symlink(dest, target)
    if not any(p.startswith(KEYS_DIR) for p in rt.data):
        raise FailedPrecondition(
            "the agent's runtime trusts no key (Runtime.trust): it would refuse every plan"
        )
    if rt.https and CA_FILE not in rt.data:
        raise FailedPrecondition(
            "the agent's runtime speaks HTTPS but holds no CA (Runtime.trust_ca): it would refuse "
            "every https relay"
        )
    for dest, data in sorted(rt.data.items()):
        archive.add_bytes(dest, data)
    archive.add_bytes(f"{AGENT_ROOT}/slim/__init__.py", b"")
    archive.add_bytes("/init", (init or INIT.format(root=AGENT_ROOT)).encode(), mode=0o755)
    archive.add_bytes("/etc/slim/udhcpc.sh", UDHCPC.encode(), mode=0o755)
