"""The signed boot plan: the document an agent acts on.

A plan is what the core answers ``GetBootPlan`` with (:class:`~slim.core.control.service.BootPlan`),
written as canonical JSON — sorted keys, no spaces — with three fields more:

- ``nonce``: the agent's, as it asked (a node's initrd has no trusted clock: the nonce is
  what makes a recorded plan useless to replay);
- ``issued_at`` and ``expires_at``: the core's clock, a plan holds for :data:`PLAN_LIFETIME`;

and signed by the core's key (:mod:`slim.signing`).  Relays hand the document and its
signature on untouched; the agent checks the signature with the public keys in its initrd
before it fetches or mounts anything, then that the document names its node and its nonce.
The JSON's shape is the one docs/relay.md shows.
"""

from __future__ import annotations

import json
from typing import Any

from slim.core.control.redirect import RankedRelay
from slim.core.control.service import BootPlan, DirectoryAction
from slim.release import ObjectRef

PLAN_LIFETIME = 300.0  # seconds a signed plan holds


def _obj(ref: ObjectRef | None) -> dict[str, Any] | None:
    return {"digest": ref.digest, "size": ref.size} if ref is not None else None


def _directory(d: DirectoryAction) -> dict[str, Any]:
    return {
        "path": d.path,
        "policy": d.policy.value,
        "archive": _obj(d.archive),
        "manifest": _obj(d.manifest),
        "nfs": {
            "server": d.nfs.server,
            "export": d.nfs.export,
            "options": d.nfs.options,
            "servers": list(d.nfs.servers),
        }
        if d.nfs
        else None,
        "tmpfs_size": d.tmpfs_size,
        "bytes": d.bytes,
        "files": d.files,
        "manifest_raw": d.manifest_raw,
        "deltas": [{"base": x.base, "delta": _obj(x.delta)} for x in d.deltas],
        "parts": [_obj(p) for p in d.parts],
    }


def _relay(r: RankedRelay) -> dict[str, Any]:
    return {
        "name": r.name,
        "urls": list(r.urls),
        "site": r.site,
        "tier": r.tier.label,
        "score": r.score,
        "heartbeat_seen": r.heartbeat_seen,
    }


def plan_document(plan: BootPlan, nonce: str, issued_at: float, lifetime: float = PLAN_LIFETIME) -> bytes:
    """The plan as the canonical JSON bytes the core signs."""
    doc = {
        "node": plan.node,
        "environment": plan.environment,
        "release_digest": plan.release_digest,
        "kernel": _obj(plan.kernel),
        "initrd": _obj(plan.initrd),
        "kernel_args": plan.kernel_args,
        "modules": list(plan.modules),
        "disk": plan.disk,
        "directories": [_directory(d) for d in plan.directories],
        "relays": [_relay(r) for r in plan.relays],
        "reason": plan.reason,
        "site": plan.site or "",
        "secrets": plan.secrets,
        "desktop": plan.desktop,
        "nonce": nonce,
        "issued_at": round(issued_at, 3),
        "expires_at": round(issued_at + lifetime, 3),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
