"""What the agent leaves in the environment's RAM so that the environment itself can say it
is up (standard library only; a real boot only).

A boot is ``up`` only when the running environment reports in, never because the agent
got as far as switch_root.  Before it execs the EE's init the agent mounts a tmpfs on the
new root's ``/run`` (systemd keeps a ``/run`` that is already mounted) and writes there:

- ``/run/slim/busybox``: the initrd's static busybox (its ``wget`` posts the report);
- ``/run/slim/report`` (mode 0700: root's): a shell script that posts one event, stage
  ``up``, to the relays of the plan (each in turn, a bounded number of rounds, jittered),
  under the boot's id; the event carries no time, so the relay that takes it stamps it;
- ``/run/slim/boot_key`` (mode 0600): a key the agent made for this boot, whose SHA-256 its
  ``switch_root`` event registered with the core.  The report sends it in the request's
  body (written to a 0600 file, never on a command line, where every user could read it),
  so that only root on the node speaks for this boot.  It proves this boot's report (and a
  desktop's orders), nothing else: the node's token (``slim node enroll``), which fetches
  plans and secrets, never leaves the initrd, whose Python checks relays' certificates,
  where busybox's wget checks none.  So the report may go over plain HTTP (the plan's
  ``http://`` relays first, then the agent's): whoever reads the key off the wire can say
  only that this boot is up;
- for a systemd EE (its init resolves to ``systemd``): ``slim-up.service`` under
  ``/run/systemd/system``, wanted by and ordered after the EE's default target, which runs
  the script once that target is reached.  Another init runs ``/run/slim/report`` itself
  (docs/agent.md);
- when a directory is on NFS, the boot NIC is marked unmanaged for systemd-networkd and
  NetworkManager (``/run/systemd/network``, ``/run/NetworkManager/conf.d``), so that the
  EE's network manager does not take down the link its ``/usr`` lives on.

For a harvested desktop (the plan says ``desktop``), also:

- ``/run/slim/orders`` (mode 0700): a loop that asks the relays of the plan, every few seconds
  (the core says how often), what this boot must do (``POST /v1/nodes/NODE/order`` with the
  boot id, and the boot key); told ``poweroff`` or ``reboot`` (the window
  ends: back to the desktop's own OS), it arms Wake-on-LAN on the boot NICs when the EE has
  ``ethtool``, then has the EE's init do it (systemd: ``systemctl``; else busybox, at once);
- for a systemd EE, ``slim-orders.service``, wanted by the default target, which runs it;
  another init runs ``/run/slim/orders`` itself;
- ``/run/systemd/network/10-slim-wol.link`` for the boot NICs: ``WakeOnLan=magic`` (with
  systemd's default naming policies), so that the NIC stays armed for the next night's
  magic packet when the desktop powers off (firmware and some drivers reset it at boot).

Nothing is written to the image or to a disk: everything is in the tmpfs on ``/run``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import urllib.parse
from pathlib import Path, PurePosixPath

BUSYBOX = Path("/bin/busybox")  # in the initrd (core/build/agentrt.py puts it there)
# The applets the scripts below run (`$bb APPLET`, and the shell): the initrd's busybox
# has them (core/build/smallbusybox.py builds it with these and the initrd's own).
APPLETS = ("sh", "cat", "head", "od", "poweroff", "reboot", "sleep", "sync", "timeout", "tr", "wget")
RUN_OPTIONS = "mode=0755,nosuid,nodev,size=20%"  # what systemd would mount /run with
UNIT = "slim-up.service"
ORDERS_UNIT = "slim-orders.service"
REPORT_ROUNDS = 20  # rounds over the relays before the script gives up
DEFAULT_TARGET = "multi-user.target"
MAX_SYMLINK_HOPS = 40

REPORT_SCRIPT = """\
#!/run/slim/busybox sh
# Written by the SLIM agent into this environment's RAM.  Tells SLIM, through a relay,
# that the environment is up: run it once the environment's init has started what it
# starts (systemd: slim-up.service does).  Usage: /run/slim/report [MESSAGE]
set -f
bb="${{0%/*}}/busybox"  # beside this script: /run/slim/busybox
url_path={url_path}
relays={relays}
message=$(printf '%s' "${{1:-the environment is up}}" | $bb tr -cd 'A-Za-z0-9 ._:/+=-' | $bb head -c 200)
body={head}"$message"{tail}
if [ -r "${{0%/*}}/boot_key" ]; then  # the boot's key, in the body (never in a command line)
  key=$($bb cat "${{0%/*}}/boot_key")
  body="${{body%?}}, \\"boot_key\\": \\"$key\\"}}"
fi
umask 077
printf '%s' "$body" > "${{0%/*}}/report.json"  # printf is the shell's own: no process to see it
round=0
while [ $round -lt {rounds} ]; do
  for url in $relays; do
    if $bb timeout 15 $bb wget -q -O /dev/null --no-check-certificate \\
        --header 'Content-Type: application/json' --post-file "${{0%/*}}/report.json" "$url$url_path"; then
      echo "slim: reported up to $url"
      exit 0
    fi
  done
  round=$((round + 1))
  # 2 to 5 s, from the kernel's randomness: a storm's nodes do not come back together
  $bb sleep $((2 + $($bb od -An -N1 -tu1 /dev/urandom) % 4))
done
echo "slim: no relay took the report that this environment is up" >&2
exit 1
"""

UNIT_TEXT = """\
# Written by the SLIM agent into this environment's RAM (not part of the image).
[Unit]
Description=SLIM: report that this environment is up
After={target}

[Service]
Type=oneshot
ExecStart=/run/slim/busybox sh /run/slim/report "systemd reached {target}"
"""

NETWORKD_TEXT = """\
# Written by the SLIM agent: this NIC carries the environment's NFS directories.
[Match]
MACAddress={macs}

[Link]
Unmanaged=yes
"""

NETWORKMANAGER_TEXT = """\
# Written by the SLIM agent: this NIC carries the environment's NFS directories.
[keyfile]
unmanaged-devices={devices}
"""


ORDERS_SCRIPT = """\
#!/run/slim/busybox sh
# Written by the SLIM agent into this harvested desktop's RAM.  Asks SLIM, through a relay,
# whether this boot must end (the night's window closes): told poweroff or reboot, it arms
# Wake-on-LAN and does it.  Runs until then; usage: /run/slim/orders [COMMAND]
# (COMMAND ACTION is run instead of powering off or rebooting: for tests)
set -f
instead="$1"
here="${{0%/*}}"
bb="$here/busybox"
url_path={url_path}
relays={relays}
nics={nics}
systemd={systemd}
umask 077
printf '%s' {body} > "$here/order.json"
if [ -r "$here/boot_key" ]; then  # the boot's key, in the body (never in a command line)
  key=$($bb cat "$here/boot_key")
  printf '%s' {body_head}"$key"'"}}' > "$here/order.json"
fi
while :; do
  wait=15
  for url in $relays; do
    url="${{url%/}}"
    answer=$($bb timeout 15 $bb wget -q -O - --no-check-certificate \\
        --header 'Content-Type: application/json' --post-file "$here/order.json" "$url$url_path") || continue
    set -- $answer
    case "$2" in ''|*[!0-9]*) ;; *) wait=$2 ;; esac
    case "$1" in
      poweroff|reboot)
        echo "slim: told to $1: this desktop goes back to its own OS"
        for nic in $nics; do
          command -v ethtool >/dev/null 2>&1 && ethtool -s "$nic" wol g 2>/dev/null
        done
        $bb sync
        if [ -n "$instead" ]; then "$instead" "$1"
        elif [ "$systemd" = yes ]; then systemctl "$1"
        else $bb "$1" -f
        fi
        exit 0 ;;
    esac
    break
  done
  # the core's interval, plus up to a fifth more (the kernel's randomness): a pool woken
  # together does not ask together all night
  $bb sleep $((wait + $($bb od -An -N1 -tu1 /dev/urandom) * wait / 1275))
done
"""

ORDERS_UNIT_TEXT = """\
# Written by the SLIM agent into this desktop's RAM (not part of the image).
[Unit]
Description=SLIM: back to this desktop's own OS when the night's window ends
After={target}

[Service]
ExecStart=/run/slim/busybox sh /run/slim/orders
Restart=on-failure
RestartSec=10
"""

WOL_LINK_TEXT = """\
# Written by the SLIM agent: keep Wake-on-LAN armed on this desktop's NIC for the next night.
# The naming policies are systemd's defaults (this file is matched before 99-default.link).
[Match]
MACAddress={macs}

[Link]
NamePolicy=keep kernel database onboard slot path
AlternativeNamesPolicy=database onboard slot path
MACAddressPolicy=persistent
WakeOnLan=magic
"""


def boot_nics() -> dict[str, str]:
    """Name -> MAC of the interfaces the initrd configured (those with a route)."""
    names: set[str] = set()
    try:
        with open("/proc/net/route") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields:
                    names.add(fields[0])
    except OSError:
        return {}
    out = {}
    for name in sorted(names):
        try:
            mac = Path(f"/sys/class/net/{name}/address").read_text().strip()
        except OSError:
            continue
        if mac and mac != "00:00:00:00:00:00":
            out[name] = mac
    return out


def resolve_in(root: Path, path: str) -> Path:
    """``path`` inside ``root`` as a chroot would resolve it (absolute links stay inside).
    A copy of slim.core.build.initrd.resolve_in_image (the agent imports only the standard
    library), which stops following links after MAX_SYMLINK_HOPS instead of raising."""
    todo = [c for c in reversed(PurePosixPath(path).parts) if c not in ("/", "", ".")]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop()
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        if not here.is_symlink() or hops >= MAX_SYMLINK_HOPS:
            done.append(part)
            continue
        hops += 1
        target = PurePosixPath(os.readlink(here))
        if target.is_absolute():
            done = []
        todo.extend(c for c in reversed(target.parts) if c not in ("/", "", "."))
    return root.joinpath(*done)


def uses_systemd(root: Path, init: str) -> bool:
    return resolve_in(root, init).name == "systemd"


def default_target(root: Path, unit: str = "") -> str:
    """The target the EE boots to: ``unit`` (``systemd.unit=`` on the kernel command line)
    when it names a target, else what the image's ``default.target`` links to."""
    if unit.endswith(".target") and "/" not in unit:
        return unit
    for where in ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system"):
        link = root / where / "default.target"
        if link.is_symlink():
            name = PurePosixPath(os.readlink(link)).name
            if name.endswith(".target") and name != "default.target":
                return name
    return DEFAULT_TARGET


def boot_macs() -> list[str]:
    """MAC addresses of the interfaces the initrd configured (those with a route)."""
    return list(boot_nics().values())


def install(
    root: Path,
    *,
    node: str,
    boot_id: str,
    environment: str,
    relays: list[str],
    init: str,
    nfs: bool,
    macs: list[str] | None = None,
    busybox: Path = BUSYBOX,
    unit: str = "",
    boot_key: str = "",
    desktop: bool = False,
    nics: dict[str, str] | None = None,
) -> list[str]:
    """Write the report (and, for systemd, its unit) under ``root``/run; the paths written.

    ``root/run`` must already be the tmpfs the EE will keep."""
    run = root / "run"
    slim = run / "slim"
    slim.mkdir(parents=True, exist_ok=True)
    slim.chmod(0o755)
    written: list[str] = []

    def write(path: Path, text: str, mode: int = 0o644) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
        written.append("/" + str(path.relative_to(root)))

    shutil.copyfile(busybox, slim / "busybox")
    (slim / "busybox").chmod(0o755)
    written.append("/run/slim/busybox")
    # the event's JSON is made here, whole but for the message (which the script cleans)
    head, _, tail = json.dumps(
        {
            "events": [
                {"boot_id": boot_id, "stage": "up", "ok": True, "environment": environment, "message": "@"}
            ]
        }
    ).partition('"@"')
    write(
        slim / "report",
        REPORT_SCRIPT.format(
            url_path=shlex.quote(f"/v1/nodes/{urllib.parse.quote(node, safe='')}/events"),
            relays=shlex.quote(" ".join(relays)),
            head=shlex.quote(head + '"'),
            tail=shlex.quote('"' + tail),
            rounds=REPORT_ROUNDS,
        ),
        0o700,  # root's: the node's users do not speak for it
    )
    if boot_key:  # the boot's key, in RAM, root's only: the report sends it
        write(slim / "boot_key", boot_key + "\n", 0o600)
    systemd = uses_systemd(root, init)
    target = default_target(root, unit) if systemd else ""

    def wanted(name: str, text: str) -> None:
        """A unit in the EE's /run, wanted by (and ordered after) its default target."""
        units = run / "systemd" / "system"
        write(units / name, text.format(target=target))
        wants = units / f"{target}.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / name).symlink_to(f"../{name}")
        written.append(f"/run/systemd/system/{target}.wants/{name}")

    if systemd:
        wanted(UNIT, UNIT_TEXT)
    if desktop:
        found_nics = boot_nics() if nics is None else nics
        body_head, _, _ = json.dumps({"boot_id": boot_id, "boot_key": "@"}).partition('@"')
        write(
            slim / "orders",
            ORDERS_SCRIPT.format(
                url_path=shlex.quote(f"/v1/nodes/{urllib.parse.quote(node, safe='')}/order"),
                relays=shlex.quote(" ".join(relays)),
                nics=shlex.quote(" ".join(found_nics)),
                systemd="yes" if systemd else "no",
                body=shlex.quote(json.dumps({"boot_id": boot_id})),
                body_head=shlex.quote(body_head),
            ),
            0o700,
        )
        if systemd:
            wanted(ORDERS_UNIT, ORDERS_UNIT_TEXT)
        if found_nics:
            write(
                run / "systemd" / "network" / "10-slim-wol.link",
                WOL_LINK_TEXT.format(macs=" ".join(found_nics.values())),
            )
    if nfs:
        found = boot_macs() if macs is None else macs
        if found:
            write(
                run / "systemd" / "network" / "00-slim-boot.network",
                NETWORKD_TEXT.format(macs=" ".join(found)),
            )
            write(
                run / "NetworkManager" / "conf.d" / "00-slim-boot.conf",
                NETWORKMANAGER_TEXT.format(devices=";".join(f"mac:{m}" for m in found)),
            )
    return written
