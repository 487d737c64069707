"""Building the execution environment from a plan (standard library only).

Directories are done parents first ("/" before "/usr"):

- ``ram`` and ``disk``: the copy-set archive (tar + zstd) is streamed from the
  relays through ``zstd -dc`` into a staging directory beside its place, and
  moved into place only when the archive's digest checked out; a bad digest
  leaves nothing of it.  (On a real boot ``ram`` is a tmpfs and ``disk`` the
  node's partition; in no-reboot mode both are plain directories.)  The initrd's
  own zstd (:data:`UNZSTD`) checks the digest as it reads, in its own process and
  with a SHA-256 several times faster than Python's; elsewhere (the agent run from
  a checkout) the agent checks it itself.
- ``sync`` (copy-if-needed): :mod:`slim.agent.sync` compares the directory with its
  manifest (the one kept from the last boot, rebuilt from a delta, or fetched) and
  fetches only the files whose bytes differ.  With nothing there to compare with (no
  file yet: a first boot, a blank disk) the directory's archive is unpacked instead,
  one compressed stream rather than a request per file, and its manifest kept for the
  next boot.
- ``nfs``: mounted read-only over NFSv4/TCP on a real boot; in no-reboot mode
  only the mount point is made and the mount reported.

Each step is a boot event (stage, time, bytes, ok, message) sent to the relay.
At the end the active environment is written to ``run/slim/ee`` (JSON) inside
the new root, where the EE can read it (in no-reboot mode beside the target:
:func:`run_dir`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from slim.agent import sync
from slim.agent.fetch import DigestMismatch, FetchError, FetchStats, Relays, Within, now
from slim.agent.plan import Directory, ObjectRef, Plan, PlanError
from slim.agent.report_up import RUN_OPTIONS
from slim.agent.tree import Entry
from slim.agent.unpack import ReadAhead, TreeWriter, UnsafeEntry, extract_archive, read_archive
from slim.agent.value import Mutable

TYPE_CHECKING = False  # typing is not imported at run time (the agent's start-up: slim.agent)
if TYPE_CHECKING:
    from typing import IO, Any

NFS_PORT = 2049
NFS_PROBE_SECONDS = 3.0  # a server that does not take a TCP connection by then is passed over
NFS_MOUNT_SECONDS = 60.0  # nor one whose mount takes longer (a slow link's first RPCs take seconds)


class BootFailed(RuntimeError):
    """A stage failed; the message names the stage and why (also reported to the core)."""


EVENTS_LINGER = 0.1  # seconds a boot event waits for the next to go with it


class Event(Mutable):
    """One boot event, as the core receives it."""

    __slots__ = ("boot_key_sha256", "bytes", "duration", "message", "ok", "stage", "time")

    def __init__(
        self,
        stage: str,
        time: float,
        bytes: int = 0,
        ok: bool = True,
        message: str = "",
        duration: float = 0.0,  # seconds the stage took, ending at ``time``
        boot_key_sha256: str = "",  # switch_root: registers the boot key the environment proves its boot with
    ) -> None:
        self.stage = stage
        self.time = time
        self.bytes = bytes
        self.ok = ok
        self.message = message
        self.duration = duration
        self.boot_key_sha256 = boot_key_sha256


class Reporter:
    """Boot events, sent to the relays as they happen, by a thread of their own (on a
    connection of its own): the boot goes on while an event is on its way, which over a
    slow link is a round trip saved per event.  Events that follow within
    :data:`EVENTS_LINGER` go together (their times are when they happened).  Events are sent
    in order, each batch with those a failed send kept; :meth:`drain` waits until the relays
    took them, :meth:`close` before the agent ends."""

    def __init__(
        self,
        relays: Relays,
        node: str,
        environment: str,
        boot_id: str = "",  # "": a new random one
        events: list[Event] | None = None,
        # called with each stage and the boot id before the event is sent (the storm lab
        # measures the CPU each stage took)
        observe: Callable[[str, str], None] | None = None,
        # seconds to add to this node's clock to read the relay's (see Plan.relay_time)
        offset: float = 0.0,
    ) -> None:
        self.relays = relays
        self.node = node
        self.environment = environment
        self.boot_id = boot_id or secrets.token_hex(8)
        self.events: list[Event] = [] if events is None else events
        self.observe = observe
        self.offset = offset
        self._unsent: list[Event] = []
        self._cond = threading.Condition()
        self._asked = False  # the sender has events to try (new ones, or drain asked again)
        self._busy = False  # ... and is trying them
        self._closed = False
        self._hurry = False  # drain or close waits: no lingering
        self._failure: BaseException | None = None  # what stopped the sender (a bug)
        self._said = False  # ... said on stderr
        self._sender: threading.Thread | None = None

    def now(self) -> float:
        """The time on the relay's clock."""
        return now() + self.offset

    def __call__(
        self,
        stage: str,
        nbytes: int = 0,
        ok: bool = True,
        message: str = "",
        duration: float = 0.0,
        boot_key_sha256: str = "",
    ) -> None:
        if self.observe is not None:
            self.observe(stage, self.boot_id)
        event = Event(stage, self.now(), nbytes, ok, message, max(0.0, duration), boot_key_sha256)
        with self._cond:
            self.events.append(event)
            self._unsent.append(event)
        self._ask()

    def _ask(self) -> None:
        """Have the sender try what is unsent (started at the first event)."""
        with self._cond:
            if not self.node or self._closed or self._failure is not None:
                return
            if self._sender is None:
                sender = threading.Thread(target=self._send, name="slim-events", daemon=True)
                sender.start()
                self._sender = sender
            self._asked = True
            self._cond.notify_all()

    def _send(self) -> None:
        relays: Relays | None = None
        try:
            relays = self.relays.clone()
            with self._cond:
                while True:
                    while not self._asked and not self._closed:
                        self._cond.wait()
                    if not self._asked:
                        return
                    # what follows soon goes with it (not when drain or close wait for it)
                    until = time.monotonic() + EVENTS_LINGER
                    while not self._hurry and not self._closed and (left := until - time.monotonic()) > 0:
                        self._cond.wait(left)
                    self._asked, self._busy = False, True
                    batch = list(self._unsent)
                    self._cond.release()
                    try:
                        sent = self._post(relays, batch)
                    finally:
                        self._cond.acquire()
                        self._busy = False
                    if sent:
                        del self._unsent[: len(batch)]
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - a bug: said when the agent waits for its events
            with self._cond:
                self._failure = exc
                self._cond.notify_all()
        finally:
            if relays is not None:
                relays.close()

    def _post(self, relays: Relays, batch: list[Event]) -> bool:
        if not batch:
            return True
        body = {
            "events": [
                {
                    "boot_id": self.boot_id,
                    "stage": e.stage,
                    "time": e.time,
                    "bytes": e.bytes,
                    "ok": e.ok,
                    "message": e.message[:1000],
                    "environment": self.environment,
                    "duration": round(e.duration, 6),
                }
                | ({"boot_key_sha256": e.boot_key_sha256} if e.boot_key_sha256 else {})
                for e in batch
            ]
        }
        try:
            relays.call("POST", f"/v1/nodes/{self.node}/events", body)
        except FetchError:
            return False  # kept; sent with the next event
        return True

    def _idle(self) -> None:
        """Wait until the sender has tried everything it was asked to (or has stopped)."""
        with self._cond:
            self._hurry = True
            self._cond.notify_all()
            while (self._asked or self._busy) and self._sender is not None and self._sender.is_alive():
                self._cond.wait(1.0)
            self._hurry = False

    def drain(self, tries: int = 5, pause: float = 2.0) -> bool:
        """Wait for the events on their way; then send what is still unsent, ``tries`` more
        times (before switch_root no event follows to carry it: a lost switch_root would
        leave the core waiting for nothing).  True when the relays took every event.  The
        boot never fails for its events: a sender that stopped on an error (a bug) is said
        on stderr, and the events are not sent."""
        self._idle()
        for _ in range(tries):
            if not self._unsent or not self.node or self._failure is not None:
                break
            time.sleep(pause)
            self._ask()
            self._idle()
        if self._failure is not None and not self._said:
            self._said = True
            print(f"slim-agent: boot events could not be sent: {self._failure!r}", file=sys.stderr)
        return not self._unsent

    def close(self, tries: int = 0, pause: float = 2.0) -> bool:
        """:meth:`drain`, then stop the sender (what is not sent by then never is; events
        after it are kept in :attr:`events`, not sent)."""
        try:
            return self.drain(tries, pause)
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            if self._sender is not None:
                self._sender.join()


class Result(Mutable):
    """What building one directory did."""

    __slots__ = ("bytes", "deleted", "files", "manifest", "notes")

    def __init__(
        self,
        bytes: int = 0,
        files: int = 0,  # files written (sync: fetched)
        deleted: int = 0,
        manifest: str = "",  # sync: how its manifest came ("kept", "delta", "whole")
        notes: list[str] | None = None,
    ) -> None:
        self.bytes = bytes
        self.files = files
        self.deleted = deleted
        self.manifest = manifest
        self.notes: list[str] = [] if notes is None else notes


class Builder:
    def __init__(
        self,
        plan: Plan,
        relays: Relays,
        target: str | Path,
        report: Reporter,
        no_reboot: bool,
        records: sync.Records | None = None,
    ) -> None:
        self.plan = plan
        self.relays = relays
        self.target = Path(target)
        self.report = report
        self.no_reboot = no_reboot
        # the manifests copy-if-needed last applied: on the node's partition (none: keep none)
        self.records = records or sync.Records(None if no_reboot else Path(STATE_DIR))
        self.results: dict[str, Result] = {}
        self.mounted: dict[str, tuple[str, list[str]]] = {}  # nfs: path -> (server, servers passed over)
        # files copy-if-needed wrote in place, their mtimes set only once their bytes are on the
        # node's disk (sync.settle; in no-reboot mode at once: nothing is synced there)
        self.unsettled: list[tuple[str, int]] = []

    def run(self) -> None:
        self.target.mkdir(parents=True, exist_ok=True)
        for d in self.plan.directories:
            stage = f"{'mount' if d.policy == 'nfs' else d.policy}:{d.path}"
            started = time.monotonic()
            try:
                result = self.directory(d)
            except (
                FetchError,
                UnsafeEntry,
                PlanError,
                OSError,
                ValueError,
                subprocess.SubprocessError,
            ) as exc:
                message = f"{stage}: {exc}"
                self.report(stage, ok=False, message=message, duration=time.monotonic() - started)
                raise BootFailed(message) from exc
            self.results[d.path] = result
            if d.nfs is not None:
                server, passed = self.mounted.get(d.path, (d.nfs.server, []))
                what = f"{server}:{d.nfs.export} read-only over NFSv4" + (
                    "" if self.no_reboot else f" ({d.nfs.options})" if d.nfs.options else ""
                )
                message = f"mounted {what}" if not self.no_reboot else f"mount point for {what} (not mounted)"
                if passed:
                    message += f"; passed over {'; '.join(passed)}"
            elif d.policy == "sync" and result.manifest:
                message = (
                    f"{result.files} files fetched, {result.deleted} deleted; manifest {result.manifest}"
                )
            elif d.policy == "sync":
                message = f"{result.files} files unpacked (empty: the archive), {result.deleted} deleted"
            else:
                message = f"{result.files} files unpacked"
            if result.notes:
                message += "; " + "; ".join(result.notes)
            self.report(stage, result.bytes, message=message, duration=time.monotonic() - started)
        try:
            self._write_active()
        except OSError as exc:
            message = f"run: the environment's /run: {exc}"
            self.report("run", ok=False, message=message)
            raise BootFailed(message) from exc
        if not self.no_reboot:
            os.sync()  # what went to the node's disk is there before the EE starts
            if self.unsettled:  # files written in place get their times now that their bytes are there
                sync.settle(self.unsettled)
                os.sync()

    def _nested(self, d: Directory) -> list[str]:
        """Paths (relative to ``d``) of the directories other entries of the plan manage."""
        out = []
        for other in self.plan.directories:
            if other.path != d.path and (d.path == "/" or other.path.startswith(d.path + "/")):
                out.append(other.path[len(d.path) :].lstrip("/"))
        return out

    def place(self, d: Directory) -> Path:
        return self.target / d.rel if d.rel else self.target

    def directory(self, d: Directory) -> Result:
        dest = self.place(d)
        if not self.no_reboot:
            self._mount(d, dest)
        if d.policy in ("ram", "disk"):
            assert d.archive is not None
            return self._unpack(d, d.archive, dest)
        if d.policy == "sync":
            if d.archive is not None and self._empty(d, dest):
                # nothing to compare with (a first boot, a blank disk): one compressed
                # stream instead of a request per file, then compared with the manifest
                # (what was there besides is put right) and kept, with its walk
                self.records.forget(d.path)
                started = time.monotonic()
                unpacked = self._unpack(d, d.archive, dest)
                unpack_s = time.monotonic() - started
                written = time.time_ns()
                kept = sync.run(
                    d, dest, self._nested(d), self.relays, self.records, written, not self.no_reboot
                )
                self.unsettled.extend(kept.unsettled)
                kept.seconds = {"unpack": unpack_s, **kept.seconds}  # (its breakdown's first phase)
                return Result(
                    unpacked.bytes + kept.bytes, unpacked.files + kept.files, kept.deleted, "",
                    [*unpacked.notes, *kept.notes, kept.breakdown()],
                )  # fmt: skip
            return self._sync(d, dest)
        dest.mkdir(parents=True, exist_ok=True)  # nfs: the mount point (mounted above on a real boot)
        return Result()

    def _mount(self, d: Directory, dest: Path) -> None:
        """On a real boot: a tmpfs for ram, the node's partition for disk and sync, NFSv4 for nfs."""
        dest.mkdir(parents=True, exist_ok=True)
        if d.policy == "ram":
            options = f"size={d.tmpfs_size}" if d.tmpfs_size else "size=90%"
            _run("mount", "-t", "tmpfs", "-o", f"mode=0755,{options}", "tmpfs", str(dest))
        elif d.policy in ("disk", "sync"):
            if not self.plan.disk:
                raise PlanError(f"{d.path}: the plan names no disk partition for the {d.policy} policy")
            # The partition is mounted once, beside the new root; each directory is a bind
            # mount of its own subdirectory there (so /var and /srv can share a partition).
            disk_root = Path(DISK_ROOT)
            if not os.path.ismount(disk_root):
                disk_root.mkdir(parents=True, exist_ok=True)
                if _is_blank(self.plan.disk):
                    self.report("mkfs", message=f"{self.plan.disk} is blank: making an ext2 file system")
                    _run("mke2fs", "-L", "slim", self.plan.disk)
                _run("mount", self.plan.disk, str(disk_root))
            source = disk_root / (d.rel or "root")
            source.mkdir(parents=True, exist_ok=True)
            _run("mount", "--bind", str(source), str(dest))
        else:
            self._mount_nfs(d, dest)

    def _mount_nfs(self, d: Directory, dest: Path) -> None:
        """Mount the first of the plan's NFS servers that answers: each is probed (a TCP
        connection to its NFS port within NFS_PROBE_SECONDS), then mounted within
        NFS_MOUNT_SECONDS; one that does neither is passed over for the next (docs/home.md)."""
        assert d.nfs is not None
        port = nfs_port(d.nfs.options)
        passed: list[str] = []
        for server in d.nfs.servers:
            if not _answers(server, port, NFS_PROBE_SECONDS):
                passed.append(f"{server}: no answer on port {port} within {NFS_PROBE_SECONDS:g} s")
                continue
            options = d.nfs.options
            if "addr=" not in options and re.fullmatch(r"[\d.]+|[0-9a-fA-F:]+", server):
                # busybox mount hands nfs4 options to the kernel as they are: the address must be there
                options = f"{options},addr={server}" if options else f"addr={server}"
            try:
                _run(
                    "mount",
                    "-t",
                    "nfs4",
                    "-o",
                    options,
                    f"[{server}]:{d.nfs.export}"
                    if ":" in server
                    else f"{server}:{d.nfs.export}",  # IPv6: [addr]
                    str(dest),
                    timeout=NFS_MOUNT_SECONDS,
                )
            except OSError as exc:
                passed.append(f"{server}: {exc}")
                continue
            self.mounted[d.path] = (server, passed)
            return
        raise OSError(f"no NFS server mounted {d.nfs.export}: {'; '.join(passed)}")

    # -- full copies --------------------------------------------------------
    def _unpack(self, d: Directory, archive: ObjectRef, dest: Path) -> Result:
        dest.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".slim-staging-", dir=dest))
        try:
            fetched = extract(self.relays, archive, staging, d.parts)
            _move_into(staging, dest, "", set(self._nested(d)), skip=staging.name)
            unpackers = _unpackers(self.relays, d.parts)
            notes = [f"its {len(d.parts)} parts unpacked by {unpackers} processes"] if unpackers > 1 else []
            return Result(bytes=fetched, files=d.files, notes=notes)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -- copy-if-needed -----------------------------------------------------
    def _empty(self, d: Directory, dest: Path) -> bool:
        """Nothing of ``d`` at ``dest`` yet: no file, link or device outside the directories
        other entries manage (empty directories do not count: unpacking merges them)."""
        return not sync.has_files(dest, self._nested(d))

    def _sync(self, d: Directory, dest: Path) -> Result:
        result = sync.run(d, dest, self._nested(d), self.relays, self.records, later=not self.no_reboot)
        self.unsettled.extend(result.unsettled)
        return Result(
            result.bytes, result.files, result.deleted, result.manifest, [*result.notes, result.breakdown()]
        )

    def _write_active(self) -> None:
        if not self.no_reboot:
            # the EE's /run: RAM that its init keeps (systemd does not mount over a mounted
            # /run), so nothing here touches the image or a disk
            ram = self.target / "run"
            ram.mkdir(parents=True, exist_ok=True)
            _run("mount", "-t", "tmpfs", "-o", RUN_OPTIONS, "tmpfs", str(ram))
        run = run_dir(self.target, self.no_reboot)
        run.mkdir(parents=True, exist_ok=True)
        doc = {
            "node": self.plan.node,
            "environment": self.plan.environment,
            "release": self.plan.release_digest,
            "boot_id": self.report.boot_id,
            "time": self.report.now(),
        }
        (run / "ee").write_text(json.dumps(doc, indent=1) + "\n")


def run_dir(target: Path, no_reboot: bool) -> Path:
    """Where the agent leaves what the environment reads at run time (``/run/slim``): on a
    node, in the tmpfs mounted over the new root's ``/run``; in no-reboot mode beside the
    target (``TARGET.slim-run/slim``), as RAM would be, never in a tree the agent keeps."""
    return target.with_name(target.name + ".slim-run") / "slim" if no_reboot else target / "run" / "slim"


def _move_into(staging: Path, dest: Path, rel: str, nested: set[str], skip: str = "") -> None:
    """Replace what is in ``dest`` with what is in ``staging``, except the
    directories other entries of the plan manage (and the way down to them),
    which keep their contents."""
    for name in os.listdir(staging):
        if name == skip:
            continue
        path = f"{rel}/{name}" if rel else name
        new, old = staging / name, dest / name
        old_is_dir = old.is_dir() and not old.is_symlink()
        if path in nested and old_is_dir:
            continue  # another directory's contents: left alone
        if old_is_dir and new.is_dir() and any(n.startswith(path + "/") for n in nested):
            _move_into(new, old, path, nested)
            continue
        if old_is_dir:
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
        os.rename(new, old)


DISK_ROOT = "/slim-disk"  # where the node's partition is mounted in the initrd
STATE_DIR = DISK_ROOT + "/.slim-state"  # ... and what the agent keeps there (sync.Records)
READ_BUFFER = 1 << 20  # the decompressed archive, read from zstd
UNZSTD = "/usr/lib/slim/unzstd"  # the initrd's zstd, which checks a digest (core/build/unzstd.c)
UNZSTD_DIGEST = 2  # its exit status when the input is not the one its --sha256 names
UNZSTD_CLOSED = 3  # ... when we closed its output first (the input was the one named)
TRAILING_LIMIT = 1 << 20  # bytes after an archive's end that are read and dropped (tar pads a record)


class _SinkError(Exception):
    """zstd took no more of the archive: not the relay's failure (the fetch does not try
    another relay for it)."""


def extract(relays: Relays, archive: ObjectRef, into: Path, parts: tuple[ObjectRef, ...] = ()) -> int:
    """Stream an archive from ``relays`` through zstd into ``into`` (a directory of the
    caller's, deleted when this raises); the fetched byte count.  The initrd's zstd
    (:data:`UNZSTD`) checks the archive's digest, and the fetch only where a local cache
    keeps the bytes too; with any other zstd, the fetch checks it.  When the unpacking
    stops first (a member refused, a full disk), the initrd's zstd still hashes the rest
    (decoding no more), so that bytes which are not the archive are reported as such.
    ``parts``: the archive's (:attr:`Directory.parts`); with more than one and more than one
    CPU, they are unpacked side by side (:func:`_extract_parts`)."""
    unpackers = _unpackers(relays, parts)
    if unpackers > 1:
        return _extract_parts(relays, archive, parts, into, unpackers)
    _stream_into(relays, archive, lambda unpacked, checksums: _unpack_whole(unpacked, into, checksums))
    return archive.size


def _unpack_whole(unpacked: ReadAhead, into: Path, checksums: bool) -> None:
    extract_archive(unpacked, into, fresh=True, checksums=checksums)


Consume = Callable[[ReadAhead, bool], object]  # unpacks a stream: (zstd's output, check checksums?)


def _stream_into(relays: Relays, archive: ObjectRef, consume: Consume, within: Within = None) -> None:
    """Stream ``archive`` (or a range of another object: ``within``, as Relays.stream takes
    it) through zstd into ``consume`` (:func:`extract`)."""
    checks = os.access(UNZSTD, os.X_OK)
    argv = [UNZSTD, "-dcq", f"--sha256={archive.hex}"] if checks else ["zstd", "-dcq"]
    # (pipes of 1 MiB, not 64 KiB: each read takes a MiB of the archive where it took 64 KiB,
    # and zstd waits less for this process; the unpacking spent over a quarter of its time
    # in reads, on the pipe's lock.  Unbuffered ends: the fetch's pieces go into the pipe
    # as they are, and the unpacking reads into a buffer of its own, ReadAhead's; a
    # buffered end would copy every byte once more on its way)
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE if checks else None,
        bufsize=0, pipesize=READ_BUFFER,
    )  # fmt: skip
    assert proc.stdin is not None and isinstance(proc.stdout, io.FileIO)  # (bufsize=0: unbuffered)
    unpacked = ReadAhead(proc.stdout, READ_BUFFER)  # (each fill of its buffer is one read)
    failure: list[BaseException] = []
    stdin: IO[bytes] = proc.stdin

    def write(chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        try:
            while view:  # (a write to a pipe is whole, unless a signal cut it short)
                view = view[stdin.write(view) :]
        except OSError as exc:
            raise _SinkError(f"zstd took no more of the archive: {exc}") from exc

    def take(fd: int, most: int) -> int:  # (from the relay's socket, into the pipe: no copy here)
        try:
            return os.splice(fd, stdin.fileno(), most)
        except BrokenPipeError as exc:  # (the socket's own errors are the relay's)
            raise _SinkError(f"zstd took no more of the archive: {exc}") from exc

    def feed() -> None:
        try:
            relays.stream(archive, write, verify=not checks, splice=take, within=within)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            failure.append(exc)
        finally:
            try:
                stdin.close()
            except OSError as exc:
                failure.append(_SinkError(str(exc)))

    feeder = threading.Thread(target=feed, name="fetch", daemon=True)
    feeder.start()
    stopped: Exception | None = None  # what stopped the unpacking (its bytes not yet known good)
    said = b""
    try:
        # (a staging directory of our own; the headers' checksums are not checked where the
        # initrd's zstd checks the archive's digest: it hashes all of it even when the
        # unpacking stops first, so a damaged archive is said to be one)
        consume(unpacked, not checks)
        if not _drained(unpacked, TRAILING_LIMIT):
            raise UnsafeEntry("(archive)", f"more than {TRAILING_LIMIT} bytes after its end")
    except Exception as exc:
        if not checks and not isinstance(exc, UnsafeEntry):
            proc.kill()  # else the feeder waits on zstd, and zstd on us: forever
            raise
        stopped = exc
        # zstd learns at its next write: Debian's dies of SIGPIPE; the initrd's reads the
        # rest and hashes it, decoding no more.  One that failed first says so (exit 1).
        proc.stdout.close()
    except BaseException:
        proc.kill()
        raise
    finally:
        feeder.join()
        proc.stdout.close()
        if proc.stderr is not None:
            said = proc.stderr.read()  # (a line at most: it is read once zstd is done)
            proc.stderr.close()
        code = proc.wait()
    if failure and not isinstance(failure[0], _SinkError):
        raise failure[0]  # the fetch's failure is the cause of whatever the unpacking saw
    why = said.decode(errors="replace").strip().removeprefix("zstd: ")
    if checks and code == UNZSTD_DIGEST:
        found = why.removeprefix("standard input: ")
        raise DigestMismatch(f"{archive.digest}: the bytes received are not it ({found})") from stopped
    if code > 0 and not (checks and code == UNZSTD_CLOSED):  # zstd failed (not stopped by us)
        detail = f": {why}" if why else ""
        raise FetchError(f"{archive.digest}: zstd could not decompress the archive (exit {code}{detail})")
    if stopped is not None:
        raise stopped
    if code != 0 or failure:
        raise FetchError(f"{archive.digest}: zstd stopped (exit {code}): {failure[0] if failure else why}")


MAX_UNPACKERS = 4  # processes that unpack an archive's parts side by side, at most


def _unpackers(relays: Relays, parts: tuple[ObjectRef, ...]) -> int:
    """How many processes unpack an archive of ``parts``: one per CPU this process may run
    on, up to :data:`MAX_UNPACKERS` and the parts' number; one where a local cache keeps
    the archive (it keeps whole objects: the archive is streamed from it whole)."""
    if len(parts) < 2 or relays.local is not None:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 1
    return max(1, min(len(parts), cpus, MAX_UNPACKERS))


def _extract_parts(
    relays: Relays, archive: ObjectRef, parts: tuple[ObjectRef, ...], into: Path, unpackers: int
) -> int:
    """:func:`extract`, with ``unpackers`` processes: this one and children it forks, each
    fetching its share of the parts (every ``unpackers``-th, by ``Range``) through a zstd of
    its own (the initrd's checks the part's digest; with another, the fetch does), and
    unpacking them into ``into`` (a shared :class:`TreeWriter`).  The children send back the
    directories whose metadata is left to set and the hard links left to make (their
    targets may be in other parts): this process sets and makes them once every part is
    unpacked.  The first failure, whichever process's, is raised (a child's as it raised
    it: a refused member, a part that is not its digest, a relay's failure) and the other
    processes are killed, with their zstd, and waited for."""
    at, placed = 0, []
    for part in parts:
        placed.append((part, at))
        at += part.size
    children: list[_Child] = []
    writer = TreeWriter(into, fresh=True, shared=True)
    try:
        for k in range(1, unpackers):
            _Child.fork(children, relays, archive, placed[k::unpackers], writer.root)
        for part, offset in placed[::unpackers]:
            _unpack_part(relays, archive, part, offset, writer)
            for child in children:
                child.read(wait=False)  # (a failure is raised at once)
        dirs, links = writer.pending()
        for child in _answered(children):  # (in the order they finish: a failure is raised at once)
            dirs += child.dirs
            links += child.links
        writer.adopt(dirs)
        writer.later = None  # (hard links are made now: every target is there)
        for link in links:
            writer.add(link)
        writer.finish()
        for child in children:
            child.count_into(relays)
    finally:
        for child in children:
            child.stop()
        writer.close()
    return archive.size


def _unpack_part(
    relays: Relays, archive: ObjectRef, part: ObjectRef, offset: int, writer: TreeWriter
) -> None:
    def consume(unpacked: ReadAhead, checksums: bool) -> None:
        for entry, data in read_archive(unpacked, checksums=checksums, part=True):
            writer.add(entry, data)

    _stream_into(relays, part, consume, within=(archive, offset))


class _Child:
    """A forked process unpacking a share of an archive's parts (:func:`_extract_parts`),
    and the pipe it answers on: one JSON document (:func:`_child_main`), what is left to do
    or its failure."""

    def __init__(self, pid: int, answers: int) -> None:
        self.pid = pid
        self.answers = answers  # read end of its pipe (-1: read to its end, or closed)
        self.status: int | None = None  # its wait status, once reaped
        self.got: list[bytes] = []
        self.dirs: list[Entry] = []
        self.links: list[Entry] = []
        self.fetched: dict[str, Any] = {}

    @classmethod
    def fork(
        cls,
        into: list[_Child],
        relays: Relays,
        archive: ObjectRef,
        share: list[tuple[ObjectRef, int]],
        root: Path,
    ) -> None:
        """Start one, listed in ``into`` as soon as it exists (to be stopped with the rest)."""
        r, w = os.pipe()
        parent = os.getpid()
        try:
            pid = os.fork()
        except BaseException:
            os.close(r)
            os.close(w)
            raise
        if pid == 0:
            try:  # (the child: never returns, whatever happens)
                os.close(r)
                _child_main(relays, archive, share, root, w, parent)
            finally:
                os._exit(1)
        into.append(cls(pid, r))
        os.close(w)
        with contextlib.suppress(OSError):  # (it may have exited already)
            os.setpgid(pid, pid)  # (and in the child: its zstd is killed with it, whoever is first)

    def read(self, wait: bool) -> bool:
        """Read what it has sent (``wait``: until its answer is whole); True once it is,
        and taken (its failure raised)."""
        while self.answers >= 0:
            if not wait and not select.select([self.answers], [], [], 0)[0]:
                return False
            chunk = os.read(self.answers, 1 << 16)
            if chunk:
                self.got.append(chunk)
                continue
            os.close(self.answers)
            self.answers = -1
            self.status = os.waitpid(self.pid, 0)[1]
            self._take()
        return True

    def _take(self) -> None:
        try:
            doc = json.loads(b"".join(self.got))
        except ValueError:
            doc = None
        self.got = []
        if not isinstance(doc, dict):
            raise FetchError(f"an unpacking process ended without an answer (wait status {self.status})")
        self.fetched = doc.get("fetched", {})
        if "error" in doc:
            raise _rebuilt(doc["error"])
        self.dirs = [_entry(e) for e in doc["dirs"]]
        self.links = [_entry(e) for e in doc["links"]]

    def count_into(self, relays: Relays) -> None:
        """Count what it fetched as ``relays``' (from its answer)."""
        f = self.fetched
        stats = FetchStats(
            f["objects"], f["bytes"], f["resumed"], f["relay_failures"], f["busy"], f["waited"]
        )
        relays.absorb(stats, f["current"])

    def stop(self) -> None:
        """Killed with its zstd, and waited for, unless done."""
        if self.answers >= 0:
            os.close(self.answers)
            self.answers = -1
        if self.status is None:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
            self.status = os.waitpid(self.pid, 0)[1]


def _answered(children: list[_Child]) -> Iterator[_Child]:
    """Each child once its answer is whole, in the order they come (a failure raised as
    soon as it does: the others are not waited for)."""
    waiting = [c for c in children if not c.read(wait=False)]
    while waiting:
        ready = select.select([c.answers for c in waiting], [], [])[0]
        for child in [c for c in waiting if c.answers in ready]:
            if child.read(wait=False):  # (what it sent so far; its answer taken at its end)
                waiting.remove(child)
    yield from children


def _child_main(
    relays: Relays, archive: ObjectRef, share: list[tuple[ObjectRef, int]], root: Path, w: int, parent: int
) -> None:
    """A forked unpacker's work (:class:`_Child`): its parts unpacked into ``root``, its
    answer written to ``w``, then ``os._exit`` (nothing of the parent's runs here).  It
    stops between parts when its parent is gone (it leads a process group of its own)."""
    code = 1
    with contextlib.suppress(OSError):  # (the parent may have set it first)
        os.setpgid(0, 0)
    own = relays.clone()  # (connections of its own: the parent's are the parent's)
    try:
        writer = TreeWriter(root, fresh=True, shared=True)
        try:
            for part, offset in share:
                if os.getppid() != parent:
                    raise FetchError("the agent that started this unpacking is gone")
                _unpack_part(own, archive, part, offset, writer)
            dirs, links = writer.pending()
        finally:
            writer.close()
        doc: dict[str, object] = {"dirs": [_record(e) for e in dirs], "links": [_record(e) for e in links]}
        code = 0
    except BaseException as exc:  # noqa: BLE001 - handed to the parent
        doc = {"error": _recorded(exc)}
    st = own.stats
    doc["fetched"] = {
        "objects": st.objects, "bytes": st.bytes, "resumed": st.resumed, "busy": st.busy,
        "waited": st.waited, "relay_failures": st.relay_failures, "current": own.current,
    }  # fmt: skip
    data = memoryview(json.dumps(doc).encode())
    while data:
        data = data[os.write(w, data) :]
    os._exit(code)


def _record(e: Entry) -> list[object]:
    """An entry as JSON (:func:`_entry` reads it back)."""
    xattrs = [[k, v.hex()] for k, v in e.xattrs]
    return [e.path, e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.target, list(e.rdev), xattrs]


def _entry(r: list[Any]) -> Entry:
    path, kind, mode, uid, gid, mtime_ns, size, target, rdev, xattrs = r
    return Entry(
        path=path, kind=kind, mode=mode, uid=uid, gid=gid, mtime_ns=mtime_ns, size=size, target=target,
        rdev=(rdev[0], rdev[1]), xattrs=tuple((k, bytes.fromhex(v)) for k, v in xattrs),
    )  # fmt: skip


def _recorded(exc: BaseException) -> dict[str, object]:
    """A failure as JSON (:func:`_rebuilt` raises it again, with the same words): a refused
    member, a system call's failure, a digest or fetch failure; anything else as a
    FetchError naming its type."""
    if isinstance(exc, UnsafeEntry):
        return {"type": "UnsafeEntry", "path": exc.path, "reason": exc.reason}
    if isinstance(exc, OSError):
        name = exc.filename if isinstance(exc.filename, str) else None
        return {
            "type": "OSError",
            "errno": exc.errno,
            "strerror": exc.strerror,
            "filename": name,
            "text": str(exc),
        }
    kind = "DigestMismatch" if isinstance(exc, DigestMismatch) else "FetchError"
    text = str(exc) if isinstance(exc, FetchError) else f"{type(exc).__name__}: {exc}"
    return {"type": kind, "text": text}


def _rebuilt(doc: dict[str, Any]) -> Exception:
    if doc.get("type") == "UnsafeEntry":
        return UnsafeEntry(doc["path"], doc["reason"])
    if doc.get("type") == "OSError":
        if doc.get("errno") is None:
            return OSError(doc["text"])
        if doc.get("filename") is None:
            return OSError(doc["errno"], doc["strerror"])
        return OSError(doc["errno"], doc["strerror"], doc["filename"])
    return (DigestMismatch if doc.get("type") == "DigestMismatch" else FetchError)(doc["text"])


def _drained(stream: ReadAhead, limit: int) -> bool:
    """Read what is left of ``stream`` and drop it; False (and stop) past ``limit`` bytes."""
    left = limit
    while chunk := stream.read(min(READ_BUFFER, left + 1)):
        left -= len(chunk)
        if left < 0:
            return False
    return True


def _is_blank(device: str) -> bool:
    """Whether the first MiB of ``device`` is all zeros: only then is it safe to make a
    file system on it (anything else might be someone's data; mounting it decides)."""
    with open(device, "rb") as f:
        head = f.read(1 << 20)
    return not head.strip(b"\0")


def _run(*argv: str, timeout: float | None = None) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise OSError(f"{' '.join(argv)}: no answer within {timeout:g} s") from None
    if proc.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")


def nfs_port(options: str) -> int:
    """The port an NFS mount's options name (``port=N``), else 2049."""
    for option in options.split(","):
        key, _, value = option.partition("=")
        if key.strip() == "port" and value.strip().isdigit() and 0 < int(value) < 65536:
            return int(value)
    return NFS_PORT


def _answers(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def switch_root(target: Path, init: str) -> None:
    """Replace this process with the EE's init (busybox switch_root empties the initramfs)."""
    os.execv("/bin/switch_root", ["switch_root", str(target), init])  # noqa: S606


def walk_events(events: list[Event]) -> Iterator[str]:
    for e in events:
        yield f"{e.time:.3f} {e.stage} {'ok' if e.ok else 'FAILED'} {e.bytes} {e.message}"
