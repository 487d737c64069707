"""The agent's runtime in the initrd: busybox, zstd, a minimal Python, the agent.

Everything comes from the build host (the core's machine: same architecture
as the nodes), at the same paths, so that binaries find their libraries and
Python finds its standard library without configuration:

- busybox (Debian's ``busybox-static``) with a link per applet the boot needs;
- ``zstd`` and the shared libraries ``ldd`` lists for it;
- Debian's ``python3`` binary, its libraries, and only the standard-library
  modules the agent imports — found by importing the agent with that very
  Python and listing ``sys.modules`` — plus the extension modules among them
  with their libraries;
- Debian's ``signify-openbsd`` and its libraries, and the core's public keys under
  ``/etc/slim/keys`` (:meth:`Runtime.trust`): the agent checks each plan's signature
  with them before it fetches or mounts anything;
- with ``https`` (a registry with an ``https://`` relay URL): Python's ``ssl`` and
  ``_ssl`` with OpenSSL's libraries, and SLIM's CA certificate as ``/etc/slim/ca.pem``
  (:meth:`Runtime.trust_ca`), which relays' certificates must chain to.  Without it
  they are left out (they are most of the initrd's growth: docs/benchmarks/, initrd
  size) and the agent speaks plain HTTP only;
- the agent's package (``slim.agent``, standard library only) under
  ``/lib/slim``.

Nothing here runs the agent; :func:`add_runtime` only adds files to an
:class:`~slim.core.build.initrd.InitrdBuilder`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import slim.agent
from slim.core.build.initrd import CpioArchive
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
AGENT_ROOT = "/lib/slim"  # PYTHONPATH in the initrd: /lib/slim/slim/agent/...

_LDD_RE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")

# Imports every module the agent needs and prints where the standard-library ones live.
# Optional to everything the agent uses (imported under try/except) and large (OpenSSL):
# left out, and blocked in the probe so that nothing that needs them is missed.  ssl is
# the exception when the initrd must speak HTTPS (collect(https=True)): then it is in.
SSL_MODULES = ("_ssl", "ssl")
LEFT_OUT = (*SSL_MODULES, "_hashlib", "_bz2", "bz2", "_lzma", "lzma")
_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
for name in sys.argv[2].split(","):
    sys.modules[name] = None  # import fails as if absent
import slim.agent.__main__, slim.agent.ee, slim.agent.fetch, slim.agent.plan, slim.agent.medium  # noqa
import encodings.utf_8, encodings.latin_1, encodings.ascii, encodings.aliases  # noqa
import runpy, importlib.util, importlib.machinery  # noqa: python -m needs these
import encodings.idna  # noqa: http.client encodes host names with it, lazily
if sys.argv[3] == "https":
    import ssl  # noqa: the agent imports it at its first https relay
    slim.agent.fetch.relay_connection()
out = {}
for name, mod in sorted(sys.modules.items()):
    f = getattr(mod, "__file__", None)
    if f and not name.startswith("slim") and mod is not None:
        out[name] = f
print(json.dumps({"prefix": sys.prefix, "modules": out}))
"""


@dataclass
class Runtime:
    files: dict[str, Path] = field(default_factory=dict)  # path in the initrd -> source
    links: dict[str, str] = field(default_factory=dict)  # path in the initrd -> target
    data: dict[str, bytes] = field(default_factory=dict)  # path in the initrd -> contents
    python: str = ""
    https: bool = False  # Python's ssl and OpenSSL are in: the CA must be too (trust_ca)

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


def shared_libraries(binary: Path, env: dict[str, str] | None = None) -> list[Path]:
    """The libraries (and the loader) ``ldd`` lists for ``binary`` (``env``: more environment
    for ldd, e.g. LD_LIBRARY_PATH)."""
    try:
        out = subprocess.run(
            ["ldd", str(binary)],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **(env or {})},
        ).stdout
    except FileNotFoundError:
        raise FailedPrecondition("ldd is missing on the build host (Debian's libc-bin)") from None
    if "not a dynamic executable" in out or "statically linked" in out:
        return []
    return [Path(m.group(1)) for m in _LDD_RE.finditer(out)]


def _with_libraries(rt: Runtime, binary: Path) -> None:
    rt.add(binary)
    for lib in shared_libraries(binary):
        rt.add(lib.resolve(), str(lib))  # the loader and libraries are often symlinks


def registry_runtime(registry: Registry, ca_dir: Path) -> Runtime:
    """The agent's runtime for ``registry``'s initrds (keys still to be trusted): with
    Python's ssl and SLIM's CA (from ``ca_dir``, made if missing) when a relay of the
    registry has an ``https://`` URL, without them otherwise."""
    https = any(u.startswith("https:") for r in registry.relays.values() for u in r.urls)
    runtime = collect(https=https)
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
) -> Runtime:
    """The runtime from the build host.  ``https``: with Python's ssl and OpenSSL (give the
    CA with :meth:`Runtime.trust_ca`).  ``signify`` None leaves the plan verifier out, for
    measuring what it adds only (bench/initrd_size.py): such an initrd refuses every plan."""
    rt = Runtime(https=https)
    rt.add(_require(busybox, "busybox-static"), "/bin/busybox")
    for applet in APPLETS:
        rt.links[f"/bin/{applet}"] = "busybox"
    rt.links["/sbin/modprobe"] = "../bin/busybox"  # where the kernel runs it to load modules on demand
    _with_libraries(rt, _require(zstd, "zstd"))
    if signify is not None:
        _with_libraries(rt, _require(signify, "signify-openbsd"))
    exe = _require(python, "python3").resolve()
    _with_libraries(rt, exe)
    rt.links["/usr/bin/python3"] = exe.name
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
    prefix = Path(found["prefix"])
    for name, file in found["modules"].items():
        path = Path(file)
        if not path.is_relative_to(prefix):
            raise FailedPrecondition(f"the agent imports {name} from outside Python's prefix ({file})")
        if path.suffix == ".so":
            _with_libraries(rt, path)
        else:
            rt.add(path)
    # getpath() finds the standard library by this landmark
    rt.add(prefix / "lib" / f"python{exe.name.removeprefix('python')}" / "os.py")
    for src in sorted(AGENT_DIR.glob("*.py")):
        rt.add(src, f"{AGENT_ROOT}/slim/agent/{src.name}")
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
