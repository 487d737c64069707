"""The lab's stand-in for a NIC's wake logic (QEMU has none): a UDP listener on a desktop's
segment that calls ``on_wake(mac)`` only for a well-formed magic packet — exactly 6 x 0xFF
then one of its MACs 16 times (102 bytes; 108 with a SecureOn password) — and ignores
anything else, saying why.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable

from slim.vocabulary import normalize_mac

log = logging.getLogger(__name__)


def magic_mac(payload: bytes) -> str | None:
    """The MAC a magic packet is for, or None if ``payload`` is not one."""
    if len(payload) not in (102, 108) or payload[:6] != b"\xff" * 6:
        return None
    mac = payload[6:12]
    if payload[6:102] != mac * 16:
        return None
    return ":".join(f"{b:02x}" for b in mac)


class MagicPacketListener:
    """Listens on ``address`` (host, port; port 0: any) for magic packets for ``macs``."""

    def __init__(self, macs: Iterable[str], on_wake: Callable[[str], None], address: tuple[str, int]) -> None:
        self.macs = {normalize_mac(m) for m in macs}
        self.on_wake = on_wake
        self.ignored: list[str] = []  # why each other datagram was not a wake-up
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        self.sock.bind(address)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="magic-packets", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> MagicPacketListener:
        self.sock.settimeout(0.2)  # so that stop() is noticed
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                payload, _ = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            mac = magic_mac(payload)
            if mac is None:
                self.ignored.append(f"not a magic packet ({len(payload)} bytes)")
            elif mac not in self.macs:
                self.ignored.append(f"a magic packet for {mac}, not one of ours")
            else:
                self.on_wake(mac)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m labs.wakelab [--port 9] MAC...``: listen on every address (a desktop's
    segment, in a lab's namespace) and print ``woken MAC`` for each magic packet for one of
    the MACs, until SIGTERM.  The lab reads the lines and starts that desktop's VM."""
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="labs.wakelab")
    parser.add_argument("--port", type=int, default=9)
    parser.add_argument("macs", nargs="+")
    args = parser.parse_args(argv)

    def woken(mac: str) -> None:
        print(f"woken {mac}", flush=True)

    listener = MagicPacketListener(args.macs, woken, ("0.0.0.0", args.port)).start()  # noqa: S104 - the segment's broadcasts
    print(f"listening on port {listener.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    listener.stop()
    for why in listener.ignored:
        print(f"ignored: {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
