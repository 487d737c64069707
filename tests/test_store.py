"""slim.core.store: the content-addressed object store and release refs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import slim.core.store as store_module
from slim.core.store import Store
from slim.errors import FailedPrecondition, InvalidArgument, NotFound
from slim.release import ObjectRef, Release, ReleaseDirectory
from slim.vocabulary import Policy, parse_digest

HEX = hashlib.sha256(b"x").hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def files_under(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


def make_release(store: Store, environment: str, version: str = "1") -> Release:
    kernel = store.put_bytes(f"kernel {environment} {version}".encode())
    initrd = store.put_bytes(f"initrd {environment} {version}".encode())
    archive = store.put_bytes(f"archive {environment} {version}".encode())
    return Release(
        environment=environment,
        kernel=kernel,
        initrd=initrd,
        directories={
            "/tmp": ReleaseDirectory(policy=Policy.RAM, archive=archive, bytes=123, files=4),
            "/usr": ReleaseDirectory(policy=Policy.NFS),
        },
        created=f"2024-01-0{version}T00:00:00Z",
    )


def far_future() -> int:
    return 2**62


# -- digests -------------------------------------------------------------------------


@pytest.mark.parametrize("digest", [f"sha256:{HEX}", HEX])
def test_parse_digest_accepts(digest: str) -> None:
    assert parse_digest(digest) == HEX


@pytest.mark.parametrize(
    "digest",
    [
        f"sha256:{HEX.upper()}",
        HEX.upper(),
        f"SHA256:{HEX}",
        f"sha256:{HEX[:-1]}",
        HEX[:10],
        f"sha256:{HEX}0",
        f"sha256:{HEX[:-1]}g",
        "z" * 64,
        f"md5:{hashlib.md5(b'x').hexdigest()}",  # noqa: S324 - a digest we must reject
        f"sha512:{hashlib.sha512(b'x').hexdigest()}",
        f"sha256:{HEX}\n",
        f" {HEX}",
        "sha256:",
        "",
        f"sha256:sha256:{HEX}",
    ],
)
def test_parse_digest_rejects(digest: str) -> None:
    with pytest.raises(InvalidArgument, match="not a sha256 digest"):
        parse_digest(digest)


# -- objects -------------------------------------------------------------------------


def test_put_bytes_is_content_addressed_and_idempotent(store: Store) -> None:
    data = b"\x00kernel image\xff" * 1000
    hexdigest = hashlib.sha256(data).hexdigest()
    first = store.put_bytes(data)
    assert first == ObjectRef(digest=f"sha256:{hexdigest}", size=len(data))
    path = store.object_path(first.digest)
    assert path == store.objects / hexdigest
    assert path.read_bytes() == data

    assert store.put_bytes(data) == first
    store.put_bytes(b"")
    assert sorted(p.name for p in store.objects.iterdir()) == sorted(
        [hexdigest, hashlib.sha256(b"").hexdigest()]
    )  # no temporary files left behind
    assert store.read_object(first.digest) == data
    assert store.read_object(hexdigest) == data


def test_put_bytes_failure_leaves_nothing(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        store.put_bytes(b"half written")
    assert list(store.objects.iterdir()) == []


def test_read_object_verifies_content(store: Store) -> None:
    ref = store.put_bytes(b"original bytes")
    path = store.object_path(ref.digest)
    path.write_bytes(b"original bytez")  # same size, different content
    with pytest.raises(FailedPrecondition, match="corrupt"):
        store.read_object(ref.digest)


def test_read_object_missing_and_malformed(store: Store) -> None:
    with pytest.raises(NotFound, match=f"sha256:{HEX}"):
        store.read_object(f"sha256:{HEX}")
    with pytest.raises(InvalidArgument):
        store.read_object("sha256:../../etc/passwd")
    with pytest.raises(InvalidArgument):
        store.object_path("../../etc/passwd")


# -- releases ------------------------------------------------------------------------


def test_publish_and_read_release(store: Store) -> None:
    rel = make_release(store, "jdk14")
    digest = store.publish_release(rel)
    assert parse_digest(digest)
    assert (store.refs / "jdk14").read_text() == digest + "\n"
    assert store.release_digest("jdk14") == digest
    assert store.release("jdk14") == (digest, rel)
    doc = json.loads(store.read_object(digest))
    assert doc["schema"] == 1
    assert doc["environment"] == "jdk14"
    # publishing the same document again is a no-op for the digest
    assert store.publish_release(rel) == digest
    # a second Store (another process) reads the same
    assert Store(store.root).release("jdk14") == (digest, rel)


def test_unbuilt_environment_has_no_release(store: Store) -> None:
    assert store.release_digest("base") is None
    assert store.release("base") is None
    store.publish_release(make_release(store, "jdk14"))
    assert store.release_digest("base") is None
    assert store.release("base") is None


def test_new_release_is_observed(store: Store) -> None:
    reader = Store(store.root)
    old = make_release(store, "base", "1")
    old_digest = store.publish_release(old)
    assert reader.release("base") == (old_digest, old)
    new = make_release(store, "base", "2")
    new_digest = store.publish_release(new)
    assert new_digest != old_digest
    assert reader.release_digest("base") == new_digest
    assert reader.release("base") == (new_digest, new)


def test_rewrite_within_one_timestamp_tick_is_observed(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ref is 72 bytes; a filesystem with coarse timestamps gives a quick rewrite
    the same mtime.  Simulate that by setting the old mtime on the new ref."""
    monkeypatch.setattr(store_module, "_now_ns", far_future)  # every ref is old enough to cache
    reader = Store(store.root)
    ref = store.refs / "base"
    old_digest = store.publish_release(make_release(store, "base", "1"))
    assert reader.release_digest("base") == old_digest
    before = ref.stat()
    new_digest = store.publish_release(make_release(store, "base", "2"))
    os.utime(ref, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = ref.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert reader.release_digest("base") == new_digest


def test_ref_cache(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unchanged old ref is read once; a ref written just now is re-read every time."""
    digest = store.publish_release(make_release(store, "base"))
    reads: list[Path] = []
    read_text = Path.read_text

    def counting_read_text(self: Path, encoding: str | None = None, errors: str | None = None) -> str:
        reads.append(self)
        return read_text(self, encoding=encoding, errors=errors)

    monkeypatch.setattr(Path, "read_text", counting_read_text)
    reader = Store(store.root)
    assert reader.release_digest("base") == digest
    assert reader.release_digest("base") == digest
    assert len(reads) == 2  # written less than RACY_REF_NS ago: could change within its tick

    monkeypatch.setattr(store_module, "_now_ns", far_future)
    reads.clear()
    for _ in range(3):
        assert reader.release_digest("base") == digest
    assert len(reads) == 1


def test_ref_to_a_non_release_object(store: Store) -> None:
    store.refs.mkdir(parents=True)
    for data in (b'{"hello": "world"}', b"not json at all", b'{"schema": 1, "environment": "base"}'):
        ref = store.put_bytes(data)
        (store.refs / "base").write_text(ref.digest + "\n")
        with pytest.raises(FailedPrecondition, match="not a valid release document"):
            Store(store.root).release("base")


def test_ref_to_a_missing_object(store: Store) -> None:
    store.refs.mkdir(parents=True)
    (store.refs / "base").write_text(f"sha256:{HEX}\n")
    assert store.release_digest("base") == f"sha256:{HEX}"
    with pytest.raises(NotFound):
        store.release("base")


@pytest.mark.parametrize("garbage", [b"hello\n", b"", b"\xff\xfe" * 36, f"md5:{HEX[:32]}\n".encode()])
def test_garbage_ref_is_invalid(store: Store, garbage: bytes) -> None:
    store.refs.mkdir(parents=True)
    (store.refs / "base").write_bytes(garbage)
    with pytest.raises(InvalidArgument):
        store.release_digest("base")
    with pytest.raises(InvalidArgument):
        store.release("base")


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "/abs", "", ".hidden", "x" * 64, "bad name"])
def test_publish_invalid_environment_name(tmp_path: Path, store: Store, name: str) -> None:
    before = files_under(tmp_path)
    with pytest.raises(InvalidArgument, match="not an environment name"):
        store.publish_release(
            Release(
                environment=name,
                kernel=ObjectRef(digest=f"sha256:{HEX}", size=1),
                initrd=ObjectRef(digest=f"sha256:{HEX}", size=1),
            )
        )
    assert files_under(tmp_path) == before
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden"])
def test_release_lookup_refuses_names_that_are_not_environment_names(tmp_path: Path, name: str) -> None:
    (tmp_path / "x").write_text("sha256:" + "0" * 64 + "\n")  # a file a traversal would reach
    store = Store(tmp_path / "store")
    with pytest.raises(InvalidArgument):
        store.release_digest(name)
