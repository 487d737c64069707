"""A QEMU "desktop" for the harvesting labs (issue 18): its own disk (labs/desktopdisk.py), a
NIC with a given MAC, and either the disk alone or PXE first, then the disk — the boot order
of a harvested desktop.

* :class:`BootScripts` is a tiny HTTP server on 127.0.0.1 (port 0) serving iPXE scripts by
  path and recording each request; in the guest it is ``http://10.0.2.2:PORT/`` (QEMU user
  networking maps 10.0.2.2 to the host's loopback).
* :class:`DesktopVM` runs ``qemu-system-x86_64`` (TCG, ``-nographic``, ``-no-reboot``) with
  BIOS (SeaBIOS) and QEMU's own iPXE ROM (package ipxe-qemu).  With ``pxe=True`` the boot
  order is ``nc`` and QEMU's DHCP hands iPXE ``bootfile`` (or nothing, when ``bootfile`` is
  None: the firmware then finds no boot server, as when SLIM is down).  With ``-nographic``
  SeaBIOS copies the BIOS text console to the serial port (sercon), so iPXE's output and its
  ``menu`` are on the serial console with everything else; the console is read on a thread
  and :meth:`DesktopVM.wait_for` polls it with a deadline.  :meth:`DesktopVM.sendkey` presses
  a key on the VM's keyboard through the QEMU monitor (a unix socket), e.g. to pick a menu
  item while iPXE's ``choose`` waits.

Every QEMU process is started here and stopped here, by its PID (:meth:`DesktopVM.close`; the
classes are context managers).
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from slim.errors import FailedPrecondition

QEMU = "qemu-system-x86_64"
GUEST_HOST = "10.0.2.2"  # the host's loopback, from inside QEMU user networking
ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-~])|[\x08\r]")
BANNER = "(qemu) "


def plain(text: str) -> str:
    """Console text without ANSI escape sequences, carriage returns and backspaces."""
    return ANSI.sub("", text)


class BootScripts:
    """iPXE scripts over HTTP on 127.0.0.1, port 0; ``scripts`` maps a path (no leading
    slash) to its text, and may change while the server runs."""

    def __init__(self, scripts: dict[str, str] | None = None) -> None:
        self.scripts: dict[str, str] = dict(scripts or {})
        self.requests: list[tuple[float, str]] = []  # (time.time(), path) of every request
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.lstrip("/")
                owner.requests.append((time.time(), path))
                text = owner.scripts.get(path)
                body = (text if text is not None else "not found\n").encode()
                self.send_response(200 if text is not None else 404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="boot-scripts", daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        """The script's URL as the guest sees it."""
        return f"http://{GUEST_HOST}:{self.port}/{path}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DesktopVM:
    """One QEMU desktop.  ``pxe``: NIC first (``-boot order=nc``), else the disk alone
    (``order=c``); ``bootfile``: what QEMU's DHCP tells iPXE (None: no boot file);
    ``dhcp=False``: the NIC is on a network of its own, where nothing answers (no DHCP at all);
    ``disk_interface``: ``virtio`` or ``ide`` (the disk's initramfs handles both); ``nic``: a
    QEMU NIC model with an iPXE ROM (``e1000``, ``virtio-net-pci``, ...)."""

    def __init__(
        self,
        disk: Path,
        *,
        mac: str,
        work: Path,
        pxe: bool = False,
        bootfile: str | None = None,
        dhcp: bool = True,
        nic: str = "e1000",
        disk_interface: Literal["virtio", "ide"] = "virtio",
        memory_mb: int = 512,
        qemu: str = QEMU,
        netdev: str | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """``netdev``: QEMU's -netdev instead of user networking (e.g. a tap on a lab's bridge,
        ``tap,id=n0,ifname=tap0,script=no,downscript=no``); ``prefix``: a command QEMU runs
        under (``ip netns exec NS``: the lab's namespace)."""
        found = shutil.which(qemu)
        if found is None:
            raise FailedPrecondition(f"{qemu} is not installed (apt-get install qemu-system-x86 ipxe-qemu)")
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self._sockdir = Path(tempfile.mkdtemp(prefix="dvm-"))  # a short path: unix sockets allow ~107 bytes
        self.monitor_path = self._sockdir / "monitor"
        if not dhcp and bootfile:
            raise ValueError("a boot file needs DHCP")
        if netdev is None:
            netdev = "hubport,id=n0,hubid=0"  # a hub with nothing else on it: nothing answers
            if dhcp:
                netdev = "user,id=n0" + (f",bootfile={bootfile}" if bootfile else "")
        self.argv = [
            *prefix,
            found,
            "-machine", "pc", "-accel", "tcg", "-m", str(memory_mb),
            "-nographic", "-no-reboot",
            "-monitor", f"unix:{self.monitor_path},server=on,wait=off",
            "-drive", f"file={disk},format=raw,if={disk_interface}",
            "-netdev", netdev,
            "-device", f"{nic},netdev=n0,mac={mac}",
            "-boot", "order=nc" if pxe else "order=c",
        ]  # fmt: skip
        self._lock = threading.Condition()
        self._chunks: list[tuple[float, str]] = []  # (time.time(), text) as it arrived
        self._text = ""
        self.started = time.time()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._log = open(work / "console.log", "wb")  # noqa: SIM115 - closed in close()
        self._reader = threading.Thread(target=self._read, name="desktop-console", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 4096):
            self._log.write(chunk)
            self._log.flush()
            with self._lock:
                self._chunks.append((time.time(), chunk.decode("utf-8", "replace")))
                self._text += self._chunks[-1][1]
                self._lock.notify_all()
        with self._lock:
            self._lock.notify_all()

    @property
    def console(self) -> str:
        """Everything QEMU printed so far, escape sequences removed."""
        with self._lock:
            return plain(self._text)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> float:
        """Wait until the console (escape sequences removed) matches ``pattern`` (a regular
        expression); returns how many seconds after QEMU's start the matching text arrived.
        TimeoutError if it does not within ``timeout`` seconds, or QEMU exits first."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                match = regex.search(plain(self._text))
                if match:
                    return self._arrival(match.end()) - self.started
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    tail = plain(self._text)[-1500:]
                    why = "QEMU exited" if self.proc.poll() is not None else f"{timeout:.0f} s passed"
                    raise TimeoutError(f"{regex.pattern!r} not on the console ({why}); it ends:\n{tail}")
                self._lock.wait(min(left, 1.0))

    def _arrival(self, end: int) -> float:
        """When the chunk holding plain-text offset ``end`` arrived (lock held)."""
        seen = ""
        for at, chunk in self._chunks:
            seen += chunk
            if len(plain(seen)) >= end:
                return at
        return time.time()

    def monitor(self, command: str, timeout: float = 10.0) -> str:
        """Run one QEMU monitor (HMP) command; its output."""
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            while True:
                try:
                    s.connect(str(self.monitor_path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise
                    time.sleep(0.05)  # the socket appears as QEMU starts: poll for it
            got = self._until_prompt(s, deadline)
            s.sendall(command.encode() + b"\n")
            got = self._until_prompt(s, deadline)
        return plain(got).split("\n", 1)[-1].removesuffix(BANNER).strip()

    @staticmethod
    def _until_prompt(s: socket.socket, deadline: float) -> str:
        data = b""
        while not data.endswith(BANNER.encode()):
            s.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.decode("utf-8", "replace")

    def sendkey(self, key: str) -> None:
        """Press and release ``key`` (QEMU's names: ``l``, ``down``, ``ret``, ``ctrl-b``)."""
        answer = self.monitor(f"sendkey {key}")
        if answer:
            raise ValueError(f"sendkey {key}: {answer}")

    def wait_exit(self, timeout: float) -> int:
        """QEMU's exit status (the guest powered off, or -no-reboot ended a reboot)."""
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def close(self) -> None:
        """Stop QEMU (by its PID) if it still runs, and release everything."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
