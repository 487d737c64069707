"""The initrd's decompression-only zstd (core/build/unzstd.c, slim.core.build.unzstd):
the same bytes as Debian's zstd for what the agent gives it — SLIM's archives, zstd's own
frames, several frames, deltas made with --patch-from — the input's digest checked with
--sha256, and a clear error, never a crash, for anything else: damaged or cut input, input
that is not the one --sha256 names, options it does not take, random bytes."""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import subprocess
import threading
from functools import cache
from pathlib import Path
from typing import IO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slim.core.build import unzstd
from slim.core.build.copyset import compressor
from slim.core.build.image import default_cache_dir
from tests.support import need, need_tool


@cache
def tool() -> Path:
    need(shutil.which("gcc") is not None, "gcc (./run installs it)")
    return unzstd.build(default_cache_dir())


def run(data: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(tool()), *args], input=data, capture_output=True, timeout=60, check=False)


def debian(data: bytes, *args: str) -> bytes:
    zstd = need_tool("zstd")
    return subprocess.run([zstd, *args], input=data, capture_output=True, timeout=60, check=True).stdout


def sample(size: int, seed: int) -> bytes:
    """Half text-like (compressible), half random."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 9)).hex().encode() for _ in range(300)]
    text = b" ".join(rng.choice(words) for _ in range(size // 12))[: size // 2]
    return text + rng.randbytes(size - len(text))


def slim_archive(data: bytes) -> bytes:
    """Compressed as SLIM's copy sets are (slim.core.build.copyset.compressor: checksum, threads)."""
    out = io.BytesIO()
    with compressor(3).stream_writer(out, closefd=False) as w:
        w.write(data)
    return out.getvalue()


@pytest.mark.parametrize("size", [0, 1, 100_000, 3_000_000])
def test_it_gives_what_debians_zstd_gives(size: int) -> None:
    data = sample(size, size)
    inputs = {
        "SLIM's archive": slim_archive(data),
        "zstd -19": debian(data, "-19", "-c", "-q"),
        "zstd -1 --no-check": debian(data, "-1", "--no-check", "-c", "-q"),
        "two frames": slim_archive(data) + debian(data[::-1], "-3", "-c", "-q"),
    }
    for name, packed in inputs.items():
        got = run(packed, "-dcq")
        assert got.returncode == 0 and got.stderr == b"", (name, got.stderr)
        assert got.stdout == debian(packed, "-dcq"), name


def test_a_delta_is_applied_to_its_reference(tmp_path: Path) -> None:
    """What slim.agent.sync runs to rebuild a manifest from its delta (core/build/deltas.py)."""
    old = sample(2_000_000, 1)
    new = old[:700_000] + b"changed" * 1000 + old[700_500:]
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    delta = debian(b"", "-3", "-c", "-q", f"--patch-from={tmp_path / 'old'}", str(tmp_path / "new"))
    assert len(delta) < 50_000
    got = run(delta, "-dcq", f"--patch-from={tmp_path / 'old'}")
    assert got.returncode == 0 and got.stdout == new, got.stderr
    (tmp_path / "other").write_bytes(sample(2_000_000, 2))  # the wrong reference: refused
    wrong = run(delta, "-dcq", f"--patch-from={tmp_path / 'other'}")
    assert wrong.returncode == 1 and wrong.stdout != new
    missing = run(delta, "-dcq", f"--patch-from={tmp_path / 'gone'}")
    assert missing.returncode == 1 and b"gone: No such file or directory" in missing.stderr
    directory = run(delta, "-dcq", f"--patch-from={tmp_path}")
    assert directory.returncode == 1 and b": not a regular file" in directory.stderr


def test_a_delta_against_a_big_reference_gets_the_window_it_needs(tmp_path: Path) -> None:
    """A reference of 140 MB: zstd makes a frame with a 256 MiB window, more than the
    128 MiB allowed otherwise, which --patch-from allows (twice the reference)."""
    old = random.Random(9).randbytes(140_000_000)
    new = old[:1000] + b"new" + old[1000:]
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    delta = debian(b"", "-3", "-c", "-q", f"--patch-from={tmp_path / 'old'}", str(tmp_path / "new"))
    got = run(delta, "-dcq", f"--patch-from={tmp_path / 'old'}")
    assert got.returncode == 0 and got.stdout == new, got.stderr
    (tmp_path / "small").write_bytes(old[:1000])  # the same frame against a small reference
    assert run(delta, "-dcq", f"--patch-from={tmp_path / 'small'}").returncode == 1


def test_damaged_or_cut_input_is_an_error() -> None:
    packed = bytearray(slim_archive(sample(500_000, 3)))
    cut = run(bytes(packed[: len(packed) // 2]), "-dcq")
    assert cut.returncode == 1 and b"zstd: standard input: truncated" in cut.stderr, cut.stderr
    packed[len(packed) // 2] ^= 0x55
    damaged = run(bytes(packed), "-dcq")
    assert damaged.returncode == 1 and damaged.stderr.startswith(b"zstd: standard input: "), damaged.stderr
    assert run(b"not zstd at all", "-dcq").returncode == 1
    empty = run(b"", "-dcq")
    assert empty.returncode == 1 and b"no zstd frame" in empty.stderr


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_with_sha256_the_input_must_be_the_one_it_names() -> None:
    """What the agent runs to unpack an archive as it arrives (slim.agent.ee.extract): the
    same output, and exit 2 naming the digest when the input is another's, read to its end
    whether or not it could be decoded (a damaged download is told as such)."""
    data = sample(3_000_000, 5)
    packed = slim_archive(data)
    right = run(packed, "-dcq", f"--sha256={sha256(packed)}")
    assert right.returncode == 0 and right.stdout == data and right.stderr == b""
    other = slim_archive(data[::-1])
    wrong = run(other, "-dcq", f"--sha256={sha256(packed)}")
    assert wrong.returncode == 2, wrong.stderr
    assert (
        wrong.stderr
        == f"zstd: standard input: its sha256 is {sha256(other)}, not the one --sha256 names\n".encode()
    )
    damaged = bytearray(packed)
    damaged[100] ^= 0x55  # early: undecodable long before the end
    told = run(bytes(damaged), "-dcq", f"--sha256={sha256(packed)}")
    assert told.returncode == 2 and f"its sha256 is {sha256(bytes(damaged))}".encode() in told.stderr
    # its own digest: the bytes are the ones named, and they do not decode
    named = run(bytes(damaged), "-dcq", f"--sha256={sha256(bytes(damaged))}")
    assert named.returncode == 1 and named.stderr.startswith(b"zstd: standard input: "), named.stderr
    cut = packed[: len(packed) // 2]
    assert run(cut, "-dcq", f"--sha256={sha256(packed)}").returncode == 2
    assert run(cut, "-dcq", f"--sha256={sha256(cut)}").returncode == 1
    assert run(b"", "-dcq", f"--sha256={sha256(packed)}").returncode == 2


def _write_all(into: IO[bytes], data: bytes) -> None:
    into.write(data)  # all of it is read (else this write would fail)
    into.close()


def test_with_sha256_a_closed_output_stops_the_decoding_not_the_hashing() -> None:
    """The agent closes zstd's output when it stops unpacking (a member refused): zstd
    decodes no more, reads the rest, and tells by its exit status whether the input was
    the one named (3) or not (2).  The input here would decode to 256 MiB."""
    packed = slim_archive(sample(100_000, 6)) + debian(bytes(256 << 20), "-3", "-c", "-q")
    for digest, code in ((sha256(packed), 3), (sha256(packed + b"x"), 2)):
        proc = subprocess.Popen(
            [str(tool()), "-dcq", f"--sha256={digest}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
        feeder = threading.Thread(target=_write_all, args=(proc.stdin, packed))
        feeder.start()
        assert proc.stdout.read(1000)  # it has begun
        proc.stdout.close()
        feeder.join(timeout=60)
        said = proc.stderr.read()
        proc.stderr.close()
        assert proc.wait(timeout=60) == code, said
        assert said.startswith(
            b"zstd: standard output: closed before the end"
            if code == 3
            else b"zstd: standard input: its sha256 is "
        )


def test_a_frame_that_asks_for_more_than_128_mib_of_window_is_refused() -> None:
    """As Debian's zstd without --long: a frame's window is memory the node must give."""
    big_window = debian(b"x" * 1000, "--zstd=wlog=29", "-c", "-q", "--no-content-size")
    refused = run(big_window, "-dcq")
    assert refused.returncode == 1 and b"zstd: standard input: " in refused.stderr, refused.stderr
    assert subprocess.run([need_tool("zstd"), "-dcq"], input=big_window, capture_output=True).returncode != 0
    fits = debian(b"x" * 1000, "--zstd=wlog=27", "-c", "-q", "--no-content-size")
    assert run(fits, "-dcq").stdout == b"x" * 1000


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ((), b"zstd: no -d: this zstd only decompresses"),
        (("-c",), b"zstd: no -d: this zstd only decompresses"),
        (("-z",), b"-z: unknown option"),
        (("-dcq", "file.zst"), b"file.zst: unknown argument"),
        (("-d", "--long=31"), b"--long=31: unknown argument"),
        (("-d", "--patch-from="), b"--patch-from=: unknown argument"),
        (("-d", "--sha256="), b"--sha256=: not 64 lowercase hex digits"),
        (("-d", "--sha256=" + "A" * 64), b": not 64 lowercase hex digits"),
        (("-d", "--sha256=" + "0" * 63), b": not 64 lowercase hex digits"),
        (("-d", "--sha256=" + "0" * 63 + "g"), b": not 64 lowercase hex digits"),
    ],
)
def test_options_it_does_not_take_are_refused_by_name(args: tuple[str, ...], says: bytes) -> None:
    got = run(slim_archive(b"x"), *args)
    assert got.returncode == 1 and got.stdout == b"" and says in got.stderr, got.stderr


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096), st.integers(min_value=0, max_value=3))
def test_random_input_never_crashes_it(junk: bytes, where: int) -> None:
    """Bytes made up, or a real frame with made-up bytes in it: 0 or 1, never a signal."""
    if where:
        frame = bytearray(slim_archive(sample(20_000, where)))
        at = len(frame) * where // 4
        frame[at : at + len(junk)] = junk
        junk = bytes(frame)
    got = run(junk, "-dcq")
    assert got.returncode in (0, 1), (got.returncode, got.stderr)
    assert got.returncode == 0 or got.stderr.startswith(b"zstd: ")
    checked = run(junk, "-dcq", f"--sha256={sha256(junk[::-1] + b'x')}")  # never its digest
    assert checked.returncode == 2 and checked.stderr.startswith(b"zstd: standard input: its sha256 is ")


def test_it_is_built_once_per_source_and_library(tmp_path: Path) -> None:
    first = unzstd.build(tmp_path)
    assert unzstd.build(tmp_path) == first and first.read_bytes() == tool().read_bytes()
    assert os.access(first, os.X_OK)
