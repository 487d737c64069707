"""The plan's signature, checked before anything is fetched or mounted (standard library only).

The relay hands over ``{"document": "<the plan, canonical JSON>", "signature": "<signify
signature>", "relay_time": …}``; the core signed the document's exact bytes
(slim.core.control.plandoc).  The agent runs Debian's ``signify-openbsd`` — in the initrd,
beside the public keys the build put in ``/etc/slim/keys`` — against each trusted key, and
acts only on a document one of them signed, that names its node and the nonce it asked
with, and that has not expired (by this node's clock, with :data:`CLOCK_SLACK`).  Then the
plan's digests carry that trust to every object and tree.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from slim.agent.ee import Reporter
from slim.agent.fetch import Relays, now
from slim.agent.plan import BootArgs, Plan, PlanError, parse_plan, require_environment
from slim.agent.value import Value

KEYS_DIR = Path("/etc/slim/keys")  # in the initrd (core/build/agentrt.py puts them there)
SIGNIFY = ("/usr/bin/signify-openbsd", "signify-openbsd", "signify")
CLOCK_SLACK = 3600.0  # a node's clock at power-on (its RTC) may be off by this much
MAX_ENVELOPE_BYTES = 8 << 20
MAX_ENDORSEMENTS = 256  # slim.signing's: the rotations a medium follows at most


class PlanRefused(PlanError):
    """The plan is not one the core signed for this node and this request (says why)."""


class Checked(Value):
    """A plan document whose signature a trusted key verified."""

    __slots__ = ("document", "key", "relay_time")

    def __init__(
        self,
        document: bytes,  # what the agent parses (parse_plan)
        key: str,  # the trusted public key file that verified it
        relay_time: float | None,  # the relay's clock (not signed: only for the events' times)
    ) -> None:
        self.document = document
        self.key = key
        self.relay_time = relay_time


def trusted_keys(paths: list[Path]) -> list[Path]:
    """The public key files: each path a ``.pub`` file or a directory of them."""
    keys: list[Path] = []
    for p in paths:
        keys.extend(sorted(p.glob("*.pub")) if p.is_dir() else [p] if p.is_file() else [])
    if not keys:
        raise PlanRefused(
            f"no trusted public key in {', '.join(map(str, paths))}: every plan would be refused"
        )
    return keys


def signify() -> str:
    for name in SIGNIFY:
        found = shutil.which(name)
        if found:
            return found
    raise PlanRefused("cannot check the plan's signature: signify-openbsd is not installed")


def check(
    envelope: bytes, keys: list[Path], node: str, nonce: str, now: float, follow: bool = False
) -> Checked:
    """The signed document in the relay's answer, once it has proved itself (PlanRefused if not).
    ``follow``: trust, too, the keys the answer's endorsements chain to from ``keys`` (a boot
    medium, which carries the key of the day it was made; a release's initrd never does)."""
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise PlanRefused(f"the relay's answer is larger than {MAX_ENVELOPE_BYTES} bytes")
    try:
        doc = json.loads(envelope)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PlanRefused(f"the relay's answer is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("document"), str):
        raise PlanRefused("the relay's answer has no plan document")
    signature = doc.get("signature")
    if not isinstance(signature, str) or not signature:
        raise PlanRefused("the plan is not signed (the core has no signing key?)")
    relay_time = doc.get("relay_time")
    if isinstance(relay_time, bool) or not isinstance(relay_time, int | float) or not 0 < relay_time < 1e11:
        relay_time = None
    document = doc["document"].encode()
    with tempfile.TemporaryDirectory(prefix="slim-keys-") as tmp:
        if follow:
            keys = _followed(doc.get("endorsements", []), keys, Path(tmp))
        key = _verified_by(document, signature, keys)
        key_name = key.name if key.parent == Path(tmp) else str(key)
    try:
        plan = json.loads(document)
    except ValueError as exc:
        raise PlanRefused(f"the signed plan is not JSON: {exc}") from None
    if not isinstance(plan, dict):
        raise PlanRefused("the signed plan is not a JSON object")
    if plan.get("node") != node:
        raise PlanRefused(f"the signed plan is for node {plan.get('node')!r}, not {node!r}")
    if plan.get("nonce") != nonce:
        raise PlanRefused("the signed plan answers another request (its nonce is not ours): a replay?")
    expires = plan.get("expires_at")
    if isinstance(expires, bool) or not isinstance(expires, int | float):
        raise PlanRefused("the signed plan says not until when it holds (expires_at)")
    if now > expires + CLOCK_SLACK:
        raise PlanRefused(f"the signed plan expired {now - expires:.0f} s ago (by this node's clock)")
    return Checked(document, key_name, float(relay_time) if relay_time is not None else None)


def _followed(endorsements: object, keys: list[Path], tmp: Path) -> list[Path]:
    """``keys`` and each endorsed key (in order) whose endorsement a key trusted by then signed;
    the endorsed keys are written into ``tmp``."""
    if not isinstance(endorsements, list) or len(endorsements) > MAX_ENDORSEMENTS:
        raise PlanRefused(f"the relay's answer's endorsements are not a list of at most {MAX_ENDORSEMENTS}")
    trusted = list(keys)
    for i, e in enumerate(endorsements):
        if not (
            isinstance(e, dict) and isinstance(e.get("key"), str) and isinstance(e.get("signature"), str)
        ):
            raise PlanRefused(f"endorsement {i} is not {{key, signature}}")
        if len(e["key"]) > 1024 or len(e["signature"]) > 1024:
            raise PlanRefused(f"endorsement {i} is too long for a signify key and signature")
        try:
            _verified_by(e["key"].encode(), e["signature"], trusted, "key endorsement")
        except PlanRefused:
            continue  # signed by a key not trusted here: an older link of the chain
        path = tmp / f"endorsed-{i}.pub"
        path.write_text(e["key"])
        trusted.append(path)
    return trusted


def _verified_by(document: bytes, signature: str, keys: list[Path], what: str = "plan") -> Path:
    binary = signify()
    with tempfile.TemporaryDirectory(prefix="slim-plan-") as tmp:
        doc, sig = Path(tmp) / "plan", Path(tmp) / "plan.sig"
        doc.write_bytes(document)
        sig.write_text(signature)
        for key in keys:
            run = subprocess.run(
                [binary, "-V", "-q", "-p", str(key), "-m", str(doc), "-x", str(sig)],
                capture_output=True, timeout=30, check=False,
            )  # fmt: skip
            if run.returncode == 0:
                return key
    names = ", ".join(k.name for k in keys)
    raise PlanRefused(f"the {what}'s signature does not verify against the trusted keys ({names})")


class Asked(Value):
    """A plan the relays handed over and that proved itself (:func:`ask_plan`)."""

    __slots__ = ("answered", "asked", "checked", "plan", "size")

    def __init__(
        self,
        plan: Plan,
        checked: Checked,
        size: int,  # bytes of the relay's answer
        asked: float,  # this node's clock when it asked, and when the answer came
        answered: float,
    ) -> None:
        self.plan = plan
        self.checked = checked
        self.size = size
        self.asked = asked
        self.answered = answered


def ask_plan(
    relays: Relays,
    boot: BootArgs,
    keys: list[Path],
    follow: bool = False,
    observe: Callable[[str, str], None] | None = None,
) -> Asked:
    """The node's plan, asked for with a fresh nonce and checked (:func:`check`) before anything
    else is done; a refused plan is reported (stage ``plan``, under ``boot.boot_id`` when the
    command line names one) and raised."""
    nonce = secrets.token_hex(16)
    asked = now()
    query = {"nonce": nonce} | ({"environment": boot.environment} if boot.environment else {})
    _, data = relays.call("GET", f"/v1/nodes/{boot.node}/plan?{urllib.parse.urlencode(query)}")
    answered = now()
    try:
        checked = check(data, keys, boot.node, nonce, answered, follow=follow)
        plan = parse_plan(checked.document).replace(relay_time=checked.relay_time)
        require_environment(plan, boot)
    except PlanError as exc:
        refused = Reporter(relays, boot.node, "", observe=observe)
        if boot.boot_id:
            refused.boot_id = boot.boot_id
        refused("plan", ok=False, message=f"plan refused: {exc}", duration=answered - asked)
        refused.close()
        raise
    return Asked(plan, checked, len(data), asked, answered)
