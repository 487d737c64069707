"""The copy-if-needed manifest: every entry of one EE directory with what it takes
to recreate and to check it.

Standard library only (the agent reads manifests in the initrd).  The store keeps a
manifest compressed with zstd; a release also names the digest of its decompressed
bytes, so that a node can check a copy it kept from its last boot, or one it rebuilt
from a delta (see docs/ee.md, "Copy-if-needed").

**Version 2** (what :func:`encode` writes) is columnar: one JSON object, decoded in one
pass and checked a column at a time::

    {"format": "slim-manifest", "version": 2, "directory": "/etc",
     "entries": N, "files": F, "bytes": B,
     "path": [N paths], "type": "dfl...",          # one letter per entry (see LETTERS)
     "mode": [N], "uid": [N], "gid": [N], "mtime_ns": [N],
     "size": [F], "sha256": [F hex digests],       # one per file, in entry order
     "target": [one per symlink or hard link, in entry order],
     "rdev": [[major, minor], one per device, in entry order],
     "chunks": [[entry index, [hex digests], [sizes]], ...],   # files stored in pieces
     "xattrs": [[entry index, {name: base64 value}], ...]}

Entries come in tree order (see slim.agent.tree), each path once.  A file stored in
pieces (``chunks``) is fetched as those objects, in order; their sizes add up to the
file's.  Files of copy-if-needed directories are store objects named by their
``sha256`` (or by their chunks), so a node fetches only what differs.

**Version 1** (JSON Lines: a header line with ``"chunk_size"``, then one object per
entry with ``path``, ``type``, ``mode``, ``uid``, ``gid``, ``mtime_ns``, files' ``size``,
``sha256`` and ``chunks``, links' ``target``, devices' ``rdev``, ``xattrs``) is what
releases built before version 2 name: it is still read.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable

from slim.agent.tree import BLK, CHR, DIR, FIFO, FILE, HARDLINK, KINDS, SYMLINK, Entry, check_relpath
from slim.agent.value import Value

TYPE_CHECKING = False  # typing is not imported at run time (the agent's start-up: slim.agent)
if TYPE_CHECKING:
    from typing import Any

FORMAT = "slim-manifest"
VERSION = 2
CHUNK_SIZE = 1 << 20  # the pieces of big files (version 1: all but the last this size)
CHUNKED_ABOVE = 4 << 20
LETTERS = {DIR: "d", FILE: "f", SYMLINK: "l", HARDLINK: "h", CHR: "c", BLK: "b", FIFO: "p"}
KIND_OF = {letter: kind for kind, letter in LETTERS.items()}
_HEX = re.compile(r"[0-9a-f]{64}")  # slim.vocabulary.HEX_RE, copied: standard library only here
_HEX_DIGITS = b"0123456789abcdef"
_MAX_INT = 2**63 - 1


class ManifestEntry(Value):
    """One entry of a manifest: the tree entry, and a file's digest (and its pieces')."""

    __slots__ = ("chunk_sizes", "chunks", "entry", "sha256")

    def __init__(
        self,
        entry: Entry,
        sha256: str = "",  # regular files: hex digest of the whole file
        chunks: tuple[str, ...] = (),  # files stored in pieces: hex digests of the pieces, in order
        chunk_sizes: tuple[int, ...] = (),  # ... and their sizes (empty: CHUNK_SIZE each, the last less)
    ) -> None:
        self.entry = entry
        self.sha256 = sha256
        self.chunks = chunks
        self.chunk_sizes = chunk_sizes


def parts(m: ManifestEntry) -> list[tuple[str, int]]:
    """The objects that hold a file's bytes, in order, with their sizes: its chunks, or the
    whole file; none for an entry that is not a file."""
    if m.chunks:
        if m.chunk_sizes:
            return list(zip(m.chunks, m.chunk_sizes, strict=True))
        return [(c, min(CHUNK_SIZE, m.entry.size - i * CHUNK_SIZE)) for i, c in enumerate(m.chunks)]
    return [(m.sha256, m.entry.size)] if m.entry.kind == FILE and m.sha256 else []


class Manifest:
    """A decoded manifest, kept as columns (what the agent compares a tree with, fast);
    :attr:`entries` gives the same as :class:`ManifestEntry` objects, made on first use."""

    __slots__ = (
        "_entries",
        "bytes",
        "chunks",
        "digests",
        "directory",
        "files",
        "gids",
        "kinds",
        "modes",
        "mtimes",
        "paths",
        "rdevs",
        "sizes",
        "targets",
        "uids",
        "xattrs",
    )  # fmt: skip

    def __init__(
        self,
        directory: str,
        paths: list[str],
        kinds: str,
        modes: list[int],
        uids: list[int],
        gids: list[int],
        mtimes: list[int],
        sizes: list[int],  # per entry: 0 but for files
        digests: list[str],  # per entry: "" but for files
        targets: dict[int, str],
        rdevs: dict[int, tuple[int, int]],
        xattrs: dict[int, tuple[tuple[str, bytes], ...]],
        chunks: dict[int, tuple[tuple[str, ...], tuple[int, ...]]],
    ) -> None:
        self.directory = directory
        self.paths, self.kinds, self.modes, self.uids, self.gids = paths, kinds, modes, uids, gids
        self.mtimes, self.sizes, self.digests = mtimes, sizes, digests
        self.targets, self.rdevs, self.xattrs, self.chunks = targets, rdevs, xattrs, chunks
        self.files = len(paths) - kinds.count("d")
        self.bytes = sum(sizes)
        self._entries: tuple[ManifestEntry, ...] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def entry(self, i: int) -> ManifestEntry:
        kind = KIND_OF[self.kinds[i]]
        e = Entry(
            self.paths[i], kind, self.modes[i], self.uids[i], self.gids[i], self.mtimes[i],
            self.sizes[i], self.targets.get(i, ""), self.rdevs.get(i, (0, 0)), self.xattrs.get(i, ()),
        )  # fmt: skip
        hexes, sizes = self.chunks.get(i, ((), ()))
        return ManifestEntry(e, self.digests[i], hexes, sizes)

    @property
    def entries(self) -> tuple[ManifestEntry, ...]:
        if self._entries is None:
            self._entries = tuple(self.entry(i) for i in range(len(self.paths)))
        return self._entries

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Manifest)
            and self.directory == other.directory
            and (self.entries == other.entries)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Manifest({self.directory!r}, {len(self.paths)} entries)"


def make(directory: str, entries: Iterable[ManifestEntry]) -> Manifest:
    items = tuple(entries)
    targets, rdevs, xattrs, chunks = {}, {}, {}, {}
    for i, m in enumerate(items):
        e = m.entry
        if e.kind in (SYMLINK, HARDLINK):
            targets[i] = e.target
        elif e.kind in (CHR, BLK):
            rdevs[i] = e.rdev
        if e.xattrs:
            xattrs[i] = e.xattrs
        if m.chunks:
            chunks[i] = (m.chunks, m.chunk_sizes or tuple(n for _, n in parts(m)))
    out = Manifest(
        directory,
        [m.entry.path for m in items],
        "".join(LETTERS[m.entry.kind] for m in items),
        [m.entry.mode for m in items],
        [m.entry.uid for m in items],
        [m.entry.gid for m in items],
        [m.entry.mtime_ns for m in items],
        [m.entry.size if m.entry.kind == FILE else 0 for m in items],
        [m.sha256 if m.entry.kind == FILE else "" for m in items],
        targets,
        rdevs,
        xattrs,
        chunks,
    )
    if all(not m.chunks or m.chunk_sizes for m in items):
        out._entries = items
    return out


def encode(manifest: Manifest) -> bytes:
    """The manifest in version 2 (deterministic: same manifest, same bytes)."""
    m = manifest
    files = [i for i, k in enumerate(m.kinds) if k == "f"]
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "directory": m.directory,
        "entries": len(m.paths),
        "files": m.files,
        "bytes": m.bytes,
        "path": m.paths,
        "type": m.kinds,
        "mode": m.modes,
        "uid": m.uids,
        "gid": m.gids,
        "mtime_ns": m.mtimes,
        "size": [m.sizes[i] for i in files],
        "sha256": [m.digests[i] for i in files],
        "target": [m.targets[i] for i in sorted(m.targets)],
        "rdev": [list(m.rdevs[i]) for i in sorted(m.rdevs)],
        "chunks": [[i, list(h), list(n)] for i, (h, n) in sorted(m.chunks.items())],
        "xattrs": [[i, {k: base64.b64encode(v).decode() for k, v in m.xattrs[i]}] for i in sorted(m.xattrs)],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def decode(data: bytes, checked: bool = False) -> Manifest:
    """Parse and check an encoded manifest (version 2, or 1); ValueError says what is
    wrong, and where.  ``checked``: these very bytes were decoded and checked before (a
    manifest the agent kept, whose digest is the signed plan's), so the costliest checks
    (every path, every digest) are not made again."""
    first, _, rest = data.partition(b"\n")
    try:
        header = json.loads(first.decode("utf-8", "surrogateescape"))
    except ValueError as exc:
        raise ValueError(f"line 1: not JSON: {exc}") from None
    except RecursionError:
        raise ValueError("line 1: not JSON: nested too deeply") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError("line 1: not a slim manifest header")
    version = header.get("version")
    if version == 2:
        if rest.strip():
            raise ValueError("a version 2 manifest is one line")
        return _decode_v2(header, checked)
    if version == 1:
        return _decode_v1(header, rest)
    raise ValueError(f"manifest version {version!r} is not supported (want 2 or 1)")


# -- version 2 ------------------------------------------------------------------------------


def _column(doc: dict[str, Any], key: str, n: int) -> list[Any]:
    col = doc.get(key)
    if not isinstance(col, list) or len(col) != n:
        raise ValueError(f"{key!r} must be a list of {n} items")
    return col


def _ints(doc: dict[str, Any], key: str, n: int, lo: int, hi: int) -> list[int]:
    col = _column(doc, key, n)
    if col and (not set(map(type, col)) <= {int} or min(col) < lo or max(col) > hi):
        bad = next(i for i, v in enumerate(col) if type(v) is not int or not lo <= v <= hi)
        raise ValueError(f"entry {bad + 1}: {key!r} must be an integer in [{lo}, {hi}]")
    return col


def _strings(doc: dict[str, Any], key: str, n: int) -> list[str]:
    col = _column(doc, key, n)
    if col and not set(map(type, col)) <= {str}:
        raise ValueError(f"{key!r} must be a list of strings")
    return col


def check_paths(paths: list[str]) -> None:
    """Every path safe (slim.agent.tree.check_relpath) and listed once; ValueError names
    the first that is not."""
    joined = "\x00".join(paths)
    # an empty, "." or ".." component, or a leading or trailing "/", shows as one of these
    # once every path is framed by "/" (four times faster than a regular expression)
    framed = "/" + joined.replace("\x00", "/") + "/"
    bad = "//" in framed or "/./" in framed or "/../" in framed
    if bad or joined.count("\x00") != max(len(paths) - 1, 0):
        for p in paths:
            check_relpath(p)
    if len(set(paths)) != len(paths):
        seen: set[str] = set()
        dup = next(p for p in paths if p in seen or seen.add(p))  # type: ignore[func-returns-value]
        raise ValueError(f"{dup!r} is listed twice")


def _decode_v2(doc: dict[str, Any], checked: bool = False) -> Manifest:
    directory = doc.get("directory")
    if not isinstance(directory, str) or not directory.startswith("/"):
        raise ValueError("header 'directory' must be an absolute path")
    n = doc.get("entries")
    if type(n) is not int or n < 0:
        raise ValueError("'entries' must be a count")
    paths = _strings(doc, "path", n)
    if not checked:
        check_paths(paths)
    kinds = doc.get("type")
    if not isinstance(kinds, str) or len(kinds) != n or not set(kinds) <= KIND_OF.keys():
        raise ValueError(f"'type' must be {n} letters of {''.join(KIND_OF)}")
    modes = _ints(doc, "mode", n, 0, 0o7777)
    uids = _ints(doc, "uid", n, 0, 2**32 - 1)
    gids = _ints(doc, "gid", n, 0, 2**32 - 1)
    mtimes = _ints(doc, "mtime_ns", n, -(2**63), _MAX_INT)
    nfiles = kinds.count("f")
    fsizes = _ints(doc, "size", nfiles, 0, _MAX_INT)
    shas = _strings(doc, "sha256", nfiles)
    if shas and not checked and (set(map(len, shas)) != {64} or not _lower_hex("".join(shas))):
        raise ValueError("'sha256' must be 64 lowercase hex digits for every file")
    it_size, it_sha = iter(fsizes), iter(shas)
    sizes = [next(it_size) if k == "f" else 0 for k in kinds]
    digests = [next(it_sha) if k == "f" else "" for k in kinds]
    links = [i for i, k in enumerate(kinds) if k in "lh"]
    targets_in = _strings(doc, "target", len(links))
    if not all(targets_in):
        raise ValueError("'target' must be a non-empty string for every link")
    targets = dict(zip(links, targets_in, strict=True))
    for i in links:
        if kinds[i] == "h":
            try:
                check_relpath(targets[i])
            except ValueError as exc:
                raise ValueError(f"{paths[i]!r}: hard link target: {exc}") from None
    devices = [i for i, k in enumerate(kinds) if k in "cb"]
    rdevs: dict[int, tuple[int, int]] = {}
    for i, rdev in zip(devices, _column(doc, "rdev", len(devices)), strict=True):
        if not (isinstance(rdev, list) and len(rdev) == 2 and all(type(x) is int and x >= 0 for x in rdev)):
            raise ValueError(f"{paths[i]!r}: 'rdev' must be [major, minor]")
        rdevs[i] = (rdev[0], rdev[1])
    chunks: dict[int, tuple[tuple[str, ...], tuple[int, ...]]] = {}
    for item in _list(doc, "chunks"):
        i = _index(item, 3, n, "chunks")
        if kinds[i] != "f":  # they would name objects to fetch (slim.release.manifest_objects)
            raise ValueError(f"{paths[i]!r}: 'chunks' given for a {KIND_OF[kinds[i]]}, not a file")
        hexes, lens = item[1], item[2]
        if not (
            isinstance(hexes, list) and hexes and all(isinstance(h, str) and _HEX.fullmatch(h) for h in hexes)
        ):
            raise ValueError(f"{paths[i]!r}: 'chunks' must be a list of sha256 hex digests")
        if not (
            isinstance(lens, list)
            and len(lens) == len(hexes)
            and all(type(x) is int and x > 0 for x in lens)
            and sum(lens) == sizes[i]
        ):
            raise ValueError(f"{paths[i]!r}: the chunks' sizes must be positive and add up to {sizes[i]}")
        if i in chunks:
            raise ValueError(f"{paths[i]!r}: chunks listed twice")
        chunks[i] = (tuple(hexes), tuple(lens))
    xattrs: dict[int, tuple[tuple[str, bytes], ...]] = {}
    for item in _list(doc, "xattrs"):
        i = _index(item, 2, n, "xattrs")
        if i in xattrs:
            raise ValueError(f"{paths[i]!r}: xattrs listed twice")
        xattrs[i] = _xattrs(item[1])
    return Manifest(
        directory, paths, kinds, modes, uids, gids, mtimes, sizes, digests, targets, rdevs, xattrs, chunks
    )


def _lower_hex(text: str) -> bool:
    """Only the digits 0-9a-f in ``text`` (bytes.translate: five times faster than a regular expression)."""
    try:
        return not text.encode("ascii").translate(None, _HEX_DIGITS)
    except UnicodeEncodeError:
        return False


def _list(doc: dict[str, Any], key: str) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"{key!r} must be a list")
    return value


def _index(item: Any, length: int, n: int, key: str) -> int:
    if not (isinstance(item, list) and len(item) == length and type(item[0]) is int and 0 <= item[0] < n):
        raise ValueError(f"{key!r}: each item must be [entry index, ...] with an index below {n}")
    return item[0]


def _xattrs(value: Any) -> tuple[tuple[str, bytes], ...]:
    if not isinstance(value, dict):
        raise ValueError("'xattrs' must be an object")
    try:
        return tuple(sorted((str(k), base64.b64decode(str(v), validate=True)) for k, v in value.items()))
    except ValueError as exc:
        raise ValueError(f"'xattrs': {exc}") from None


# -- version 1 ------------------------------------------------------------------------------


def _int(rec: dict[str, Any], key: str, lo: int = 0, hi: int = _MAX_INT) -> int:
    value = rec.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{key!r} must be an integer in [{lo}, {hi}]")
    return value


def _entry_v1(rec: Any) -> ManifestEntry:
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
    xattrs = _xattrs(rec.get("xattrs", {}))
    size = _int(rec, "size") if kind == FILE else 0
    if kind == FILE and chunks and len(chunks) != -(-size // CHUNK_SIZE):
        raise ValueError(f"{len(chunks)} chunks do not cover {size} bytes")
    entry = Entry(
        path=path,
        kind=kind,
        mode=_int(rec, "mode", 0, 0o7777),
        uid=_int(rec, "uid", 0, 2**32 - 1),
        gid=_int(rec, "gid", 0, 2**32 - 1),
        mtime_ns=_int(rec, "mtime_ns", -(2**63), _MAX_INT),
        size=size,
        target=target if kind in (SYMLINK, HARDLINK) else "",  # as encode() writes them:
        rdev=(rdev[0], rdev[1]) if kind in (CHR, BLK) else (0, 0),  # a field of another kind is ignored
        xattrs=xattrs,
    )
    sizes = tuple(min(CHUNK_SIZE, size - i * CHUNK_SIZE) for i in range(len(chunks)))
    return ManifestEntry(entry, sha if kind == FILE else "", tuple(chunks), sizes)


def _decode_v1(header: dict[str, Any], rest: bytes) -> Manifest:
    if header.get("chunk_size") != CHUNK_SIZE:
        raise ValueError(f"manifest chunk size {header.get('chunk_size')!r} is not supported")
    entries = []
    for n, line in enumerate(rest.decode("utf-8", "surrogateescape").splitlines(), start=2):
        try:
            entries.append(_entry_v1(json.loads(line)))
        except ValueError as exc:
            raise ValueError(f"line {n}: {exc}") from None
        except RecursionError:
            raise ValueError(f"line {n}: nested too deeply") from None
    if header.get("entries") != len(entries):
        raise ValueError(f"header says {header.get('entries')} entries, found {len(entries)}")
    directory = header.get("directory")
    if not isinstance(directory, str) or not directory.startswith("/"):
        raise ValueError("header 'directory' must be an absolute path")
    manifest = make(directory, entries)
    check_paths(manifest.paths)
    return manifest
