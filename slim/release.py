"""The release document and the manifests it names: the contract between the core, which
builds and publishes them, and the relays, which warm and pin what they name.

A release is a small JSON document (itself a content-addressed object) listing the
digests of everything a node needs for one environment: kernel, initrd and, per
directory, the copy-set archive and the copy-if-needed manifest.  A manifest (format:
:mod:`slim.agent.manifest`) is stored compressed with zstd; :func:`decode_manifest` is
the one decoder outside the agent (the agent, standard library only, runs ``zstd -d``
in the initrd and calls :func:`slim.agent.manifest.decode` itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import zstandard
from pydantic import BaseModel, ConfigDict, Field, model_validator

from slim.agent import manifest as mf
from slim.errors import InvalidArgument
from slim.vocabulary import MAX_MANIFEST_BYTES, Policy

MANIFEST_LEVEL = 19  # zstd level of stored manifests: small, and written once
MAX_PARTS = 1024  # parts of one archive, at most (slim.agent.plan's limit: a copy)


class ObjectRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    size: int = Field(ge=0)


class ManifestDelta(BaseModel):
    """A directory's manifest rebuilt from an earlier one that a node kept: ``zstd -d
    --patch-from=BASE`` of ``delta`` gives the new manifest's bytes (checked against
    ``manifest_raw``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    base: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")  # the earlier manifest, decompressed
    delta: ObjectRef


class ReleaseDirectory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    policy: Policy
    archive: ObjectRef | None = None
    manifest: ObjectRef | None = None
    # "sha256:<hex>" of the manifest decompressed: what a node checks a kept or rebuilt copy by
    manifest_raw: str = Field("", pattern=r"^(sha256:[0-9a-f]{64})?$")
    # sync: the manifest as deltas from the previous releases' (newest first)
    deltas: tuple[ManifestDelta, ...] = ()
    bytes: int = Field(0, ge=0)
    files: int = Field(0, ge=0)
    # the archive's parts, in order: zstd frames of whole tar members that an agent may fetch
    # (by Range) and unpack side by side, each checked by its own digest
    # (slim.core.build.copyset.PART_BYTES); none: one stream (a release from before)
    parts: tuple[ObjectRef, ...] = Field((), max_length=MAX_PARTS)

    @model_validator(mode="after")
    def _parts_are_the_archive(self) -> ReleaseDirectory:
        if self.parts and (self.archive is None or sum(p.size for p in self.parts) != self.archive.size):
            raise ValueError("the parts of an archive must add up to its size")
        return self


class Release(BaseModel):
    """What ``slim ee build`` publishes for one environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = Field(1, alias="schema")
    environment: str
    kernel: ObjectRef
    initrd: ObjectRef
    directories: dict[str, ReleaseDirectory] = Field(default_factory=dict)
    kernel_release: str = ""
    created: str = ""

    def objects(self) -> list[ObjectRef]:
        """The objects the document names directly: kernel, initrd, then each directory's
        archive, manifest and manifest deltas (the files a ``sync`` manifest names:
        :func:`manifest_objects`)."""
        refs = [self.kernel, self.initrd]
        for d in self.directories.values():
            refs.extend(part for part in (d.archive, d.manifest) if part is not None)
            refs.extend(delta.delta for delta in d.deltas)
        return refs

    def sync_manifests(self) -> list[ObjectRef]:
        """The manifests of ``sync`` directories: their files are objects too."""
        return [
            d.manifest
            for d in self.directories.values()
            if d.policy is Policy.SYNC and d.manifest is not None
        ]


def encode_manifest(manifest: mf.Manifest) -> bytes:
    """A manifest as the store keeps it: compressed with zstd."""
    return compress_manifest(mf.encode(manifest))


def compress_manifest(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=MANIFEST_LEVEL).compress(raw)


def decompress_manifest(data: bytes) -> bytes:
    """A stored manifest's bytes (at most MAX_MANIFEST_BYTES); InvalidArgument if it is not
    zstd or too big."""
    try:
        # decompress() allocates what the frame header says, whatever max_output_size says
        declared = zstandard.frame_content_size(data)
        if declared > MAX_MANIFEST_BYTES:
            raise InvalidArgument(
                f"not a manifest: it says it has {declared} bytes (at most {MAX_MANIFEST_BYTES})"
            )
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_MANIFEST_BYTES)
    except zstandard.ZstdError as exc:
        raise InvalidArgument(f"not a manifest: {exc}") from None


def decode_manifest(data: bytes) -> mf.Manifest:
    """A stored manifest (zstd, at most MAX_MANIFEST_BYTES decompressed), checked;
    InvalidArgument says what is wrong."""
    raw = decompress_manifest(data)
    try:
        return mf.decode(raw)
    except ValueError as exc:
        raise InvalidArgument(f"not a manifest: {exc}") from None


@dataclass(frozen=True)
class Named:
    """One object a manifest names: a file's (or a chunk's) digest and size."""

    hex: str
    size: int


def manifest_objects(manifest: mf.Manifest) -> list[Named]:
    """The file objects (or, for big files, the chunks) of a ``sync`` manifest, each once,
    in manifest order."""
    seen: set[str] = set()
    out = []
    for m in manifest.entries:
        for hexdigest, size in mf.parts(m):
            if hexdigest not in seen:
                seen.add(hexdigest)
                out.append(Named(hexdigest, size))
    return out
