"""``slim slurm``: Slurm's side of SLIM (plugin/, docs/slurm.md)."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import click

from slim.cli.common import (
    core_client,
    core_option,
    errors_to_exit,
    fail,
    log_level_option,
    registry_option,
    setup_logging,
)
from slim.errors import SlimError

node_option = click.option(
    "--node",
    default=None,
    help="This node's name (default: $SLIM_NODE, else the -N name of the slurmd that runs us, "
    "else the short host name).",
)


@click.group()
def slurm() -> None:
    """Slurm integration: sbatch --constraint=ee:NAME reboots the job's nodes into that EE."""


@slurm.command("config")
@registry_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write helpers.conf, job_submit.lua, slurm.conf.slim and the wrapper scripts "
    "(default: the directory of --slurm-conf; Slurm reads helpers.conf and job_submit.lua there).",
)
@core_option
@click.option(
    "--slurm-conf",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("/etc/slurm/slurm.conf"),
    show_default=True,
    help="The cluster's slurm.conf (the scripts export it as SLURM_CONF).",
)
@click.option(
    "--reboot",
    "reboot_command",
    default="systemctl reboot",
    show_default=True,
    help="The reboot action run on the node; {node} is its name, e.g. "
    "'ipmitool -I lanplus -H {node}-bmc -U admin -E chassis power cycle'.",
)
@click.option(
    "--prolog-log",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("/var/log/slim/prolog.log"),
    show_default=True,
    help="Where the PrologSlurmctld logs what it does (slurmctld does not keep its output).",
)
@click.option(
    "--resume-timeout",
    type=click.IntRange(30, 86400),
    default=900,
    show_default=True,
    help="Slurm's ResumeTimeout: seconds a reboot into a new EE may take before the node is marked down.",
)
@click.option(
    "--identity",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="An admin identity directory (slim admin enroll slurm) the scripts call the core with "
    "(exported as SLIM_IDENTITY; it must be readable where slurmctld and slurmd run them).  "
    "Not needed when --core is the core's local socket.",
)
@click.option(
    "--power-log",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("/var/log/slim/power.log"),
    show_default=True,
    help="Desktop pools: where slim-resume and slim-suspend log (slurmctld does not keep their output).",
)
@click.option(
    "--idle-return",
    type=click.IntRange(60, 86400 * 7),
    default=1800,
    show_default=True,
    help="Desktop pools: SuspendTime of a pool's partition, the seconds an idle desktop stays in the "
    "EE before Slurm sends it back to its own OS (and wakes it again for a job).",
)
@click.option(
    "--suspend-timeout",
    type=click.IntRange(1, 3600),
    default=120,
    show_default=True,
    help="Desktop pools: SuspendTimeout of a pool's partition, seconds a desktop takes to go back "
    "to its own OS (Slurm does not use it until then).",
)
@click.option(
    "--boot-time",
    type=click.IntRange(0, 86400),
    default=300,
    show_default=True,
    help="helpers.conf BootTime: the seconds Slurm's main scheduler adds to every job's end when it "
    "checks reservations (it assumes a reboot).  Jobs on a desktop pool start only if they end this "
    "long before the blackout (window end minus grace): set it to a real reboot's time.",
)
def slurm_config(
    registry_path: Path,
    out: Path | None,
    core_address: str,
    slurm_conf: Path,
    reboot_command: str,
    prolog_log: Path,
    resume_timeout: int,
    identity: Path | None,
    power_log: Path,
    idle_return: int,
    suspend_timeout: int,
    boot_time: int,
) -> None:
    """Write the Slurm files for the registry's environments into --out.

    helpers.conf (every environment's feature, mutually exclusive) and
    job_submit.lua (rewrites ee:NAME to ee=NAME, rejects unknown environments
    at submit time) go beside slurm.conf; slurm.conf.slim holds the lines to
    add to slurm.conf (NodeFeaturesPlugins, JobSubmitPlugins, RebootProgram,
    PrologSlurmctld, ResumeTimeout).  For desktop pools with a Slurm partition,
    also the power-saving lines (ResumeProgram, SuspendProgram, ResumeFailProgram:
    slim-resume, slim-suspend) and each pool's PartitionName line.  Prints what it
    wrote.
    """
    from slim.core.registry import load_registry
    from slim.plugin.config import render, write
    from slim.plugin.reboot import expand

    out = out or slurm_conf.parent
    with errors_to_exit():
        expand(reboot_command, "n1")
        files = render(
            load_registry(registry_path), directory=out.absolute(), core=core_address, slurm_conf=slurm_conf,
            reboot=reboot_command, prolog_log=prolog_log.absolute(),
            resume_timeout=resume_timeout, source=str(registry_path),
            identity=identity.absolute() if identity is not None else None,
            power_log=power_log.absolute(), idle_return=idle_return, suspend_timeout=suspend_timeout,
            boot_time=boot_time,
        )  # fmt: skip
        for path in write(files, out):
            click.echo(str(path))


@slurm.command("helper")
@click.argument("feature", required=False)
@node_option
@core_option
@click.option(
    "--prefetch-timeout",
    type=click.FloatRange(0),
    default=240.0,
    show_default=True,
    help="With FEATURE: seconds to wait for the node's relays to be warm before the reboot "
    "(stay below helpers.conf ExecTime).",
)
def slurm_helper(feature: str | None, node: str | None, core_address: str, prefetch_timeout: float) -> None:
    """node_features/helpers: with no FEATURE print the node's active EE feature (only once
    its boot into it completed); with FEATURE (ee=NAME) make NAME the node's next boot."""
    from slim.plugin.helper import active_features, node_name, stage_next_boot, warm_relays

    name = node_name(node)
    with errors_to_exit(), core_client(core_address) as client:
        if feature is None:
            shown, note = active_features(client, name)
            for f in shown:
                click.echo(f)
            if note:
                click.echo(note, err=True)
            return
        env = stage_next_boot(client, name, feature)
        click.echo(f"slim: {name} boots {env} next", err=True)
        try:
            for line in warm_relays(client, name, env, prefetch_timeout):
                click.echo(f"slim: prefetch for {name}: {line}", err=True)
        except SlimError as exc:  # the boot still works, from colder relays
            click.echo(f"slim: prefetch for {name} not finished: {exc.message}", err=True)


@slurm.command("prolog")
@core_option
@click.option(
    "--log",
    "log_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also append what it does to this file (slurmctld does not keep the prolog's output).",
)
@click.option(
    "--boot-timeout",
    type=click.FloatRange(1),
    default=900.0,
    show_default=True,
    help="Seconds the nodes may take to run the EE before they are set DOWN.",
)
def slurm_prolog(core_address: str, log_file: Path | None, boot_timeout: float) -> None:
    """PrologSlurmctld: prefetch the job's EE on its nodes' relays, wait until the nodes run it,
    set nodes whose boot failed DOWN (with the reason) and exit 1 so Slurm requeues the job.

    Reads SLURM_JOB_ID, SLURM_JOB_CONSTRAINTS and SLURM_JOB_NODELIST."""
    import os
    import time

    from slim.plugin.prolog import run

    def say(message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} slim prolog: {message}"
        click.echo(line, err=True)
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with log_file.open("a") as f:
                f.write(line + "\n")

    job = os.environ.get("SLURM_JOB_ID", "?")
    try:
        outcome = run(
            core_address, job, os.environ.get("SLURM_JOB_CONSTRAINTS", ""),
            os.environ.get("SLURM_JOB_NODELIST", ""), say, boot_timeout=boot_timeout,
        )  # fmt: skip
    except SlimError as exc:
        say(f"job {job}: failed: {exc.message}")
        sys.exit(1)
    sys.exit(1 if outcome.failed else 0)


@slurm.command("reboot")
@click.option(
    "--command",
    "command",
    default="systemctl reboot",
    show_default=True,
    help="The reboot action, run with /bin/sh; {node} in it is the node's name.",
)
@node_option
def slurm_reboot(command: str, node: str | None) -> None:
    """RebootProgram: reboot this node (into the EE the helper staged) with --command
    ({node} in it is the node's name); exits with the command's status."""
    from slim.plugin.helper import node_name
    from slim.plugin.reboot import run

    try:
        code = run(command, node_name(node))
    except ValueError as exc:
        fail(str(exc))
    sys.exit(code)


@slurm.command("harvest")
@core_option
@click.option("--once", is_flag=True, help="One pass, then exit (exit 1 if an action failed).")
@click.option(
    "--interval",
    type=click.FloatRange(1, 3600),
    default=30.0,
    show_default=True,
    help="Seconds between passes (each jittered by up to 10 %).",
)
@click.option("--dry-run", is_flag=True, help="Print the scontrol commands a pass would run; run none.")
@log_level_option()
def slurm_harvest(core_address: str, once: bool, interval: float, dry_run: bool, log_level: str) -> None:
    """Keep desktop pools with a Slurm partition inside their windows (runs on the controller).

    Each pass asks the core for the pools (HarvestStatus) and Slurm for its nodes,
    reservations, partitions and running jobs, then runs the scontrol commands
    that are missing: blackout reservations (slim-POOL-YYYYMMDDTHHMM[SS],
    Flags=MAINT,IGNORE_JOBS) from grace seconds before each window's end to the
    next window's start; POWER_UP at a window's start; POWER_DOWN_FORCE
    (on_window_end: requeue) or POWER_DOWN_ASAP (finish) at end - grace, and
    POWER_DOWN_FORCE for anything up outside the windows; a desktop whose owner
    picked their own OS is powered down and drained with the core's reason until
    the next window.  It reports which desktops run jobs (ReportDesktopJobs).
    Needs the pools' partitions set up by slim slurm config (power saving)."""
    import random
    import time

    from slim.plugin.harvest import Harvester, Scontrol

    setup_logging(log_level)
    client = core_client(core_address)
    harvester = Harvester(client, Scontrol())
    while True:
        try:
            result = harvester.once(time.time(), dry_run=dry_run)
        except SlimError as exc:
            if once:
                fail(exc.message)
            logging.getLogger("slim.plugin.harvest").warning("pass failed: %s", exc.message)
        else:
            if dry_run:
                for action in result.actions:
                    click.echo(str(action))
            if once:
                sys.exit(1 if result.failed else 0)
        try:
            time.sleep(interval * random.uniform(0.9, 1.1))  # noqa: S311 - jitter, not secrets
        except KeyboardInterrupt:
            return


@slurm.group("power")
def slurm_power() -> None:
    """Slurm's ResumeProgram and SuspendProgram for desktop pools (slim-resume, slim-suspend)."""


def _power(verb: str, hostlist: str, core_address: str, log_file: Path | None) -> None:
    import time

    from slim.plugin.harvest import CorePower, Scontrol

    def say(message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} slim power {verb}: {message}"
        if log_file is not None:  # first: slurmctld runs us with no standard error to write to
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with log_file.open("a") as f:
                f.write(line + "\n")
        with contextlib.suppress(OSError, ValueError, AttributeError):
            click.echo(line, err=True)

    try:
        nodes = Scontrol(timeout=10).hostnames(hostlist)
        hook = CorePower(core_client(core_address))
        call = hook.resume if verb == "resume" else hook.suspend
        outcomes = call(nodes, f"slurm {verb} ({'ResumeProgram' if verb == 'resume' else 'SuspendProgram'})")
    except SlimError as exc:
        say(f"{hostlist}: {exc.message}")
        sys.exit(1)
    except Exception as exc:  # slurmctld keeps no output: say it where it can be read
        say(f"{hostlist}: unexpected error: {exc!r}")
        raise
    for o in outcomes:
        say(f"{o.node}: {o.message}")
    sys.exit(0 if all(o.ok for o in outcomes) else 1)


power_log_option = click.option(
    "--log",
    "log_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also append what it does to this file (slurmctld does not keep the output).",
)


@slurm_power.command("resume")
@click.argument("hostlist")
@core_option
@power_log_option
def slurm_power_resume(hostlist: str, core_address: str, log_file: Path | None) -> None:
    """ResumeProgram: wake the desktops of HOSTLIST (d[1-3]) into their pool's EE
    (WakeDesktops: a relay on each desktop's segment sends the magic packets, at the
    pool's rate).  Returns at once; Slurm waits for their slurmd (ResumeTimeout)."""
    _power("resume", hostlist, core_address, log_file)


@slurm_power.command("suspend")
@click.argument("hostlist")
@core_option
@power_log_option
def slurm_power_suspend(hostlist: str, core_address: str, log_file: Path | None) -> None:
    """SuspendProgram (and ResumeFailProgram): send the desktops of HOSTLIST back to their
    own OS (ReleaseDesktops: poweroff if SLIM woke them from off, else reboot; their menu
    boots their own OS until the next window).  Nothing for a desktop not in SLIM's EE."""
    _power("suspend", hostlist, core_address, log_file)
