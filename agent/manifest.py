"""The copy-if-needed manifest: every entry of one EE directory with what it takes
to recreate and to check it.

Standard library only (the agent reads manifests in the initrd).  The encoded
form is JSON Lines: a header object, then one object per entry in tree order
(see slim.agent.tree).  The store keeps it compressed with zstd.

Header: ``{"format": "slim-manifest", "version": 1, "directory": "/etc",
"entries": N, "files": F, "bytes": B, "chunk_size": 1048576}``.

Entry keys: ``path``, ``type`` (dir, file, symlink, hardlink, chr, blk, fifo),
``mode``, ``uid``, ``gid``, ``mtime_ns``; files add ``size`` and ``sha256``
(hex) and, when larger than ``CHUNKED_ABOVE``, ``chunks`` (hex digests of
consecutive ``chunk_size`` pieces, each a store object); symlinks and hard
links add ``target``; devices add ``rdev`` [major, minor]; ``xattrs`` maps
names to base64 values.  Files of copy-if-needed directories are store
objects named by their ``sha256`` (or by their chunks), so a node fetches
only what differs.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from slim.agent.tree import BLK, CHR, FILE, HARDLINK, KINDS, SYMLINK, Entry, check_relpath

FORMAT = "slim-manifest"
VERSION = 1
CHUNK_SIZE = 1 << 20
CHUNKED_ABOVE = 4 << 20
_HEX = re.compile(r"[0-9a-f]{64}")  # slim.vocabulary.HEX_RE, copied: standard library only here


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    entry: Entry
    sha256: str = ""  # regular files: hex digest of the whole file
    chunks: tuple[str, ...] = ()  # files above CHUNKED_ABOVE: hex digests of the pieces


def parts(m: ManifestEntry) -> list[tuple[str, int]]:
    """The objects that hold a file's bytes, in order, with their sizes: its chunks (every one
    CHUNK_SIZE but the last), or the whole file; none for an entry that is not a file."""
    if m.chunks:
        return [(c, min(CHUNK_SIZE, m.entry.size - i * CHUNK_SIZE)) for i, c in enumerate(m.chunks)]
    return [(m.sha256, m.entry.size)] if m.entry.kind == FILE and m.sha256 else []


@dataclass(frozen=True, slots=True)
class Manifest:
    directory: str
    entries: tuple[ManifestEntry, ...]
    files: int
    bytes: int


def make(directory: str, entries: Iterable[ManifestEntry]) -> Manifest:
    items = tuple(entries)
    files = sum(1 for m in items if m.entry.kind != "dir")
    size = sum(m.entry.size for m in items if m.entry.kind == FILE)
    return Manifest(directory, items, files, size)


def _record(m: ManifestEntry) -> dict[str, Any]:
    e = m.entry
    rec: dict[str, Any] = {
        "path": e.path,
        "type": e.kind,
        "mode": e.mode,
        "uid": e.uid,
        "gid": e.gid,
        "mtime_ns": e.mtime_ns,
    }
    if e.kind == FILE:
        rec["size"] = e.size
        rec["sha256"] = m.sha256
        if m.chunks:
            rec["chunks"] = list(m.chunks)
    if e.kind in (SYMLINK, HARDLINK):
        rec["target"] = e.target
    if e.kind in (CHR, BLK):
        rec["rdev"] = list(e.rdev)
    if e.xattrs:
        rec["xattrs"] = {k: base64.b64encode(v).decode() for k, v in e.xattrs}
    return rec


def encode(manifest: Manifest) -> bytes:
    """The manifest as JSON Lines (deterministic: same manifest, same bytes)."""
    header = {
        "format": FORMAT,
        "version": VERSION,
        "directory": manifest.directory,
        "entries": len(manifest.entries),
        "files": manifest.files,
        "bytes": manifest.bytes,
        "chunk_size": CHUNK_SIZE,
    }
    lines = [json.dumps(header, sort_keys=True, separators=(",", ":"))]
    lines.extend(json.dumps(_record(m), sort_keys=True, separators=(",", ":")) for m in manifest.entries)
    return ("\n".join(lines) + "\n").encode()


def _int(rec: dict[str, Any], key: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    value = rec.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{key!r} must be an integer in [{lo}, {hi}]")
    return value


def _entry(rec: Any) -> ManifestEntry:
    if not isinstance(rec, dict):
        raise ValueError("an entry must be a JSON object")
    path = rec.get("path")
    if not isinstance(path, str):
        raise ValueError("'path' must be a string")
    check_relpath(path)
    kind = rec.get("type")
    if kind not in KINDS:
        raise ValueError(f"unknown type {kind!r}")
    target = rec.get("target", "")
    if not isinstance(target, str) or (kind in (SYMLINK, HARDLINK) and not target):
        raise ValueError("'target' must be a non-empty string for links")
    if kind == HARDLINK:
        check_relpath(target)
    sha = rec.get("sha256", "")
    chunks = rec.get("chunks", [])
    if kind == FILE and (not isinstance(sha, str) or not _HEX.fullmatch(sha)):
        raise ValueError("'sha256' must be 64 lowercase hex digits")
    if not isinstance(chunks, list) or not all(isinstance(c, str) and _HEX.fullmatch(c) for c in chunks):
        raise ValueError("'chunks' must be a list of sha256 hex digests")
    if chunks and kind != FILE:  # they would name objects to fetch (slim.release.manifest_objects)
        raise ValueError(f"'chunks' given for a {kind}, not a file")
    rdev = rec.get("rdev", [0, 0])
    if not (isinstance(rdev, list) and len(rdev) == 2 and all(isinstance(x, int) and x >= 0 for x in rdev)):
        raise ValueError("'rdev' must be [major, minor]")
    xattrs_in = rec.get("xattrs", {})
    if not isinstance(xattrs_in, dict):
        raise ValueError("'xattrs' must be an object")
    xattrs = tuple(sorted((str(k), base64.b64decode(str(v), validate=True)) for k, v in xattrs_in.items()))
    size = _int(rec, "size") if kind == FILE else 0
    if kind == FILE and chunks and len(chunks) != -(-size // CHUNK_SIZE):
        raise ValueError(f"{len(chunks)} chunks do not cover {size} bytes")
    entry = Entry(
        path=path,
        kind=kind,
        mode=_int(rec, "mode", 0, 0o7777),
        uid=_int(rec, "uid", 0, 2**32 - 1),
        gid=_int(rec, "gid", 0, 2**32 - 1),
        mtime_ns=_int(rec, "mtime_ns", -(2**63), 2**63 - 1),
        size=size,
        target=target if kind in (SYMLINK, HARDLINK) else "",  # as encode() writes them:
        rdev=(rdev[0], rdev[1]) if kind in (CHR, BLK) else (0, 0),  # a field of another kind is ignored
        xattrs=xattrs,
    )
    return ManifestEntry(entry, sha if kind == FILE else "", tuple(chunks))


def decode(data: bytes) -> Manifest:
    """Parse and check an encoded manifest; ValueError names the bad line."""
    lines = data.decode("utf-8", "surrogateescape").splitlines()
    if not lines:
        raise ValueError("empty manifest")
    try:
        header = json.loads(lines[0])
    except ValueError as exc:
        raise ValueError(f"line 1: not JSON: {exc}") from None
    except RecursionError:
        raise ValueError("line 1: not JSON: nested too deeply") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError("line 1: not a slim manifest header")
    if header.get("version") != VERSION:
        raise ValueError(f"manifest version {header.get('version')!r} is not supported (want {VERSION})")
    if header.get("chunk_size") != CHUNK_SIZE:
        raise ValueError(f"manifest chunk size {header.get('chunk_size')!r} is not supported")
    entries = []
    for n, line in enumerate(lines[1:], start=2):
        try:
            entries.append(_entry(json.loads(line)))
        except ValueError as exc:
            raise ValueError(f"line {n}: {exc}") from None
        except RecursionError:
            raise ValueError(f"line {n}: nested too deeply") from None
    if header.get("entries") != len(entries):
        raise ValueError(f"header says {header.get('entries')} entries, found {len(entries)}")
    directory = header.get("directory")
    if not isinstance(directory, str) or not directory.startswith("/"):
        raise ValueError("header 'directory' must be an absolute path")
    return make(directory, entries)
