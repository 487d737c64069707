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

import argparse
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


def main(argv: list[str] | None = None, observe: Callable[[str, str], None] | None = None) -> int:
    """The agent; ``observe(stage, boot_id)`` is called at each boot event (for a lab that
    runs the agent in its own process)."""
    ap = argparse.ArgumentParser(prog="slim-agent", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cmdline", type=Path, default=Path("/proc/cmdline"), help="kernel command line file")
    ap.add_argument("--node", help="node name (instead of slim.node on the command line)")
    ap.add_argument(
        "--relay", action="append", default=[], help="relay URL (repeatable; instead of slim.relays)"
    )
    ap.add_argument(
        "--no-reboot", action="store_true", help="build under --target; no mounts, no switch_root"
    )
    ap.add_argument("--target", type=Path, help="where the environment is built (--no-reboot)")
    ap.add_argument(
        "--trust",
        type=Path,
        action="append",
        default=[],
        help="a public key (.pub) or a directory of them that plans must be signed by (repeatable; "
        f"default on a real boot: {KEYS_DIR}, which the build fills; with --no-reboot: required, "
        "for example STATE_DIR/keys/signing.pub)",
    )
    ap.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help=f"the node's token (slim node enroll), sent with every call to the relays (default on a "
        f"real boot: {TOKEN_FILE} in the initrd, if there is one)",
    )
    ap.add_argument(
        "--ca",
        type=Path,
        default=CA_FILE,
        help=f"SLIM's CA certificate, which https relays' certificates must chain to (default: {CA_FILE}, "
        "which the build puts into the initrd when the registry has an https relay)",
    )
    ap.add_argument(
        "--follow-endorsements",
        action="store_true",
        help="also trust the keys the core's key rotations chain to from the trusted keys (a boot "
        "medium, which carries the key of the day it was made; a release's initrd never does)",
    )
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="a local object cache (tests; a boot medium's agent says slim.cache=UUID instead: its "
        "partition on the medium)",
    )
    ap.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where copy-if-needed keeps the manifests it applied, which the next run compares "
        "with and rebuilds from deltas (default with --no-reboot: TARGET.slim-state beside "
        f"--target; on a real boot: {STATE_DIR} on the node's partition)",
    )
    args = ap.parse_args(argv)
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
            target = args.target if args.no_reboot else Path("/newroot")
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
                if not report.drain():
                    print(
                        "slim-agent: no relay took the last boot events; switching root anyway",
                        file=sys.stderr,
                    )
                relays.close()
                switch_root(target, boot.init)
        finally:
            relays.close()
    except (PlanError, FetchError, BootFailed, OSError) as exc:
        print(f"slim-agent: {exc}", file=sys.stderr)
        return 1
    print(f"slim-agent: {plan.node} runs {plan.environment} under {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
