"""``slim slurm config``: the Slurm side of SLIM, rendered from the registry.

Slurm 22.05's changeable features go through ``node_features/helpers``, whose
feature names may not contain ``:`` (docs/slurm.md); users write
``--constraint=ee:jdk14``.  So:

* ``helpers.conf`` lists every environment's feature with ``=`` (``ee=jdk14``),
  all mutually exclusive (a node runs one EE), with our helper;
* ``job_submit.lua`` rewrites ``ee:X`` to ``ee=X`` and rejects, at submit time,
  an environment the registry does not know, naming the known ones;
* ``slurm.conf`` gets the lines that load both, our RebootProgram and
  PrologSlurmctld, and a ResumeTimeout suited to boot times;
* small wrapper scripts (helper, reboot, prolog) run ``slim slurm …`` with this
  Python and the core's address: slurmd and slurmctld run them with no PATH or
  environment of ours (PrologSlurmctld with no PATH and no SLURM_CONF at all);
* for desktop pools with a ``partition`` (the registry's ``pools``): power saving (SLIM's wake
  as ResumeProgram, the way back to the desktop's own OS as SuspendProgram and
  ResumeFailProgram, scripts ``slim-resume`` and ``slim-suspend``) and each pool's partition
  line, with its power settings (``slim slurm harvest`` keeps the windows: docs/slurm.md).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from slim.core.pools import Pool, clock_seconds
from slim.core.registry import Registry

DEFAULT_BOOT_TIME = 300  # helpers.conf BootTime: Slurm's own default, said explicitly
DEFAULT_RESUME_TIMEOUT = 900  # seconds: a reboot into a new EE, with room for slow firmware
DEFAULT_IDLE_RETURN = 1800  # a pool's partition's SuspendTime: an idle desktop goes back after it
DEFAULT_SUSPEND_TIMEOUT = 120  # a desktop's way back to its own OS (poweroff or reboot)
# slurmd and slurmctld run our scripts without our PATH; scontrol and friends live here on Debian.
SLURM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class SlurmFiles:
    helpers_conf: str
    job_submit_lua: str
    slurm_conf_lines: str
    scripts: dict[str, str]  # file name -> content (executable)


def slurm_feature(feature: str) -> str:
    """``ee:jdk14`` as node_features/helpers spells it: ``ee=jdk14``."""
    return feature.replace(":", "=", 1)


def features(registry: Registry) -> dict[str, str]:
    """Environment name -> its Slurm feature (``ee=jdk14``), sorted by name."""
    return {name: slurm_feature(registry.feature_of(name)) for name in sorted(registry.environments)}


def render(
    registry: Registry,
    *,
    directory: Path,
    core: str,
    slurm_conf: Path,
    reboot: str = "systemctl reboot",
    prolog_log: Path = Path("/var/log/slim/prolog.log"),
    resume_timeout: int = DEFAULT_RESUME_TIMEOUT,
    python: str = sys.executable,
    source: str = "the registry",
    identity: Path | None = None,
    power_log: Path = Path("/var/log/slim/power.log"),
    idle_return: int = DEFAULT_IDLE_RETURN,
    suspend_timeout: int = DEFAULT_SUSPEND_TIMEOUT,
    boot_time: int = DEFAULT_BOOT_TIME,
) -> SlurmFiles:
    """Everything ``slim slurm config`` writes into ``directory`` (the scripts live there);
    with ``identity`` (an admin identity directory), the scripts call the core with it."""
    feats = features(registry)
    if not feats:
        raise ValueError(f"{source} has no environments: nothing for Slurm to ask for")
    helper, reboot_script, prolog = (directory / n for n in ("slim-helper", "slim-reboot", "slim-prolog"))
    head = f"# Rendered by `slim slurm config` from {source}; do not edit (docs/slurm.md)."
    helpers_conf = "\n".join(
        [
            head,
            # one feature per line: Slurm 22.05 refuses a list here
            *(f"Feature={f} Helper={helper}" for f in feats.values()),
            f"MutuallyExclusive={','.join(feats.values())}",
            "# seconds the helper may take: staging waits until the node's relays are warm",
            "ExecTime=300",
            "# seconds a reboot into another EE takes: Slurm's main scheduler adds them to every",
            "# job's end when it checks reservations (a desktop pool's blackout among them)",
            f"BootTime={boot_time}",
            "",
        ]
    )
    prefixes = sorted({f.split("=", 1)[0] for f in feats.values()})
    known = ", ".join(registry.feature_of(n) for n in feats)
    lua_known = "\n".join(f'  ["{f}"] = true,' for f in feats.values())
    lua_prefixes = ", ".join(f'"{p}"' for p in prefixes)
    job_submit = f"""{head.replace("#", "--", 1)}
-- Users ask for an execution environment with --constraint=ee:NAME; Slurm's
-- node_features/helpers spells it ee=NAME.  Rewrite, and refuse unknown ones now.
local known = {{
{lua_known}
}}
local prefixes = {{ {lua_prefixes} }}
local listed = "{known}"

local function rewrite(features)
  if features == nil or features == "" then
    return features, nil
  end
  for _, p in ipairs(prefixes) do
    features = string.gsub(features, "(%f[%w_.]" .. p .. "):([%w_.]+)", "%1=%2")
  end
  for _, p in ipairs(prefixes) do
    for feature in string.gmatch(features, "%f[%w_.]" .. p .. "=[%w_.]+") do
      if not known[feature] then
        local asked = string.gsub(feature, "=", ":", 1)
        return nil, "unknown execution environment '" .. asked .. "' (known: " .. listed .. ")"
      end
    end
  end
  return features, nil
end

local function apply(job_desc)
  local features, err = rewrite(job_desc.features)
  if err ~= nil then
    slurm.log_user("%s", err)
    return slurm.ERROR
  end
  if features ~= nil then  -- Slurm refuses nil here (a job with no --constraint)
    job_desc.features = features
  end
  return slurm.SUCCESS
end

function slurm_job_submit(job_desc, part_list, submit_uid)
  return apply(job_desc)
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
  return apply(job_desc)
end

return slurm.SUCCESS
"""
    resume, suspend = directory / "slim-resume", directory / "slim-suspend"
    lines = "\n".join(
        [
            head,
            "NodeFeaturesPlugins=node_features/helpers",
            "JobSubmitPlugins=lua",
            f"RebootProgram={reboot_script}",
            f"PrologSlurmctld={prolog}",
            f"ResumeTimeout={resume_timeout}",
            *pool_lines(registry, resume, suspend, idle_return, suspend_timeout),
            "",
        ]
    )
    slim = f"{shlex.quote(python)} -m slim.cli slurm"
    env = f"SLIM_CORE={shlex.quote(core)} SLURM_CONF={shlex.quote(str(slurm_conf))} PATH={SLURM_PATH}"
    if identity is not None:
        env += f" SLIM_IDENTITY={shlex.quote(str(identity))}"
    action = f"--command {shlex.quote(reboot)}"
    scripts = {
        helper.name: f'#!/bin/sh\n{head}\nexec env {env} {slim} helper "$@"\n',
        reboot_script.name: f"#!/bin/sh\n{head}\nexec env {env} {slim} reboot {action}\n",
        prolog.name: f"#!/bin/sh\n{head}\nexec env {env} {slim} prolog --log {shlex.quote(str(prolog_log))}\n",  # noqa: E501
    }
    if any(p.partition for p in registry.pools.values()):
        # slurmctld runs them with standard output and error closed, and keeps nothing they say
        plog = f"</dev/null >>{shlex.quote(str(power_log))} 2>&1"
        for script, verb in ((resume, "resume"), (suspend, "suspend")):
            scripts[script.name] = (
                f"#!/bin/sh\n{head}\nmkdir -p {shlex.quote(str(power_log.parent))}\n"
                f'exec env {env} {slim} power {verb} "$@" {plog}\n'
            )
    return SlurmFiles(helpers_conf, job_submit, lines, scripts)


def window_seconds(pool: Pool) -> int:
    """The longest of ``pool``'s windows, in seconds (on a day without a clock change)."""
    day = 86400
    return max((clock_seconds(w.end) - clock_seconds(w.start)) % day or day for w in pool.windows)


def pool_lines(
    registry: Registry, resume: Path, suspend: Path, idle_return: int, suspend_timeout: int
) -> list[str]:
    """slurm.conf lines for the pools with a Slurm partition: power saving (only where a
    partition sets SuspendTime: the global one stays INFINITE) and each pool's partition."""
    pools = sorted((name, p) for name, p in registry.pools.items() if p.partition)
    if not pools:
        return []
    out = [
        '# Desktop pools (docs/slurm.md, "Desktop pools"): Slurm\'s power saving wakes a desktop',
        "# through SLIM and sends it back to its own OS; `slim slurm harvest` keeps its windows.",
        f"ResumeProgram={resume}",
        f"SuspendProgram={suspend}",
        f"ResumeFailProgram={suspend}",
        "# A desktop that boots while Slurm thinks it is off must be taken back, not left DOWN:",
        "# ReturnToService=2",
    ]
    for name, pool in pools:
        nodes = sorted(n for n in registry.nodes if (p := registry.pool_of(n)) is not None and p[0] == name)
        # no job longer than a window (less the grace) fits; one without -t gets an hour at most
        max_minutes = max(1, int((window_seconds(pool) - pool.grace) // 60))
        out += [
            f"# pool {name}: its desktops only (no other partition with them; use this line for it)",
            f"PartitionName={pool.partition} Nodes={','.join(nodes)} MaxTime={max_minutes} "
            f"DefaultTime={min(60, max_minutes)} SuspendTime={idle_return} SuspendTimeout={suspend_timeout} "
            f"ResumeTimeout={int(pool.wake_timeout)} State=UP",
        ]
    return out


def write(files: SlurmFiles, directory: Path) -> list[Path]:
    """Write the files into ``directory`` (the scripts executable); return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, text, mode in (
        ("helpers.conf", files.helpers_conf, 0o644),
        ("job_submit.lua", files.job_submit_lua, 0o644),
        ("slurm.conf.slim", files.slurm_conf_lines, 0o644),
        *((n, t, 0o755) for n, t in files.scripts.items()),
    ):
        path = directory / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.replace(path)
        out.append(path)
    return out
