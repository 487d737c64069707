"""``python -m slim.agent.medium``: a boot medium's first stage (standard library only).

A home PC has no PXE server: it boots from a medium ``slim media build`` wrote (a USB stick
or a CD), which carries a Debian kernel and an initrd with this program, the core's public
keys, SLIM's CA, the relay URLs and, on a per-node medium, the node's token
(``/etc/slim/medium.json``, ``/etc/slim/keys``, ``/etc/slim/ca.pem``,
``/etc/slim/node.token``).  It does what PXE and the boot script do on a LAN, and checks
everything first:

1. asks the relays of the medium for the node's plan (over HTTPS with the token) and checks
   its signature with the keys the medium carries and, with ``--follow-endorsements`` (how
   the medium runs it), the keys the core's rotations endorsed since: a medium is not
   remade when the core's key is;
2. fetches the release's kernel and initrd the signed plan names, each verified by its
   digest as it streams;
3. starts them with ``kexec -s`` (the kernel's own signature check under Secure Boot), the
   plan's kernel arguments, the boot's id and the relays it reached.  The node's token goes
   along in a small cpio archive appended to the release's initrd (never on the command
   line, which every user of the EE could read); the release's agent then does the rest, as
   on a PXE boot.

A *generic* medium (``slim media build --generic``) names no node and holds no token: at its
first boot it asks the person at the PC for a one-time code (``slim node code NODE``), trades
it with a relay over HTTPS for the node's token and keeps that in its cache partition (mode
0600), where its next boots find it; from a CD, which keeps nothing, it asks at every boot.

Nothing the medium did not carry runs before it has been verified with the core's key: the
plan by its signature, the kernel and initrd by the plan's digests.  A failure stops at a
message on every console saying what is wrong (a refused token, a relay that cannot be
reached, a plan that does not verify), and reports it to the core when a relay is reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from slim.agent import cache
from slim.agent.cache import LocalObjects
from slim.agent.ee import Reporter
from slim.agent.fetch import CA_FILE, LOCAL, FetchError, Relays, now
from slim.agent.plan import (
    MEDIUM_ID_RE,
    NAME_RE,
    RELAY_URL_RE,
    UUID_RE,
    BootArgs,
    ObjectRef,
    PlanError,
    parse_cmdline,
    read_token,
)
from slim.agent.value import Value
from slim.agent.verify import KEYS_DIR, ask_plan, trusted_keys

MEDIUM_FILE = Path("/etc/slim/medium.json")  # written by slim media build
WORK_DIR = Path("/run/slim-medium")  # where the release's kernel and initrd are put (a tmpfs)
KEXEC = "/sbin/kexec"
MAX_MEDIUM_BYTES = 64 << 10
KEXEC_TIMEOUT = 120.0
IDENTITY_FILE = "node.json"  # a generic medium's node and token, in its cache partition
CODE_TRIES = 3  # a code mistyped may be typed again, this many times in all
CODE_PROMPT = (
    "this is a generic SLIM medium: type the one-time code your SLIM administrator gave you "
    "(XXXX-XXXX-XXXX-XXXX), then press Enter"
)
_TOKEN_TEXT = re.compile(r"[A-Za-z0-9._-]{1,200}")


class MediumError(RuntimeError):
    """The medium cannot boot this PC; the message says why, for the person in front of it."""


class Medium(Value):
    """What ``slim media build`` wrote into ``/etc/slim/medium.json``."""

    __slots__ = ("cache", "id", "node", "relays")

    def __init__(
        self,
        id: str,
        node: str,  # "" on a generic medium
        relays: tuple[str, ...],
        cache: str = "",  # the filesystem UUID of its cache partition (a USB stick's), "" for none
    ) -> None:
        self.id = id
        self.node = node
        self.relays = relays
        self.cache = cache

    @classmethod
    def load(cls, path: Path) -> Medium:
        try:
            data = path.read_bytes()[:MAX_MEDIUM_BYTES]
            doc = json.loads(data)
        except OSError as exc:
            raise MediumError(
                f"this medium has no {path}: {exc.strerror} (it was not made by slim media build)"
            ) from None
        except ValueError as exc:
            raise MediumError(f"{path} is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise MediumError(f"{path} is not a JSON object")
        medium_id, node, relays = doc.get("id"), doc.get("node", ""), doc.get("relays")
        if not isinstance(medium_id, str) or not MEDIUM_ID_RE.fullmatch(medium_id):
            raise MediumError(f"{path}: id {medium_id!r} is not a medium's id")
        if not isinstance(node, str) or (node and not NAME_RE.fullmatch(node)):
            raise MediumError(f"{path}: node {node!r} is not a node's name")
        if not isinstance(relays, list) or not relays:
            raise MediumError(f"{path} names no relay")
        for url in relays:
            if not isinstance(url, str) or not RELAY_URL_RE.fullmatch(url.rstrip("/")):
                raise MediumError(f"{path}: {url!r} is not a relay's http(s)://HOST:PORT URL")
        cache = doc.get("cache", "")
        if not isinstance(cache, str) or (cache and not UUID_RE.fullmatch(cache)):
            raise MediumError(f"{path}: cache {cache!r} is not a filesystem UUID")
        return cls(medium_id, node, tuple(u.rstrip("/") for u in relays), cache)


def say(message: str) -> None:
    """``message`` on every active console (the screen and a serial line) on a real boot (in
    the medium's initrd), else on stderr."""
    line = f"slim-medium: {message}\n"
    names: list[str] = []
    if os.environ.get("SLIM_INITRD") == "1":
        with contextlib.suppress(OSError):
            names = Path("/sys/class/tty/console/active").read_text().split()
    shown = False
    for name in names:
        try:
            with open(f"/dev/{name}", "w") as tty:
                tty.write(line)
            shown = True
        except OSError:
            continue
    if not shown:
        sys.stderr.write(line)
        sys.stderr.flush()


def newc(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A cpio "newc" archive of ``files`` (path → (contents, mode)), parents first, as the
    kernel unpacks an initramfs; owned by root, time 0."""
    entries: dict[str, tuple[bytes, int]] = {}
    for path, (data, mode) in files.items():
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), (b"", stat.S_IFDIR | 0o755))
        entries[path.strip("/")] = (data, stat.S_IFREG | mode)
    out = bytearray()

    def add(ino: int, name: str, data: bytes, mode: int) -> None:
        raw = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, name in enumerate(sorted(entries, key=lambda p: p.split("/")), 1):
        add(ino, name, *entries[name])
    add(0, "TRAILER!!!", b"", 0)
    return bytes(out)


def append_token(initrd: Path, token: str) -> None:
    """Append the token to ``initrd`` as a cpio archive the kernel unpacks over it: at a 4-byte
    boundary (the kernel skips an archive that starts anywhere else), after zeros it skips."""
    with open(initrd, "ab") as f:
        f.write(b"\0" * (-f.tell() % 4))
        f.write(newc({"etc/slim/node.token": (token.encode() + b"\n", 0o400)}))


def kexec_cmdline(kernel_args: str, relays: list[str], boot_id: str) -> str:
    """The release kernel's command line: the plan's arguments, with the relays this medium
    reached (best first) and the boot's id, so that the release's agent goes on with both."""
    ours = ("slim.relays=", "slim.boot=", "slim.cache=", "slim.medium=")
    words = [w for w in kernel_args.split() if not w.startswith(ours)]
    return " ".join([*words, f"slim.relays={','.join(relays)}", f"slim.boot={boot_id}"])


def fetch_object(relays: Relays, ref: ObjectRef, dest: Path) -> str:
    """The object into ``dest``, verified by its digest as it streams (nothing is kept
    of an object whose bytes are wrong); where it came from (a relay, or LOCAL)."""
    part = dest.with_name(dest.name + ".part")
    try:
        with open(part, "wb") as f:
            where = relays.stream(ref, f.write)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return where


def open_cache(
    medium: Medium, cmdline: dict[str, str], cache_dir: Path | None, report: Callable[..., object]
) -> LocalObjects | None:
    """The medium's cache: its partition on the stick (found by its UUID, grown at the first
    boot, mounted), or ``cache_dir`` (tests); None from a CD or an image kept as a file (GRUB
    says where it booted from: ``slim.grubroot``), or if the partition cannot be used (said; the
    boot goes on)."""
    if cache_dir is not None:
        return LocalObjects(cache_dir)
    if not medium.cache or cmdline.get("slim.grubroot", "").startswith(("cd", "loop")):
        return None  # a CD, or the image as a file on a PC's disk (slim media grub-entry)
    try:
        partition, grown = cache.attach(medium.cache, medium.id, grow_it=True)
    except (cache.CacheError, OSError) as exc:
        report("medium:cache", message=f"not used: {exc}"[:900])
        return None
    report("medium:cache", message=f"/dev/{partition}" + (", grown to the end of the stick" if grown else ""))
    return LocalObjects(cache.MOUNT_POINT)


def saved_identity(root: Path | None) -> tuple[str, str] | None:
    """The node and token a generic medium kept at an earlier boot (in its cache), if any."""
    if root is None:
        return None
    try:
        doc = json.loads((root / IDENTITY_FILE).read_bytes()[:4096])
    except (OSError, ValueError):
        return None
    node, token = (doc.get("node"), doc.get("token")) if isinstance(doc, dict) else (None, None)
    if (
        isinstance(node, str)
        and NAME_RE.fullmatch(node)
        and isinstance(token, str)
        and _TOKEN_TEXT.fullmatch(token)
    ):
        return node, token
    return None


def save_identity(root: Path, node: str, token: str) -> None:
    """Keep the node and its token in the medium's cache, readable by root only."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{IDENTITY_FILE}.new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps({"node": node, "token": token}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, root / IDENTITY_FILE)


def redeem_code(medium: Medium, ca: Path, read_line: Callable[[], str]) -> tuple[str, str]:
    """A generic medium's first boot: ask for a one-time code (``read_line``: the console),
    trade it with the medium's https relays for (node, token).  A code the relays do not know
    may be typed again (CODE_TRIES in all); one that expired or was used stops the boot."""
    urls = [u for u in medium.relays if u.startswith("https://")]
    if not urls:
        raise MediumError(
            "a generic medium trades its one-time code over HTTPS, but it names no https:// relay"
        )
    for attempt in range(1, CODE_TRIES + 1):
        say(CODE_PROMPT)
        code = read_line().strip()
        if not code:
            raise MediumError("no one-time code was typed")
        relays = Relays(urls, ca=ca)
        try:
            _, data = relays.call("POST", "/v1/redeem", {"code": code[:64]})
        except FetchError as exc:
            text = str(exc)
            if not re.search(r": 40[13]: ", text):
                raise
            if attempt < CODE_TRIES and ("unknown one-time code" in text or "not a one-time code" in text):
                say(f"the relays do not know that code ({text.rsplit(': ', 1)[-1]}); try again")
                continue
            raise MediumError(
                f"the relays refused this one-time code: {text}. Ask your SLIM administrator for a new "
                "one-time code (slim node code NODE)"
            ) from None
        finally:
            relays.close()
        try:
            doc = json.loads(data)
            node, token = doc["node"], doc["token"]
        except (ValueError, KeyError, TypeError):
            raise MediumError("the relay's answer to the one-time code is not {node, token}") from None
        if not (isinstance(node, str) and NAME_RE.fullmatch(node)) or not (
            isinstance(token, str) and _TOKEN_TEXT.fullmatch(token)
        ):
            raise MediumError("the relay's answer to the one-time code is not {node, token}")
        say(f"the code is good: this PC is node {node}")
        return node, token
    raise MediumError("no one-time code the relays know was typed")  # not reached


def _trade_code(medium: Medium, ca: Path, local: LocalObjects | None) -> tuple[str, str]:
    """A one-time code typed on the console, for the node and its token, kept in the cache."""
    node, token = redeem_code(medium, ca, sys.stdin.readline)
    if local is not None:
        save_identity(local.root, node, token)
    return node, token


def _why(exc: Exception) -> str:
    """What a person in front of the PC should read for ``exc``."""
    text = str(exc)
    if isinstance(exc, FetchError) and re.search(r": 40[13]: ", text):
        return (
            f"the relays refused this medium's token (revoked, expired or another node's): {text}. "
            "Ask your SLIM administrator for a new medium"
        )
    return text


def _kexec(*args: str) -> None:
    argv = [KEXEC, *args]
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=KEXEC_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MediumError(f"kexec {args[0]}: {exc}") from None
    if run.returncode != 0:
        said = (run.stderr or run.stdout).strip()[-400:]
        hint = " (under Secure Boot only a kernel Debian signed starts)" if "-s" in args else ""
        raise MediumError(f"kexec {' '.join(args[:2])} failed (exit {run.returncode}): {said}{hint}")


def _nics_down() -> None:
    """Take the network down before the next kernel takes the hardware over."""
    for nic in Path("/sys/class/net").iterdir() if Path("/sys/class/net").is_dir() else []:
        if nic.name != "lo":
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    ["ip", "link", "set", nic.name, "down"], capture_output=True, timeout=10, check=False
                )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slim-medium", description=__doc__.split("\n\n")[0])
    ap.add_argument("--medium", type=Path, default=MEDIUM_FILE, help="the medium's description")
    ap.add_argument("--cmdline", type=Path, default=Path("/proc/cmdline"), help="kernel command line file")
    ap.add_argument(
        "--trust",
        type=Path,
        action="append",
        default=[],
        help=f"public key or directory (default: {KEYS_DIR})",
    )
    ap.add_argument("--ca", type=Path, default=CA_FILE, help=f"SLIM's CA certificate (default: {CA_FILE})")
    ap.add_argument("--token-file", type=Path, default=None, help="the node's token (default: the medium's)")
    ap.add_argument("--work", type=Path, default=WORK_DIR, help="where the kernel and initrd are put")
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="a local object cache, not the medium's (tests)",
    )
    ap.add_argument(
        "--follow-endorsements",
        action="store_true",
        help="trust the keys the core's rotations endorsed since the medium was made",
    )
    ap.add_argument(
        "--no-kexec", action="store_true", help="stop before kexec and print what would run (tests)"
    )
    args = ap.parse_args(argv)
    started = now()
    report: Reporter | None = None
    try:
        medium = Medium.load(args.medium)
        cmdline = parse_cmdline(args.cmdline.read_text()) if args.cmdline.exists() else {}
        node = medium.node or cmdline.get("slim.node", "")
        token = read_token(args.token_file, default=True)
        notes: list[str] = []  # what the cache said, reported once a relay takes events
        kept: tuple[str, str] | None = None  # a generic medium's node and token, from its cache
        local = open_cache(medium, cmdline, args.cache_dir, lambda _stage, message="": notes.append(message))
        if not medium.node and not token:  # a generic medium: its node's token, kept or for a code
            kept = saved_identity(local.root if local is not None else None)
            if kept is not None:
                node, token = kept
            else:
                node, token = _trade_code(medium, args.ca, local)
        if not node:
            raise MediumError("this medium names no node")
        if not NAME_RE.fullmatch(node):
            raise MediumError(f"slim.node: {node[:80]!r} is not a node's name")
        urls = medium.relays
        if token:  # a node's token travels only over TLS
            urls = tuple(u for u in medium.relays if u.startswith("https://"))
            if not urls:
                raise MediumError(
                    "this medium holds a token, which goes only over HTTPS, but no https:// relay"
                )
        keys = trusted_keys(args.trust or [KEYS_DIR])
        say(f"medium {medium.id}: node {node}, asking {', '.join(urls)} for its plan")
        relays = Relays(urls, token=token, ca=args.ca)
        try:
            boot = BootArgs(node, "", "", urls)
            try:
                got = ask_plan(relays, boot, keys, follow=args.follow_endorsements)
            except FetchError as exc:
                if kept is None or local is None or not re.search(r": 40[13]: ", str(exc)):
                    raise
                # a generic medium's kept token, refused (revoked, expired): a new code instead
                say(f"the token this medium kept was refused ({exc}); it needs a new one-time code")
                (local.root / IDENTITY_FILE).unlink(missing_ok=True)
                node, token = _trade_code(medium, args.ca, local)
                relays.token = token
                boot = BootArgs(node, "", "", urls)
                got = ask_plan(relays, boot, keys, follow=args.follow_endorsements)
            plan = got.plan
            if plan.kernel is None or plan.initrd is None:
                raise MediumError(f"the plan for {plan.environment} names no kernel and initrd to start")
            report = Reporter(relays, plan.node, plan.environment)
            if plan.relay_time is not None:
                report.offset = plan.relay_time - (got.asked + got.answered) / 2
            report(
                "medium",
                got.size,
                message=f"medium {medium.id}: {plan.environment} {plan.release_digest}; "
                f"signed: {Path(got.checked.key).name}",
                duration=got.answered - started,
            )
            for note in notes:
                report("medium:cache", message=note)
            ranked = plan.https_relays if token else plan.relays
            # the plan's ranking, then the relay that answered, then the medium's others
            reached = list(dict.fromkeys([*ranked, relays.urls[relays.current], *relays.urls]))
            args.work.mkdir(parents=True, exist_ok=True)
            kernel, initrd = args.work / "kernel", args.work / "initrd"
            relays.local = local
            for what, ref, dest in (("kernel", plan.kernel, kernel), ("initrd", plan.initrd, initrd)):
                t0 = now()
                fetched = relays.stats.bytes
                where = fetch_object(relays, ref, dest)
                said = "from the medium's cache" if where == LOCAL else f"from {where}"
                report(f"medium:{what}", relays.stats.bytes - fetched, message=f"{ref.digest} {said}",
                       duration=now() - t0)  # fmt: skip
            if local is not None and args.cache_dir is None:
                cache.unmount()
            if token:  # the release's agent finds it where a medium's initrd keeps it
                append_token(initrd, token)
            line = kexec_cmdline(plan.kernel_args, reached, report.boot_id)
            if local is not None and medium.cache:  # the release's agent keeps its copy set there too
                line += f" slim.cache={medium.cache} slim.medium={medium.id}"
            if args.no_kexec:
                print(json.dumps({"kernel": str(kernel), "initrd": str(initrd), "cmdline": line}))
                report("kexec", message="not started (--no-kexec)")
                return 0
            t0 = time.monotonic()
            _kexec(
                "-s", "-l", str(kernel), f"--initrd={initrd}", f"--command-line={line}"
            )  # the network is up
            report(
                "kexec",
                message=f"{plan.environment}: its kernel and initrd, verified",
                duration=time.monotonic() - t0,
            )
            report.close(tries=5)
            relays.close()
            _nics_down()
            _kexec("-e")
            raise MediumError("kexec -e returned")
        finally:
            relays.close()
    except (MediumError, PlanError, FetchError, OSError) as exc:
        message = _why(exc)
        if report is not None and not isinstance(exc, PlanError):
            report("medium", ok=False, message=message[:900])
        say(f"cannot boot: {message}")
        return 1
    finally:
        if report is not None:  # the events on their way: the relays take them before it ends
            report.close()


if __name__ == "__main__":
    sys.exit(main())
