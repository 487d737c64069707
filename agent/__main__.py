"""``python -m slim.agent``: build the node's environment from its plan.

On a real boot the agent runs in the initrd with the kernel command line
(``slim.node=… slim.relays=…``).  ``--no-reboot --target DIR`` builds the
environment under DIR instead (tests, the namespace cluster, the Slurm
simulation): no mounts, no switch_root.

Every plan is signed by the core; the agent checks the signature against the public
keys it trusts (:mod:`slim.agent.verify`: the initrd's /etc/slim/keys, or ``--trust``)
before it fetches or mounts anything, and refuses a plan for another node, for another
request (its nonce) or expired, reporting why.

Relays named by ``https://`` URLs are spoken to over TLS: their certificates must be
relays' certificates from SLIM's CA (the initrd's /etc/slim/ca.pem, or ``--ca``).

A real boot ends at ``switch_root``: the boot is ``starting`` until the environment
itself reports ``up`` (see :mod:`slim.agent.report_up`).  In no-reboot mode no
environment runs, so nothing reports ``up``: a lab that needs the boot ``up`` reports
it on the environment's behalf (``labs.onbehalf``), saying so.
"""

from __future__ import annotations

import gc
import hashlib
import os
import secrets
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from slim.agent import cache, report_up
from slim.agent import secrets as node_secrets
from slim.agent.cache import LocalObjects
from slim.agent.ee import STATE_DIR, BootFailed, Builder, Reporter, switch_root
from slim.agent.fetch import CA_FILE, FetchError, Relays, now
from slim.agent.plan import (
    TOKEN_FILE,
    BootArgs,
    Plan,
    PlanError,
    parse_cmdline,
    read_token,
)
from slim.agent.sync import Records
from slim.agent.verify import KEYS_DIR, ask_plan, trusted_keys


def fetch_secrets(plan: Plan, relays: Relays, target: Path, report: Reporter) -> None:
    """The node's secret files, into the built environment (their contents are never said)."""
    asked = now()
    try:
        query = urllib.parse.urlencode({"environment": plan.environment})
        _, data = relays.call("GET", f"/v1/nodes/{urllib.parse.quote(plan.node, safe='')}/secrets?{query}")
        written = node_secrets.install(target, node_secrets.parse(data))
    except (FetchError, PlanError, OSError) as exc:
        report("secrets", ok=False, message=str(exc)[:500], duration=now() - asked)
        raise BootFailed(f"secrets: {exc}") from exc
    report("secrets", message=f"{len(written)} file(s)", duration=now() - asked)


def open_cache(
    boot: BootArgs, cache_dir: Path | None, no_reboot: bool, report: Reporter
) -> LocalObjects | None:
    """The boot medium's cache (``slim.cache=UUID``: its partition, mounted; or ``--cache-dir``
    in no-reboot mode), if any: objects found there intact are not fetched, and those fetched
    are kept for the next boot.  A cache that cannot be used is said, and the boot goes on."""
    if cache_dir is not None:
        return LocalObjects(cache_dir)
    if no_reboot or not boot.cache:
        return None
    try:
        cache.attach(boot.cache, boot.medium)
        return LocalObjects(cache.MOUNT_POINT)
    except (cache.CacheError, OSError) as exc:
        report("cache", ok=True, message=f"the medium's cache is not used: {exc}"[:900])
        return None


class Args:
    """The agent's command line (:data:`OPTIONS`)."""

    cmdline: Path
    node: str | None
    relay: list[str]
    no_reboot: bool
    target: Path | None
    trust: list[Path]
    token_file: Path | None
    ca: Path
    follow_endorsements: bool
    cache_dir: Path | None
    state_dir: Path | None


# The options: (name, "flag" | "one" | "many", type, default, help)
OPTIONS: tuple[tuple[str, str, Callable[[str], object], object, str], ...] = (
    ("--cmdline", "one", Path, Path("/proc/cmdline"), "kernel command line file"),
    ("--node", "one", str, None, "node name (instead of slim.node on the command line)"),
    ("--relay", "many", str, None, "relay URL (repeatable; instead of slim.relays)"),
    ("--no-reboot", "flag", bool, False, "build under --target; no mounts, no switch_root"),
    ("--target", "one", Path, None, "where the environment is built (--no-reboot)"),
    (
        "--trust", "many", Path, None,
        "a public key (.pub) or a directory of them that plans must be signed by (repeatable; "
        f"default on a real boot: {KEYS_DIR}, which the build fills; with --no-reboot: required, "
        "for example STATE_DIR/keys/signing.pub)",
    ),
    (
        "--token-file", "one", Path, None,
        f"the node's token (slim node enroll), sent with every call to the relays (default on a "
        f"real boot: {TOKEN_FILE} in the initrd, if there is one)",
    ),
    (
        "--ca", "one", Path, CA_FILE,
        f"SLIM's CA certificate, which https relays' certificates must chain to (default: {CA_FILE}, "
        "which the build puts into the initrd when the registry has an https relay)",
    ),
    (
        "--follow-endorsements", "flag", bool, False,
        "also trust the keys the core's key rotations chain to from the trusted keys (a boot "
        "medium, which carries the key of the day it was made; a release's initrd never does)",
    ),
    (
        "--cache-dir", "one", Path, None,
        "a local object cache (tests; a boot medium's agent says slim.cache=UUID instead: its "
        "partition on the medium)",
    ),
    (
        "--state-dir", "one", Path, None,
        "where copy-if-needed keeps the manifests it applied, which the next run compares "
        "with and rebuilds from deltas (default with --no-reboot: TARGET.slim-state beside "
        f"--target; on a real boot: {STATE_DIR} on the node's partition)",
    ),
)  # fmt: skip


def parse_args(argv: list[str]) -> Args:
    """The command line.  Its usual forms (``--option VALUE``, ``--option=VALUE``, flags)
    are read here; for anything else (``--help``, an abbreviation, a mistake) argparse reads
    it, and gives its help and its errors: importing argparse takes about 4 ms, at every
    start of a node."""
    args = Args()
    names = {name: (name[2:].replace("-", "_"), kind, kind_type) for name, kind, kind_type, _, _ in OPTIONS}
    for name, kind, _, default, _ in OPTIONS:
        setattr(args, names[name][0], [] if kind == "many" else default)
    rest = iter(argv)
    for arg in rest:
        name, eq, value = arg.partition("=")
        if name not in names or (eq and names[name][1] == "flag"):
            return _argparse(argv)
        dest, kind, kind_type = names[name]
        if kind == "flag":
            setattr(args, dest, True)
            continue
        if not eq:
            value = next(rest, "-")
            if value.startswith("-"):  # argparse takes it for an option: its error
                return _argparse(argv)
        if kind == "many":
            getattr(args, dest).append(kind_type(value))
        else:
            setattr(args, dest, kind_type(value))
    return args


def _argparse(argv: list[str]) -> Args:
    import argparse

    ap = argparse.ArgumentParser(prog="slim-agent", description=__doc__.split("\n\n")[0])
    for name, kind, kind_type, default, text in OPTIONS:
        if kind == "flag":
            ap.add_argument(name, action="store_true", help=text)
        elif kind == "many":
            ap.add_argument(name, type=kind_type, action="append", default=[], help=text)
        else:
            ap.add_argument(name, type=kind_type, default=default, help=text)
    return ap.parse_args(argv, namespace=Args())


def main(argv: list[str] | None = None, observe: Callable[[str, str], None] | None = None) -> int:
    """The agent; ``observe(stage, boot_id)`` is called at each boot event (for a lab that
    runs the agent in its own process)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.node and args.relay:
            boot = BootArgs(args.node, "", "", tuple(u.rstrip("/") for u in args.relay))
        else:
            boot = BootArgs.from_cmdline(args.cmdline.read_text())
        if args.no_reboot and args.target is None:
            raise PlanError("--no-reboot needs --target DIR")
        if not args.no_reboot and os.getpid() != 1 and os.environ.get("SLIM_INITRD") != "1":
            raise PlanError(
                "a real boot runs only in the initrd (its /init); here use --no-reboot --target DIR"
            )
        if args.no_reboot and not args.trust:
            raise PlanError(
                "--no-reboot needs --trust KEY: the core's public key (STATE_DIR/keys/signing.pub)"
            )
        keys = trusted_keys(args.trust or [KEYS_DIR])
        token = read_token(args.token_file, default=not args.no_reboot)
        urls = boot.relays
        if token:  # a node's token travels only over TLS: only https:// relays, or none
            urls = tuple(u for u in boot.relays if u.startswith("https://"))
            if not urls:
                raise PlanError(
                    "this node has a token, which goes only over HTTPS, and no relay it was given "
                    "(slim.relays or --relay) is https://"
                )
        relays = Relays(urls, deadline=boot.deadline, token=token, ca=args.ca)
        report: Reporter | None = None
        try:
            got = ask_plan(relays, boot, keys, follow=args.follow_endorsements, observe=observe)
            plan, checked, asked, answered = got.plan, got.checked, got.asked, got.answered
            ranked = plan.https_relays if token else plan.relays  # a token: https:// ones only
            if ranked:  # the plan's ranking is fresher than the command line's
                relays.urls = list(dict.fromkeys([*ranked, *relays.urls]))
                relays.current = 0
            report = Reporter(relays, plan.node, plan.environment, observe=observe)
            if boot.boot_id:  # the boot script's: the loader's transfers are already under it
                report.boot_id = boot.boot_id
            clock = ""
            if plan.relay_time is not None:  # the relay's clock, read half-way through the call
                report.offset = plan.relay_time - (asked + answered) / 2
                clock = f"; clock {report.offset:+.3f} s from the relay's"
            # the environment proves its boot with a key of its own (the node's token stays here):
            # registered with the boot's first event, which is sent again until a relay takes it
            boot_key = secrets.token_urlsafe(24)
            report(
                "plan",
                got.size,
                boot_key_sha256=hashlib.sha256(boot_key.encode()).hexdigest(),
                message=f"{plan.environment} {plan.release_digest}{clock}; signed: {Path(checked.key).name}",
                duration=answered - asked,
            )
            target = args.target if args.no_reboot and args.target is not None else Path("/newroot")
            local = open_cache(boot, args.cache_dir, args.no_reboot, report)
            relays.local = local
            state = args.state_dir or (
                target.with_name(target.name + ".slim-state") if args.no_reboot else Path(STATE_DIR)
            )
            Builder(plan, relays, target, report, args.no_reboot, Records(state)).run()
            if plan.secrets:
                fetch_secrets(plan, relays, target, report)
            done = f"{relays.stats.objects} objects"
            if local is not None:  # the medium's cache keeps this boot's objects, nothing else
                removed = local.keep_only(plan.object_digests() | local.used)
                done += f"; the medium's cache: {local.hits} objects ({local.hit_bytes} bytes) read, "
                done += f"{local.stored} kept, {removed} removed"
                if not args.no_reboot:
                    cache.unmount()
            report("done", relays.stats.bytes, message=done)
            if not args.no_reboot:
                nfs = any(d.nfs is not None for d in plan.directories)
                try:
                    report_up.install(
                        target, node=plan.node, boot_id=report.boot_id, environment=plan.environment,
                        relays=list(dict.fromkeys([*plan.http_relays, *relays.urls])), init=boot.init,
                        nfs=nfs, boot_key=boot_key, desktop=plan.desktop,
                        unit=parse_cmdline(args.cmdline.read_text()).get("systemd.unit", ""),
                    )  # fmt: skip
                except OSError as exc:
                    report("report-up", ok=False, message=f"cannot leave the up report in /run: {exc}")
                    raise BootFailed(f"report-up: {exc}") from exc
                report("switch_root", message=f"{boot.init}: the environment reports up itself")
                if not report.close(tries=5):
                    print(
                        "slim-agent: no relay took the last boot events; switching root anyway",
                        file=sys.stderr,
                    )
                relays.close()
                switch_root(target, boot.init)
        finally:
            if report is not None:  # the events on their way: the relays take them before the agent ends
                report.close()
            relays.close()
    except (PlanError, FetchError, BootFailed, OSError) as exc:
        print(f"slim-agent: {exc}", file=sys.stderr)
        return 1
    print(f"slim-agent: {plan.node} runs {plan.environment} under {args.target}")
    return 0


if __name__ == "__main__":
    # One short run that makes next to no reference cycles: the cyclic collector would only
    # traverse, again and again, the walk's stat results and the manifest's columns (about
    # 70 ms, a tenth, of comparing 100,000 files)
    gc.disable()
    code = main()
    # The agent's work is done, its events taken, every file it wrote closed: it ends without
    # the interpreter's teardown (freeing every object: about 9 ms of an unchanged run of
    # 10,000 files, an eighth of it)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
