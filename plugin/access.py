"""Talking to Slurm: one interface, two backends.

* :class:`SlurmCli` — Slurm's own commands (``sinfo --json``, ``squeue
  --json``, ``scontrol -o``), each bounded by a timeout (client commands block
  ~10 s when slurmctld is down).  Works with any Slurm that has ``--json``
  (21.08+).  This is the backend tested here.
* :class:`PySlurm` — pyslurm, where a build matching the installed Slurm's
  major version exists (``pip install slim[pyslurm]``).  PyPI has pyslurm only
  for Slurm 25.11, and Debian bookworm ships 22.05, so this backend is not
  tested on this machine (docs/slurm.md); it is chosen only when pyslurm
  imports.

:func:`backend` picks pyslurm when it imports and the CLI otherwise.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from typing import Any, Protocol

from slim.errors import Unavailable

TIMEOUT = 30.0


@dataclass(frozen=True)
class NodeState:
    name: str
    state: str  # e.g. "idle", "allocated", "down", "down+drain" (lower case, "+"-joined flags)
    active_features: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str  # e.g. "PENDING", "RUNNING", "COMPLETED"
    nodes: str
    features: str
    restarts: int


class Slurm(Protocol):
    def nodes(self) -> dict[str, NodeState]: ...

    def job(self, job_id: str) -> JobState | None: ...

    def hostnames(self, nodelist: str) -> list[str]: ...

    def set_down(self, node: str, reason: str) -> None: ...


class SlurmCli:
    """The Slurm client commands; ``env`` carries SLURM_CONF and PATH when they are not ours."""

    def __init__(self, env: dict[str, str] | None = None, timeout: float = TIMEOUT) -> None:
        self.env, self.timeout = env, timeout

    def _run(self, *argv: str) -> str:
        try:
            proc = subprocess.run(
                argv, env=self.env, capture_output=True, text=True, timeout=self.timeout, check=False
            )
        except FileNotFoundError:
            raise Unavailable(f"{argv[0]} not found: install the Slurm client commands") from None
        except subprocess.TimeoutExpired:
            raise Unavailable(
                f"{' '.join(argv[:3])}: no answer within {self.timeout:g}s (slurmctld down?)"
            ) from None
        if proc.returncode != 0:
            raise Unavailable(f"{' '.join(argv[:3])}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
        return proc.stdout

    def nodes(self) -> dict[str, NodeState]:
        doc = json.loads(self._run("sinfo", "--json"))
        out: dict[str, NodeState] = {}
        for n in doc.get("nodes", []):
            state = n.get("state", "")
            flags = [f.lower() for f in n.get("state_flags", [])]
            out[n["name"]] = NodeState(
                n["name"],
                "+".join([str(state).lower(), *flags]),
                tuple(f for f in str(n.get("active_features", "")).split(",") if f),
                str(n.get("reason", "")),
            )
        return out

    def job(self, job_id: str) -> JobState | None:
        # squeue --json ignores -j in 22.05: filter here
        doc = json.loads(self._run("squeue", "--json"))
        for j in doc.get("jobs", []):
            if str(j.get("job_id")) == str(job_id):
                return JobState(
                    str(j["job_id"]),
                    str(j.get("job_state", "")),
                    str(j.get("nodes", "")),
                    str(j.get("features", "")),
                    int(j.get("restart_cnt", 0) or 0),
                )
        return None

    def hostnames(self, nodelist: str) -> list[str]:
        return self._run("scontrol", "show", "hostnames", nodelist).split()

    def set_down(self, node: str, reason: str) -> None:
        self._run("scontrol", "update", f"NodeName={node}", "State=DOWN", f"Reason={_one_line(reason)}")


class PySlurm:  # pragma: no cover - needs a pyslurm built for this Slurm; none exists for 22.05
    """pyslurm's API (25.11)."""

    def __init__(self, module: Any) -> None:
        self.pyslurm = module

    def nodes(self) -> dict[str, NodeState]:
        out: dict[str, NodeState] = {}
        for name, n in self.pyslurm.Nodes.load().items():
            out[name] = NodeState(name, str(n.state).lower(), tuple(n.active_features or ()), n.reason or "")
        return out

    def job(self, job_id: str) -> JobState | None:
        try:
            j = self.pyslurm.Job.load(int(job_id))
        except Exception:  # noqa: BLE001 - pyslurm raises its own RPCError for an unknown job
            return None
        return JobState(
            str(j.id), str(j.state), j.nodes or "", ",".join(j.features or ()), j.requeue_count or 0
        )

    def hostnames(self, nodelist: str) -> list[str]:
        return list(self.pyslurm.utils.expand_range_str(nodelist))

    def set_down(self, node: str, reason: str) -> None:
        self.pyslurm.Node(node).modify(self.pyslurm.Node(state="DOWN", reason=_one_line(reason)))


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()[:200]


def backend(env: dict[str, str] | None = None) -> Slurm:
    """pyslurm when it imports (a build for this Slurm), else the CLI."""
    try:
        import pyslurm  # type: ignore[import-not-found]
    except ImportError:
        return SlurmCli(env)
    return PySlurm(pyslurm)  # pragma: no cover
