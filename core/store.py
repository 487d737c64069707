"""The content-addressed artifact store: objects, NFS trees, and each environment's
current release (the document's model: :mod:`slim.release`).

Layout (under the store directory)::

    objects/sha256/<hex>          immutable objects, named by their SHA-256
    trees/sha256/<hex>            read-only directory trees for NFS export, named by
                                  the digest of their manifest
    refs/environments/<name>      "sha256:<hex>" of the environment's current release
    refs/history/<name>           every release the ref has pointed at, oldest first, one
                                  "sha256:<hex> <UTC time>" line each (append-only; read
                                  by ``slim store gc`` to keep the previous releases)
    lock                          held shared by builds, exclusively by ``slim store gc``

A release is a small JSON document (itself an object) listing the digests of
everything a node needs for one environment: kernel, initrd and, per
directory, the copy-set archive and copy-if-needed manifest.  The only
mutable thing is a ref; relays can cache objects forever.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from pydantic import ValidationError

from slim.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from slim.files import atomic_write
from slim.release import ObjectRef, Release
from slim.signing import SigningKey
from slim.vocabulary import HEX_RE, NAME_RE, parse_digest

# A ref whose inode changed less than this long ago is re-read on every look-up: file
# timestamps can be coarse (one tick, or a second) and every ref has the same size, so
# a rewrite within one tick would otherwise look unchanged.
RACY_REF_NS = 2_000_000_000
DIGEST_IN_TEXT = re.compile(r"sha256:[0-9a-f]{64}")
COPY_CHUNK = 1 << 20
LOCK_POLL = 0.1  # seconds between tries of a store lock held by someone else


class Store:
    """Reads (and, for builders, writes) the content-addressed store."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects" / "sha256"
        self.refs = self.root / "refs" / "environments"
        self.trees = self.root / "trees" / "sha256"
        self.history = self.root / "refs" / "history"
        self.lock_path = self.root / "lock"
        self._lock = threading.Lock()
        self._ref_cache: dict[str, tuple[tuple[int, int, int, int], str, str]] = {}
        self._release_cache: dict[str, Release] = {}

    def object_path(self, digest: str) -> Path:
        return self.objects / parse_digest(digest)

    def tree_path(self, manifest_digest: str) -> Path:
        """The read-only tree (for NFS export) whose manifest has ``manifest_digest``."""
        return self.trees / parse_digest(manifest_digest)

    def has(self, digest: str) -> bool:
        return (self.objects / parse_digest(digest)).is_file()

    def count_objects(self) -> int:
        """How many objects the store holds (temporary files not counted)."""
        try:
            return sum(1 for name in os.listdir(self.objects) if HEX_RE.fullmatch(name))
        except FileNotFoundError:
            return 0

    @contextmanager
    def writer(self) -> Iterator[ObjectWriter]:
        """A new object written as a stream: hashed as it is written into a temporary
        file beside the objects, published under its digest when the block ends
        (discarded if that object already exists, or if the block raises)."""
        self.objects.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.objects, prefix=".new.")
        w = ObjectWriter(os.fdopen(fd, "wb"))
        try:
            yield w
            w.file.flush()
            os.fsync(w.file.fileno())
            w.file.close()
            hexdigest = w.hash.hexdigest()
            target = self.objects / hexdigest
            w.ref = ObjectRef(digest=f"sha256:{hexdigest}", size=w.size)
            if target.exists():
                w.created = False
            else:
                os.chmod(tmp, 0o444)
                os.replace(tmp, target)
                w.created = True
        finally:
            if not w.file.closed:
                w.file.close()
            Path(tmp).unlink(missing_ok=True)

    def put_file(self, path: str | Path, expect: str | None = None) -> tuple[ObjectRef, bool]:
        """Store a file's bytes (streamed); returns (ref, whether it was new).  With
        ``expect`` (a digest) an existing object is taken without reading the file,
        and a file whose bytes differ from ``expect`` is refused."""
        if expect is not None and self.has(expect):
            return ObjectRef(digest=expect, size=(self.objects / parse_digest(expect)).stat().st_size), False
        with self.writer() as w, open(path, "rb") as f:
            while chunk := f.read(COPY_CHUNK):
                w.write(chunk)
        assert w.ref is not None
        if expect is not None and w.ref.digest != expect:
            raise FailedPrecondition(f"{path} changed while it was being stored (rebuild)")
        return w.ref, w.created

    def put_bytes(self, data: bytes) -> ObjectRef:
        """Store ``data`` atomically (temporary file, fsync, rename); idempotent."""
        hexdigest = hashlib.sha256(data).hexdigest()
        target = self.objects / hexdigest
        if not target.exists():
            self.objects.mkdir(parents=True, exist_ok=True)
            atomic_write(target, data)
        return ObjectRef(digest=f"sha256:{hexdigest}", size=len(data))

    def read_object(self, digest: str) -> bytes:
        """An object's bytes, verified against its digest."""
        hexdigest = parse_digest(digest)
        try:
            data = (self.objects / hexdigest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"object sha256:{hexdigest} is not in the store {self.root}") from None
        if hashlib.sha256(data).hexdigest() != hexdigest:
            raise FailedPrecondition(f"object sha256:{hexdigest} in {self.root} is corrupt")
        return data

    def verify_object(self, digest: str) -> int:
        """Re-hash one object (streamed); its size, or NotFound / FailedPrecondition."""
        hexdigest = parse_digest(digest)
        h = hashlib.sha256()
        size = 0
        try:
            with open(self.objects / hexdigest, "rb") as f:
                while chunk := f.read(COPY_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise NotFound(f"object sha256:{hexdigest} is not in the store {self.root}") from None
        if h.hexdigest() != hexdigest:
            raise FailedPrecondition(f"object sha256:{hexdigest} in {self.root} is corrupt")
        return size

    def publish_release(self, release: Release, signer: SigningKey | None = None) -> str:
        """Store the release document and point the environment's ref at it; with ``signer``
        the ref also holds the core's signature of the document (relays pin and warm only
        releases whose signature they can check)."""
        if not NAME_RE.match(release.environment):
            raise InvalidArgument(f"{release.environment!r} is not an environment name")
        doc = json.dumps(release.model_dump(mode="json", by_alias=True), sort_keys=True, indent=1).encode()
        ref = self.put_bytes(doc)
        self.refs.mkdir(parents=True, exist_ok=True)
        self._record(release.environment, ref.digest)
        signature = signer.sign(doc, f"release {ref.digest[7:19]} of {release.environment}") if signer else ""
        atomic_write(self.refs / release.environment, (ref.digest + "\n" + signature).encode())
        return ref.digest

    def sign_release(self, environment: str, signer: SigningKey) -> str:
        """Sign the environment's current release again (a key rotation): the same document,
        byte for byte, and its ref's signature replaced; the digest is returned.  The caller
        keeps other publishers out meanwhile (``slim keys rotate`` holds the key directory,
        which builds hold too)."""
        digest = self.release_digest(environment)
        if digest is None:
            raise NotFound(f"environment {environment!r} has never been built (slim ee build {environment})")
        doc = self.read_object(digest)
        signature = signer.sign(doc, f"release {digest[7:19]} of {environment}")
        atomic_write(self.refs / environment, (digest + "\n" + signature).encode())
        return digest

    def _record(self, environment: str, digest: str) -> None:
        """Append ``digest`` to the environment's release history if the ref changes (a
        store from before the history first records the release it points at)."""
        current = self.release_digest(environment)
        if current == digest:
            return
        self.history.mkdir(parents=True, exist_ok=True)
        path = self.history / environment
        lines = [] if current is None or path.exists() else [current]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        text = "".join(f"{d} {now}\n" for d in [*lines, digest])
        # one write of a few short lines with O_APPEND: concurrent publishers never interleave
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if end and os.pread(fd, 1, end - 1) != b"\n":
                text = "\n" + text  # a torn line before (a crash mid-append) is closed first
            os.write(fd, text.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def environments(self) -> list[str]:
        """The environments that have a ref (a current release), sorted."""
        try:
            names = os.listdir(self.refs)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if NAME_RE.match(n) and (self.refs / n).is_file())

    def release_history(self, environment: str) -> list[str]:
        """Every release digest the environment's ref has pointed at, oldest first (empty
        for a store from before the history); malformed lines are skipped."""
        if not NAME_RE.match(environment):
            raise InvalidArgument(f"{environment!r} is not an environment name")
        try:
            text = (self.history / environment).read_text(encoding="ascii", errors="replace")
        except FileNotFoundError:
            return []
        # every digest, wherever it is on a line: a torn append (a crash mid-write) may have
        # left a line without its end, which the next record then shares
        return DIGEST_IN_TEXT.findall(text)

    def kept_releases(self, environment: str, previous: int) -> list[str]:
        """The environment's current release and the ``previous`` distinct releases its ref
        pointed at before it, newest first (only the current one without a history)."""
        if previous < 0:
            raise InvalidArgument(
                f"the number of previous releases to keep must be 0 or more, not {previous}"
            )
        current = self.release_digest(environment)
        if current is None:
            return []
        kept = [current]
        history = self.release_history(environment)
        if current in history:  # what follows it was appended but never made current (a crash)
            history = history[: len(history) - history[::-1].index(current)]
        for digest in reversed(history):
            if len(kept) > previous:
                break
            if digest not in kept:
                kept.append(digest)
        return kept

    def read_release(self, digest: str, of: str = "") -> Release:
        """A release document by its digest (cached), checked; ``of`` completes the error
        message (" of environment 'x'")."""
        with self._lock:
            cached = self._release_cache.get(digest)
        if cached is None:
            try:
                cached = Release.model_validate_json(self.read_object(digest))
            except ValidationError as exc:
                raise FailedPrecondition(
                    f"release {digest}{of} is not a valid release document: {exc.errors()[0]['msg']}"
                ) from None
            with self._lock:
                self._release_cache[digest] = cached
        return cached

    @contextmanager
    def locked(self, *, exclusive: bool, wait: float | None = None) -> Iterator[None]:
        """Hold the store's lock: shared by builds (many at once), exclusive for garbage
        collection.  ``wait``: give up after that many seconds with :class:`Unavailable`
        (None: wait as long as it takes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            deadline = None if wait is None else time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        what = (
                            "a build (slim ee build)" if exclusive else "garbage collection (slim store gc)"
                        )
                        raise Unavailable(
                            f"the store {self.root} is in use by {what}: its lock {self.lock_path} "
                            f"was still held after {wait:g} s"
                        ) from None
                    time.sleep(LOCK_POLL)
            yield
        finally:
            os.close(fd)

    def release_digest(self, environment: str) -> str | None:
        """The digest of the environment's current release, or None if never built."""
        found = self._ref(environment)
        return found[0] if found is not None else None

    def release_signature(self, environment: str) -> str:
        """The core's signature of the environment's current release document ("" if it has
        none: built without the key, or never built)."""
        found = self._ref(environment)
        return found[1] if found is not None else ""

    def _ref(self, environment: str) -> tuple[str, str] | None:
        """(digest, signature) of the environment's ref: its first line, then a signify
        signature if the build signed it."""
        if not NAME_RE.match(environment):
            raise InvalidArgument(f"{environment!r} is not an environment name")
        path = self.refs / environment
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            cached = self._ref_cache.get(environment)
        if cached and cached[0] == key:
            return cached[1], cached[2]
        first, _, signature = path.read_text(encoding="ascii", errors="replace").partition("\n")
        digest = f"sha256:{parse_digest(first.strip())}"
        if _now_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_REF_NS:
            with self._lock:
                self._ref_cache[environment] = (key, digest, signature)
        return digest, signature

    def release(self, environment: str) -> tuple[str, Release] | None:
        """The environment's current release (digest, document), or None if never built."""
        digest = self.release_digest(environment)
        if digest is None:
            return None
        return digest, self.read_release(digest, f" of environment {environment!r}")


class ObjectWriter:
    """The file-like end of :meth:`Store.writer`."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.hash = hashlib.sha256()
        self.size = 0
        self.ref: ObjectRef | None = None  # set when the block ends
        self.created = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.hash.update(data)
        self.file.write(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _now_ns() -> int:
    return time.time_ns()
