"""Helpers shared by the supervisors of external daemons (nfs-ganesha, dnsmasq)."""

from __future__ import annotations

import contextlib
import random
import signal
import threading
from collections.abc import Iterator
from types import FrameType


def backoff_delay(backoff: tuple[float, float], failures: int) -> float:
    """Seconds to wait before restart number ``failures`` + 1: exponential, capped, jittered."""
    first, most = backoff
    return min(most, first * 2.0 ** min(failures, 30)) * random.uniform(0.5, 1.0)  # noqa: S311 - jitter


@contextlib.contextmanager
def stop_signals(stop: threading.Event, reload_event: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set ``stop``; SIGHUP sets ``reload_event`` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        reload_event.set()

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, on_stop),
        signal.SIGINT: signal.signal(signal.SIGINT, on_stop),
        signal.SIGHUP: signal.signal(signal.SIGHUP, on_hup),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
