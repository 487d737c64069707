"""A WAN link between two network namespaces: rate by tbf, round trip by a user-space delayer
(the home PCs' broadband in issue 19's lab; tests/test_wanlink.py).

This kernel has no netem, and no qdisc here delays packets (tbf's ``latency`` only bounds its
queue), so the link's propagation delay is added in user space: a TUN device in each
namespace, and one process (``python -m labs.wanlink``) that reads every packet from one and
writes it to the other after a fixed one-way delay.  tbf shapes each device's egress (what that
side sends): serialisation (tbf), then propagation (the delayer), as on a real link.

Standard library only.  The delayer attaches to devices the lab made (persistent TUN devices
owned by their namespaces: deleted with them), so a dead delayer leaves a link that carries
nothing rather than one that carries packets without delay.  It stops on SIGTERM or after
``--max-seconds`` and prints its counters and CPU time as one JSON line.  Needs root.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import fcntl
import json
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labs.netlab import NetLab, _ip

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
READ_SIZE = 65536  # a TUN device without IFF_VNET_HDR hands out one packet per read
REPO = Path(__file__).resolve().parent.parent

_libc = ctypes.CDLL(None, use_errno=True)


# -- the delayer (its own process) -------------------------------------------------------------
def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:  # Python 3.11 has no os.setns
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def open_tun(netns: str, name: str) -> int:
    """A non-blocking fd on the existing TUN device ``name`` in namespace ``netns``."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            try:  # looked up in the namespace entered
                socket.if_nametoindex(name)
            except OSError:
                raise SystemExit(f"no device {name} in namespace {netns}: the lab makes it first") from None
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
            return fd
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


@dataclass
class Direction:
    name: str
    src: int
    dst: int
    delay: float
    limit: int
    queue: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    packets: int = 0
    bytes: int = 0
    dropped: int = 0
    write_errors: int = 0

    def take(self, now: float) -> None:
        """Queue every packet waiting on ``src``, due at ``now`` + the delay."""
        while True:
            try:
                packet = os.read(self.src, READ_SIZE)
            except BlockingIOError:
                return
            if len(self.queue) >= self.limit:
                self.dropped += 1  # a full queue drops, as a router's does
            else:
                self.queue.append((now + self.delay, packet))

    def send_due(self, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            _, packet = self.queue.popleft()
            try:
                os.write(self.dst, packet)
                self.packets += 1
                self.bytes += len(packet)
            except OSError:  # the far device is down: the packet is lost
                self.write_errors += 1

    def stats(self) -> dict[str, Any]:
        return {"direction": self.name, "packets": self.packets, "bytes": self.bytes,
                "dropped": self.dropped, "write_errors": self.write_errors}  # fmt: skip


def delay_packets(
    a: int, b: int, delay: float, limit: int, max_seconds: float, names: tuple[str, str]
) -> dict[str, Any]:
    """Carry packets both ways between TUN fds ``a`` and ``b``, each ``delay`` seconds late,
    until SIGTERM/SIGINT or ``max_seconds``; the counters."""
    ab = Direction(f"{names[0]}->{names[1]}", a, b, delay, limit)
    ba = Direction(f"{names[1]}->{names[0]}", b, a, delay, limit)
    by_fd = {a: ab, b: ba}
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)  # a signal wakes the poll
    poller = select.epoll()
    for fd in (a, b, wake_r):
        poller.register(fd, select.EPOLLIN)
    clock = time.monotonic
    started = clock()
    deadline = started + max_seconds
    try:
        while not stopping and (now := clock()) < deadline:
            dues = [d.queue[0][0] for d in (ab, ba) if d.queue]
            for fd, _ in poller.poll(max(0.0, min([deadline, *dues]) - now)):  # never early
                if fd == wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 512)
                else:
                    by_fd[fd].take(clock())
            now = clock()
            ab.send_due(now)
            ba.send_due(now)
    finally:
        signal.set_wakeup_fd(-1)
        poller.close()
        os.close(wake_r)
        os.close(wake_w)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    wall = clock() - started
    cpu = usage.ru_utime + usage.ru_stime
    return {"delay_ms": delay * 1000, "seconds": round(wall, 2), "cpu_seconds": round(cpu, 3),
            "directions": [ab.stats(), ba.stats()]}  # fmt: skip


def _end(text: str) -> tuple[str, str]:
    netns, _, dev = text.partition(":")
    if not netns or not dev or len(dev) > 15:
        raise argparse.ArgumentTypeError(f"{text!r}: NETNS:DEVICE")
    return netns, dev


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Carry packets between two TUN devices, each one-way delay late."
    )
    ap.add_argument("a", type=_end, help="NETNS:DEVICE of one end (an existing TUN device)")
    ap.add_argument("b", type=_end, help="NETNS:DEVICE of the other end")
    ap.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay (the round trip is twice it)")
    ap.add_argument("--limit", type=int, default=10_000, help="packets queued per direction before drops")
    ap.add_argument("--max-seconds", type=float, default=3600.0, help="stop after this long (a bound)")
    args = ap.parse_args(argv)
    fa, fb = open_tun(*args.a), open_tun(*args.b)
    print(json.dumps({"ready": True}), flush=True)
    names = (":".join(args.a), ":".join(args.b))
    try:
        result = delay_packets(fa, fb, args.delay_ms / 1000, args.limit, args.max_seconds, names)
    finally:
        os.close(fa)
        os.close(fb)
    print(json.dumps(result), flush=True)
    return 0


# -- the link, as a lab makes it ----------------------------------------------------------------
@dataclass
class WanLink:
    """A point-to-point link ``a_addr`` (in namespace ``a``) <-> ``b_addr`` (in ``b``) over
    TUN devices named ``dev``: ``rate`` each way (tbf; None: unshaped), ``delay_ms`` each way."""

    a: str
    b: str
    a_addr: str
    b_addr: str
    rate: str | None = "3mbit"
    delay_ms: float = 20.0
    dev: str = "wan0"
    max_seconds: float = 3600.0
    _proc: subprocess.Popen[str] | None = None
    counters: dict[str, Any] = field(default_factory=dict)

    def start(self) -> WanLink:
        for ns, here, there in ((self.a, self.a_addr, self.b_addr), (self.b, self.b_addr, self.a_addr)):
            _ip("-n", ns, "tuntap", "add", self.dev, "mode", "tun")
            _ip("-n", ns, "addr", "add", here, "peer", there, "dev", self.dev)
            _ip("-n", ns, "link", "set", self.dev, "up")
        self.set_rate(self.rate)
        argv = [sys.executable, "-m", "labs.wanlink", f"{self.a}:{self.dev}", f"{self.b}:{self.dev}",
                "--delay-ms", str(self.delay_ms), "--max-seconds", str(self.max_seconds)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self._proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
        assert self._proc.stdout is not None
        ready = self._proc.stdout.readline()  # the delayer opened both devices (or died: "")
        if '"ready"' not in ready:
            self.close()
            raise RuntimeError(f"the WAN delayer did not start (exit {self._proc.poll()})")
        return self

    def set_rate(self, rate: str | None) -> None:
        """Shape both directions at ``rate`` from now on (None: unshaped; the delay stays)."""
        for ns in (self.a, self.b):
            if rate is not None:
                # a burst of about 10 ms at the rate (not 64 kB: at 3 Mb/s that is 170 ms of
                # line-rate bursts); the latency only bounds tbf's queue
                NetLab.shape(ns, self.dev, rate, burst="3750b", latency="200ms")
            elif self.rate is not None:
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", self.dev, "root"],
                               capture_output=True, timeout=30, check=False)  # fmt: skip
        self.rate = rate

    def close(self) -> dict[str, Any]:
        """Stop the delayer (by PID); its counters.  The devices go with their namespaces."""
        proc, self._proc = self._proc, None
        if proc is None:
            return self.counters
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        lines = [line for line in (out or "").splitlines() if line.startswith("{")]
        with contextlib.suppress(ValueError, IndexError):
            self.counters = json.loads(lines[-1])
        return self.counters

    def __enter__(self) -> WanLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
