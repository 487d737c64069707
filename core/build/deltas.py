"""Manifest deltas: a copy-if-needed directory's new manifest as a patch from the ones
its previous releases named, which nodes that booted them kept.

A node keeps the manifest it last applied (:mod:`slim.agent.sync`).  When a release
changes a few files, its manifest differs from the last one in a few entries; rather
than the whole manifest (tens of bytes per file, most of it digests that did not
change), such a node fetches a delta of about the changed entries' size and rebuilds
the manifest with ``zstd -d --patch-from=KEPT`` (zstd's own delta mode, which the
initrd's zstd has), then checks the result against the release's ``manifest_raw``.

Deltas are made with the same ``zstd`` program, from the manifests of the environment's
:data:`DELTA_BASES` most recent releases (a node that missed more fetches the whole
manifest), and only where a delta is smaller than the whole manifest.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from pathlib import Path

from slim.core.store import Store
from slim.errors import FailedPrecondition, SlimError
from slim.release import ManifestDelta, ReleaseDirectory, decompress_manifest
from slim.vocabulary import Policy

DELTA_BASES = 3  # the previous releases a new manifest gets a delta from
DELTA_LEVEL = 3  # zstd level: --patch-from's long matches do the work; higher levels cost seconds
MAX_DELTA_WINDOW = 1 << 27  # base + new manifest bytes: what zstd -d --patch-from takes unasked


def raw_digest(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def previous_manifests(store: Store, environment: str, path: str) -> list[bytes]:
    """The decompressed manifests of ``path`` in the environment's last releases, newest
    first, each once (only those of ``sync`` directories: nodes keep no others)."""
    out: list[bytes] = []
    seen: set[str] = set()
    for digest in store.kept_releases(environment, DELTA_BASES - 1):
        try:
            built: ReleaseDirectory | None = store.read_release(digest).directories.get(path)
            if built is None or built.policy is not Policy.SYNC or built.manifest is None:
                continue
            if built.manifest.digest in seen:
                continue
            seen.add(built.manifest.digest)
            out.append(decompress_manifest(store.read_object(built.manifest.digest)))
        except (SlimError, OSError):
            continue  # a release or manifest gc removed: no delta from it
    return out


def make_deltas(store: Store, bases: list[bytes], raw: bytes, whole_size: int) -> tuple[ManifestDelta, ...]:
    """Deltas to ``raw`` (the new manifest) from each of ``bases`` (earlier manifests, as
    :func:`previous_manifests` gives them), stored as objects; none from a base that is the
    same manifest, none larger than ``whole_size`` (the compressed manifest)."""
    new_digest = raw_digest(raw)
    out = []
    with tempfile.TemporaryDirectory(prefix="slim-delta-") as tmp:
        new = Path(tmp) / "new"
        new.write_bytes(raw)
        for base in bases:
            base_digest = raw_digest(base)
            if base_digest == new_digest or len(base) + len(raw) > MAX_DELTA_WINDOW:
                continue
            old = Path(tmp) / "base"
            old.write_bytes(base)
            proc = subprocess.run(
                ["zstd", "-q", "-c", f"-{DELTA_LEVEL}", f"--patch-from={old}", str(new)],
                capture_output=True,
                check=False,
            )
            if proc.returncode != 0:
                why = proc.stderr.decode(errors="replace").strip()
                raise FailedPrecondition(f"zstd could not make a manifest delta: {why}")
            if len(proc.stdout) >= whole_size:
                continue
            out.append(ManifestDelta(base=base_digest, delta=store.put_bytes(proc.stdout)))
    return tuple(out)
