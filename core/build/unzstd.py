"""The initrd's ``zstd``: decompression only (``unzstd.c`` beside this file).

The agent runs ``zstd -dcq --sha256=HEX`` to unpack copy sets (it checks the archive's
digest as it reads it, with Nettle's SHA-256, in its own process: Python's own SHA-256
was the biggest part of a cold copy, docs/benchmarks/, P4) and ``zstd -dcq
--patch-from=FILE`` to rebuild a manifest from its delta; nothing in the initrd compresses.  Debian's ``zstd``
is the whole tool, with the compressor and ``liblzma`` and ``liblz4`` (0.6 MB of the
compressed initrd).  :func:`build` compiles ``unzstd.c``, a front end to libzstd's
streaming decompressor, and links it with Debian's static ``libzstd.a`` (package
``libzstd-dev``), which brings only the decompressor: about 0.5 MB less
(docs/benchmarks/, initrd size), and ``libnettle.a`` (``nettle-dev``) for SHA-256.
It takes exactly the options the agent uses and refuses the rest, naming them.

Needs on the build host: ``gcc``, ``libzstd-dev`` and ``nettle-dev``; the result is cached in SLIM's
cache under a key of its inputs.  Without them :func:`build` raises
:class:`~slim.errors.FailedPrecondition` saying what is missing, and the initrd takes
Debian's ``zstd`` (agentrt says so).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from slim.core.build.smallpython import cached, keep, run, static_library, tool

SOURCE = Path(__file__).with_name("unzstd.c")


def build(cache: Path) -> Path:
    """The decompression-only ``zstd``, compiled (or taken from ``cache``)."""
    gcc = tool("gcc", "gcc")
    libraries = [
        static_library(gcc, "libzstd.a", "libzstd-dev"),
        static_library(gcc, "libnettle.a", "nettle-dev"),
    ]
    flags = ["-O2", "-s", "-Wall", "-fstack-protector-strong", "-D_FORTIFY_SOURCE=2"]
    key = hashlib.sha256(SOURCE.read_bytes())
    for library in libraries:
        with open(library, "rb") as f:
            key.update(hashlib.file_digest(f, "sha256").digest())
    key.update(json.dumps([flags, run([gcc, "--version"])]).encode())
    out = cache / "unzstd" / key.hexdigest()[:32] / "zstd"
    if cached(out):
        return out
    out.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent.parent, prefix=".build.") as tmp:
        built = Path(tmp) / "zstd"
        run([gcc, *flags, "-o", str(built), str(SOURCE), *map(str, libraries)])
        return keep(built, out)
