"""One boot as a timeline: what each stage took, from power-on to ``up``.

A boot's events (``slim.v1.BootEvent``) each end at ``time`` and took ``duration`` seconds
(0: an instant).  The relays record stage 1 over TFTP (``tftp:<file>``), the boot script
and the kernel and initrd downloads; the agent reports its plan, one stage per directory
(``ram:/``, ``mount:/usr``, ``disk:/var``, ``sync:/srv``, ``mkfs``), ``done`` and
``switch_root``; the running environment reports ``up`` (or a lab, on its behalf, saying
so in the message).  :func:`build` puts one boot's events on one time axis whose zero is
power-on as the relays saw it: the start of the first request.  :func:`render` prints it
as a table, :func:`plot` draws it (matplotlib, the optional ``plot`` extra).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from slim.errors import FailedPrecondition, InvalidArgument
from slim.v1 import core_pb2 as pb
from slim.vocabulary import SWITCH_ROOT_STAGE, UP_STAGE, relay_observed

ON_BEHALF = re.compile(r"^reported by (\S+) on the environment's behalf")
INSTALL_PLOT = "pip install 'slim[plot]'"
LABELS = {"script": "boot script"}


@dataclass(frozen=True)
class Stage:
    """One event of a boot on the boot's time axis (seconds since power-on)."""

    stage: str  # as reported: tftp:ipxe.efi, script, kernel, plan, ram:/, switch_root, up, ...
    label: str  # for people: "stage 1 over TFTP: ipxe.efi", "boot script", "ram:/", ...
    start: float
    end: float
    bytes: int
    ok: bool
    source: str  # "relay r1", "agent", "environment", "labs.slurmlab for the environment"
    message: str

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Timeline:
    """One boot of one node.  ``failed_at`` and ``reason`` say where and why a failed boot
    failed (``up`` and the core's reason when the environment never reported)."""

    node: str
    boot_id: str
    environment: str
    state: str  # booting, starting, up, failed (the core's BootStatus, or from the events)
    power_on: float  # epoch seconds: the start of the first request the relays saw
    stages: tuple[Stage, ...]
    failed_at: str = ""
    reason: str = ""

    @property
    def total(self) -> float:
        """Seconds from power-on to the end of ``up``, or else of the latest stage."""
        up = [s.end for s in self.stages if s.stage == UP_STAGE and s.ok]
        if up:
            return up[0]
        return max((s.end for s in self.stages), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "boot_id": self.boot_id,
            "environment": self.environment,
            "state": self.state,
            "failed_at": self.failed_at,
            "reason": self.reason,
            "power_on": self.power_on,
            "total": self.total,
            "stages": [asdict(s) for s in self.stages],
        }


def _seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def _label(stage: str) -> str:
    if stage.startswith("tftp:"):
        return f"stage 1 over TFTP: {stage[5:]}"
    return LABELS.get(stage, stage)


def _source(e: pb.BootEvent) -> str:
    if relay_observed(e.stage):
        return f"relay {e.relay}" if e.relay else "relay"
    said = ON_BEHALF.match(e.message)
    if said:
        return f"{said.group(1)} for the environment"
    return "environment" if e.stage == UP_STAGE else "agent"


def _state(stages: Sequence[Stage]) -> tuple[str, str, str]:
    """(state, failed_at, reason) from the events alone (no timeout: the core knows it), as
    the core's boot_status: a relay's failed attempt does not fail the boot."""
    failed = next((s for s in stages if not s.ok and not relay_observed(s.stage)), None)
    if failed is not None:
        return "failed", failed.stage, failed.message
    names = {s.stage for s in stages}
    if UP_STAGE in names:
        return "up", "", ""
    return ("starting" if SWITCH_ROOT_STAGE in names else "booting"), "", ""


def build(node: str, events: Sequence[pb.BootEvent], status: pb.BootStatus | None = None) -> Timeline:
    """The timeline of one boot from its events, in any order.

    ``status`` (the node's ``BootStatus`` from the core) gives the state when it is of
    this boot: the core knows when an environment that never reported has failed.
    Otherwise the state comes from the events.
    """
    if not events:
        raise FailedPrecondition(f"no boot recorded for node {node} yet")
    boots = sorted({e.boot_id for e in events})
    if len(boots) > 1:
        raise InvalidArgument(f"events of {len(boots)} boots ({', '.join(boots)}): a timeline is of one")
    ends = [_seconds(e.time) for e in events]
    starts = [end - max(0.0, e.duration) for e, end in zip(events, ends, strict=True)]
    power_on = min(starts)
    order = sorted(range(len(events)), key=lambda i: (starts[i], ends[i]))
    stages = tuple(
        Stage(
            stage=events[i].stage,
            label=_label(events[i].stage),
            start=starts[i] - power_on,
            end=ends[i] - power_on,
            bytes=events[i].bytes,
            ok=events[i].ok,
            source=_source(events[i]),
            message=events[i].message,
        )
        for i in order
    )
    environment = next((e.environment for e in sorted(events, key=_end, reverse=True) if e.environment), "")
    if status is not None and status.boot_id == boots[0] and status.state:
        state = status.state
        failed_at, reason = (status.stage, status.message) if state == "failed" else ("", "")
        environment = status.environment or environment
    else:
        state, failed_at, reason = _state(stages)
    return Timeline(node, boots[0], environment, state, power_on, stages, failed_at, reason)


def _end(e: pb.BootEvent) -> float:
    return _seconds(e.time)


def _mb(n: int) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.2f}" if n >= 10_000 else "<0.01"


def render(t: Timeline) -> list[str]:
    """The timeline as lines of text: a heading, one row per stage (seconds since power-on,
    duration, stage, MB, source) and how long power-on to ``up`` (or to the failure, or to
    the latest stage) took."""
    head = ("start s", "took s", "stage", "MB", "source")
    rows = [
        (
            f"{s.start:.2f}",
            f"{s.duration:.2f}" if s.duration else "-",
            s.label if s.ok else f"{s.label} FAILED: {s.message}",
            _mb(s.bytes),
            s.source,
        )
        for s in t.stages
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: tuple[str, ...]) -> str:
        cells = [
            r[0].rjust(widths[0]),
            r[1].rjust(widths[1]),
            r[2].ljust(widths[2]),
            r[3].rjust(widths[3]),
            r[4],
        ]
        return "  ".join(cells).rstrip()

    env = f" of {t.environment}" if t.environment else ""
    out = [f"{t.node}: boot {t.boot_id}{env}: {t.state}", line(head), *(line(r) for r in rows)]
    out.append(_summary(t))
    return out


def _summary(t: Timeline) -> str:
    if not t.stages:
        return f"no stage recorded ({t.state})"
    if t.state == "up" and any(s.stage == UP_STAGE and s.ok for s in t.stages):
        return f"power-on (first request) to up: {t.total:.1f} s"
    latest = max(t.stages, key=lambda s: s.end)
    if t.state == "failed":
        failed = next((s for s in t.stages if not s.ok), None)
        if failed is not None:
            return (
                f"power-on (first request) to the failure at {failed.label}: {failed.end:.1f} s"
                f" (failed: {failed.message or 'no reason given'})"
            )
        return (
            f"power-on (first request) to the latest stage, {latest.label}: {latest.end:.1f} s"
            f" (failed at {t.failed_at or '?'}: {t.reason or 'no reason given'})"
        )
    return f"power-on (first request) to the latest stage, {latest.label}: {latest.end:.1f} s ({t.state})"


# -- the picture -------------------------------------------------------------------------------
COLORS = {  # by the kind of stage; like docs/benchmarks/boot_storm_timeline.png
    "relay": "tab:gray",
    "plan": "tab:purple",
    "ram": "tab:red",
    "sync": "tab:blue",
    "disk": "tab:orange",
    "mount": "tab:olive",
    "mkfs": "tab:brown",
    "done": "tab:green",
    "switch_root": "tab:cyan",
    "up": "tab:green",
}


def _color(s: Stage) -> str:
    if not s.ok:
        return "black"
    if s.source.startswith("relay"):
        return COLORS["relay"]
    return COLORS.get(s.stage.split(":", 1)[0], "tab:pink")


def _size(n: int) -> str:
    if n >= 100_000:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB" if n >= 1000 else f"{n} B"


def plot(t: Timeline, path: Path) -> None:
    """Draw the timeline as a PNG at ``path``: one row per stage, a bar from its start to
    its end (an instant: a thin marker), x in seconds since power-on.  Needs matplotlib
    (``pip install 'slim[plot]'``); written to a temporary file beside ``path`` and
    renamed into place."""
    if path.suffix.lower() != ".png":
        raise InvalidArgument(f"the plot is a PNG: name it FILE.png, not {path.name}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise FailedPrecondition(f"drawing needs matplotlib ({exc}): {INSTALL_PLOT}") from exc

    n = len(t.stages)
    fig = Figure(figsize=(10, 1.2 + 0.32 * n), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
    ax = fig.add_subplot()
    span = max(t.total, max((s.end for s in t.stages), default=0.0), 1e-3)
    for y, s in enumerate(t.stages):
        color = _color(s)
        if s.duration > 0:
            ax.barh(y, s.duration, left=s.start, height=0.6, color=color, edgecolor="black", linewidth=0.3)
        else:
            ax.plot([s.end], [y], marker="|", markersize=14, markeredgewidth=2, color=color)
        note = f"{s.duration:.2f} s" if s.duration else ""
        if s.bytes:
            note += f"{', ' if note else ''}{_size(s.bytes)}"
        if not s.ok:
            note += f"{', ' if note else ''}FAILED"
        if note:
            ax.annotate(note, (s.end, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_yticks(range(n), [f"{s.label}  ({s.source})" for s in t.stages], fontsize=8)
    ax.invert_yaxis()  # power-on at the top
    ax.set_xlim(0, span * 1.15)
    ax.set_xlabel("seconds since power-on (the first request the relays saw)")
    ax.grid(True, axis="x", alpha=0.3)
    env = f" of {t.environment}" if t.environment else ""
    ax.set_title(f"{t.node}: boot {t.boot_id[:12]}{env}, {t.state}; {_summary(t)}", fontsize=9, wrap=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise FailedPrecondition(f"cannot write the plot to {path}: {exc.strerror or exc}") from exc
