"""The initrd's busybox: Debian's own source, only the applets SLIM runs, linked with musl.

Debian's ``busybox-static`` has about 400 applets, linked statically with glibc: 1.98 MB,
0.58 MB of the compressed initrd (docs/benchmarks/, initrd size).  SLIM runs 21 of them
in the initrd (:data:`slim.core.build.agentrt.APPLETS`) and a few more in the environment
it boots: the agent copies the initrd's busybox into the environment's RAM, and the
scripts there that report the boot ``up`` and ask for a desktop's orders run it
(:data:`slim.agent.report_up.APPLETS`).  That copy must run on whatever C library the
environment has, so busybox stays static.

:func:`build` builds busybox again from the source of the ``busybox-static`` installed on
the build host (the same version: ``apt-get source`` with the build host's own apt
sources, as ``deb-src``, in a private directory; the machine's apt sources and lists are not
touched), with Debian's configuration of ``busybox-static`` for every applet it keeps (so
each one behaves as Debian's does) and every other applet turned off, linked statically
with musl (Debian's ``musl-tools``) instead of glibc, whose static library brings NSS,
locales and ``printf``'s every form: 0.41 MB, 0.22 MB compressed.  The result runs each
applet it must (checked) and is cached in SLIM's cache under a key of its inputs (the
source's version, the applets, the compilers, this module), the same bytes from the same
inputs (no build time in it).  The source package's files are kept in the cache too
(``busybox/src/``), so they are fetched once per version: a change of SLIM or of the
compilers builds again without the network.  ``apt-get update`` runs the build host's
update hooks (its ``apt.conf.d``, which also gives its proxy); its lists and caches are
private.

Needs on the build host: ``apt-get`` able to reach the build host's Debian mirror (once
per version), ``dpkg-source`` (``dpkg-dev``), ``make``, ``gcc`` and ``musl-gcc``
(``musl-tools``), and the kernel's headers (``linux-libc-dev``, which ``gcc`` brings).  Without them
:func:`build` raises :class:`~slim.errors.FailedPrecondition` saying what is missing,
and the initrd takes Debian's ``busybox-static`` (agentrt says so).
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from slim.core.build.smallpython import cached, keep, run, shared_libraries, tool
from slim.errors import FailedPrecondition

PACKAGE = "busybox-static"  # the binary package whose source is built again
CONFIG = "debian/config/pkg/static"  # Debian's configuration of it, in the source package
APT_SOURCES = Path("/etc/apt")  # sources.list and sources.list.d/: where the mirror is read
ALWAYS = ("busybox",)  # the applet that runs the others by name: `busybox wget`, `busybox --list`
KERNEL_HEADERS = ("linux", "asm-generic")  # /usr/include/<these>, and the architecture's asm
REPRODUCIBLE = {"KCONFIG_NOTIMESTAMP": "1", "LC_ALL": "C"}  # no build time in the banner (as Debian's)
APT_TIMEOUT = 30  # seconds apt waits on the mirror's silence
APT_DEADLINE = 600  # seconds apt-get update, and apt-get source, may take in all
_APPLET = re.compile(r"//applet:.*?IF_(\w+)\(.*?APPLET\w*\(\s*([\w.\[-]+)\s*,")  # IF_SYM(APPLET(name, ...


def source_version() -> tuple[str, str]:
    """The source package and version of the ``busybox-static`` installed on the build host."""
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${source:Package} ${source:Version} ${Status}", PACKAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    fields = proc.stdout.split()
    if proc.returncode != 0 or len(fields) < 3 or "installed" not in fields[2:]:
        raise FailedPrecondition(f"{PACKAGE} is not installed on the build host")
    return fields[0], fields[1]


def deb_src(sources: Path | None = None) -> str:
    """The build host's apt sources (``sources``, by default :data:`APT_SOURCES`; one-line
    and deb822) as ``deb-src`` entries, in deb822."""
    sources = sources or APT_SOURCES
    entries: list[str] = []
    one_line = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0]  # a comment, or what follows one
            m = re.match(r"\s*deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s*(.*)$", line)
            if m and not m.group(2).startswith("cdrom:"):  # a disc: nothing to fetch from
                options = dict(o.split("=", 1) for o in (m.group(1) or "").strip("[] \t").split() if "=" in o)
                entry = [f"Types: deb-src\nURIs: {m.group(2)}\nSuites: {m.group(3)}"]
                if m.group(4).strip():
                    entry.append(f"Components: {m.group(4).strip()}")
                if "signed-by" in options:
                    entry.append(f"Signed-By: {options['signed-by']}")
                entries.append("\n".join(entry))
    for path in sorted((sources / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            lines = [line for line in stanza.splitlines() if not line.lstrip().startswith("#")]
            is_types = [re.match(r"types:", line, re.I) is not None for line in lines]
            types = next(
                (line.split(":", 1)[1].split() for line, t in zip(lines, is_types, strict=True) if t), []
            )
            uris = " ".join(line for line in lines if re.match(r"uris:", line, re.I))
            if (
                "deb" not in types
                or "cdrom:" in uris
                or any(re.match(r"enabled:\s*no", x, re.I) for x in lines)
            ):
                continue
            entries.append(
                "\n".join("Types: deb-src" if t else line for line, t in zip(lines, is_types, strict=True))
            )
    if not entries:
        raise FailedPrecondition(f"no apt source under {sources} to fetch {PACKAGE}'s source from")
    return "\n\n".join(entries) + "\n"


def _apt_options(apt: Path) -> list[str]:
    """apt-get with the build host's configuration (its proxy, its keyrings) but private
    sources (``deb-src``), lists and caches, failing fast when the mirror does not answer."""
    return [
        f"-oDir::Etc::SourceList={os.devnull}",
        f"-oDir::Etc::SourceParts={apt / 'sources.list.d'}",
        f"-oDir::State::Lists={apt / 'lists'}",
        f"-oDir::Cache={apt / 'cache'}",
        "-oDir::Cache::pkgcache=",
        "-oDir::Cache::srcpkgcache=",
        "-oDebug::NoLocking=1",
        "-oAcquire::Retries=0",
        f"-oAcquire::http::Timeout={APT_TIMEOUT}",
        f"-oAcquire::https::Timeout={APT_TIMEOUT}",
        "-qq",
    ]


def _for_apt(*dirs: Path) -> None:
    """Directories apt's download methods write in, as the user they run as (``_apt``)."""
    try:
        user = pwd.getpwnam("_apt")
    except KeyError:
        return  # no such user: apt's methods run as root
    for d in dirs:
        os.chown(d, user.pw_uid, -1)


def fetch_source(package: str, version: str, cache: Path, into: Path) -> Path:
    """Debian's source of ``package`` at ``version``, unpacked in ``into`` (the directory
    returned).  Its files (the ``.dsc`` and the tarballs it names) are kept in ``cache``
    (under ``src/``) and fetched only when they are not there: ``dpkg-source`` checks the
    tarballs against the ``.dsc``, which apt checked against the mirror's signed index."""
    tool("dpkg-source", "dpkg-dev")
    kept = cache / "src" / f"{package}_{version.replace(':', '%3a')}"
    dsc = next((d for d in sorted(kept.glob("*.dsc")) if cached(d)), None) if kept.is_dir() else None
    if dsc is None:
        apt_get = tool("apt-get", "apt")
        kept.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=kept.parent, prefix=".fetch.") as tmp:
            os.chmod(tmp, 0o755)  # noqa: S103 - apt's download methods (as _apt) go through it
            apt, download = Path(tmp) / "apt", Path(tmp) / "files"
            for d in (
                apt / "lists" / "partial",
                apt / "cache" / "archives" / "partial",
                apt / "sources.list.d",
                download,
            ):
                d.mkdir(parents=True)
            (apt / "sources.list.d" / "build-host.sources").write_text(deb_src())
            _for_apt(apt / "lists" / "partial", download)
            options = _apt_options(apt)
            # an entry without sources (a third party's) fails its part only: apt-get source
            # says whether the one wanted was found, and update's errors are told with it
            update = subprocess.run(
                [apt_get, *options, "update"],
                capture_output=True,
                text=True,
                check=False,
                timeout=APT_DEADLINE,
            )
            proc = subprocess.run(
                [apt_get, *options, "--download-only", "source", f"{package}={version}"],
                cwd=download, capture_output=True, text=True, check=False, timeout=APT_DEADLINE,
            )  # fmt: skip
            dscs = sorted(download.glob("*.dsc"))
            if proc.returncode != 0 or len(dscs) != 1:
                said = (proc.stderr or proc.stdout).strip()[-400:]
                if update.returncode != 0:
                    said += f"; apt-get update: {(update.stderr or update.stdout).strip()[-400:]}"
                raise FailedPrecondition(
                    f"apt-get source {package}={version} failed (the build host's mirror): {said}"
                )
            os.chown(download, os.geteuid(), -1)
            for f in download.iterdir():
                os.chown(f, os.geteuid(), os.getegid())
                f.chmod(0o644)
            download.chmod(0o755)
            if kept.exists():
                shutil.rmtree(kept)  # files of ours that are not right (cached() refused them)
            os.replace(download, kept)
        dsc = next(kept.glob("*.dsc"))
    tree = into / "source"
    run(["dpkg-source", "--no-copy", "-x", str(dsc), str(tree)])
    return tree


def applet_symbols(tree: Path) -> dict[str, set[str]]:
    """Each applet's configuration symbol in busybox's source, and the applet names it gives."""
    symbols: dict[str, set[str]] = {}
    for source in sorted(tree.rglob("*.c")):
        for line in source.read_text(errors="replace").splitlines():
            if m := _APPLET.match(line):
                symbols.setdefault(m.group(1), set()).add(m.group(2))
    return symbols


def configure(debian: str, symbols: dict[str, set[str]], applets: Iterable[str]) -> str:
    """Debian's configuration ``debian`` with every applet that gives none of ``applets``
    turned off (features of the applets left then depend on nothing gone: kconfig drops the
    rest).  FailedPrecondition names an applet that is not busybox's."""
    wanted = set(applets)
    given = set().union(*symbols.values())
    if unknown := sorted(wanted - given):
        raise FailedPrecondition(f"busybox has no applet {', '.join(unknown)}")
    off = {symbol for symbol, names in symbols.items() if not names & wanted}
    lines = []
    for line in debian.splitlines():
        m = re.fullmatch(r"CONFIG_(\w+)=y", line)
        lines.append(f"# CONFIG_{m.group(1)} is not set" if m and m.group(1) in off else line)
    return "\n".join(lines) + "\n"


def kernel_headers(gcc: str, into: Path) -> Path:
    """A directory with the kernel's headers only (musl's own replace glibc's), for ``-isystem``."""
    multiarch = run([gcc, "-print-multiarch"]).strip()
    headers = {name: Path("/usr/include") / name for name in KERNEL_HEADERS}
    headers["asm"] = Path("/usr/include") / multiarch / "asm"
    into.mkdir()
    for name, path in headers.items():
        if not path.is_dir():
            raise FailedPrecondition(f"{path} is missing: install Debian's linux-libc-dev on the build host")
        (into / name).symlink_to(path)
    return into


def build(cache: Path, applets: Iterable[str]) -> Path:
    """busybox with only ``applets``, built from Debian's source (or taken from ``cache``)."""
    wanted = sorted({*applets, *ALWAYS})
    gcc, musl = tool("gcc", "gcc"), tool("musl-gcc", "musl-tools")
    make = tool("make", "make")
    tool("dpkg-query", "dpkg")
    package, version = source_version()
    compilers = [run([gcc, "--version"]), Path(musl).read_text(errors="replace")]
    musl_version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "musl-dev"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256(json.dumps([package, version, wanted, compilers, musl_version, CONFIG]).encode())
    key.update(Path(__file__).read_bytes())  # how it is configured and built
    out = cache / "busybox" / key.hexdigest()[:32] / "busybox"
    if cached(out):
        return out
    out.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent.parent, prefix=".build.") as tmp:
        work = Path(tmp)
        tree = fetch_source(package, version, cache / "busybox", work)
        debian = tree / CONFIG
        if not debian.is_file():
            raise FailedPrecondition(f"{package} {version}'s source has no {CONFIG}")
        (tree / ".config").write_text(configure(debian.read_text(), applet_symbols(tree), wanted))
        # every symbol is in Debian's configuration: oldconfig asks nothing (answers: defaults)
        proc = subprocess.run(
            [make, "oldconfig"], cwd=tree, input=b"\n" * 2000, capture_output=True, check=False,
            env={**os.environ, **REPRODUCIBLE},
        )  # fmt: skip
        if proc.returncode != 0:
            raise FailedPrecondition(
                f"busybox's make oldconfig failed: {proc.stderr.decode(errors='replace')[-800:]}"
            )
        headers = kernel_headers(gcc, work / "kernel-headers")
        jobs = str(max(1, min(os.cpu_count() or 1, 8)))
        banner = f"BB_EXTRA_VERSION=SLIM, from Debian {version}"  # what `busybox` says it is
        argv = [make, f"-j{jobs}", f"CC={musl}", f"EXTRA_CFLAGS=-isystem {headers}", banner, "busybox"]
        run(argv, cwd=tree, env=REPRODUCIBLE)
        built = tree / "busybox"
        check(built, wanted)
        return keep(built, out)


def check(busybox: Path, applets: Iterable[str]) -> None:
    """``busybox`` is static and has each of ``applets``: FailedPrecondition names what is wrong."""
    if loads := shared_libraries(busybox):
        raise FailedPrecondition(f"{busybox} is not linked statically: it loads {', '.join(map(str, loads))}")
    listed = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=False, timeout=30)
    if missing := sorted(set(applets) - set(listed.stdout.split())):
        raise FailedPrecondition(f"{busybox} has no {', '.join(missing)}: {listed.stderr.strip()[-200:]}")
    shell = subprocess.run(
        [str(busybox), "sh", "-c", 'v=a/b; echo "${v##*/}"'],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if shell.stdout != "b\n":
        raise FailedPrecondition(f"{busybox} sh does not run: {shell.stderr.strip()[-200:]}")
