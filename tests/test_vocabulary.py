"""slim.vocabulary: one meaning for every spelling of a size, a rate, a duration, a MAC."""

from __future__ import annotations

import pytest

from slim.errors import InvalidArgument
from slim.vocabulary import (
    MAC_RE,
    Policy,
    Tier,
    names_a_mac,
    normalize_mac,
    parse_digest,
    parse_size,
    tmpfs_size,
)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("512B", 512),
        ("512M", 512 << 20),
        ("20G", 20 << 30),
        ("20g", 20 << 30),
        ("2T", 2 << 40),
        ("1.5G", 3 << 29),
        ("15MiB", 15 << 20),
        ("2 GiB", 2 << 30),
        ("28.5MB", 28_500_000),
        ("50GB", 50_000_000_000),
        ("1kb", 1000),
        ("1KiB", 1024),
        ("0", 0),
        (123, 123),
    ],
)
def test_one_size_grammar(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1G", "1X", "G", "1.2.3M", "1 G B", ""])
def test_what_is_not_a_size_says_how_to_write_one(text: str) -> None:
    with pytest.raises(InvalidArgument, match="write it as 4096, 512M, 20G"):
        parse_size(text)


def test_sizes_are_exact_and_bounded() -> None:
    assert parse_size("9007199254740993") == 9007199254740993  # beyond a float's 53 bits
    assert parse_size(" 2 G ") == 2 << 30 and parse_size("0.5K") == 512 and parse_size("1.5") == 1
    for huge in ("99999999999999999999999T", 10**30):
        with pytest.raises(InvalidArgument, match="is more than 9223372036854775807 bytes"):
            parse_size(huge)
    with pytest.raises(InvalidArgument, match="is not a size"):
        parse_size(float("nan"))


def test_tmpfs_sizes_in_the_kernels_spelling() -> None:
    assert tmpfs_size("256m") == "256m" and tmpfs_size("2G") == "2g" and tmpfs_size("512KiB") == "512k"
    assert tmpfs_size("50%") == "50%"
    assert tmpfs_size("1GB") == "1000000000"  # powers of 1000: bytes, which tmpfs reads as such
    with pytest.raises(InvalidArgument, match="'lots' is not a tmpfs size"):
        tmpfs_size("lots")


def test_one_mac_pattern() -> None:
    for mac in ("52:54:00:ab:cd:ef", "52-54-00-AB-CD-EF", "525400abcdef"):
        assert MAC_RE.fullmatch(mac) and normalize_mac(mac) == "52:54:00:ab:cd:ef"
    for bad in ("52:54:00-ab:cd:ef", "52:54:00:ab:cd", "52:54:00:ab:cd:eg"):
        assert not MAC_RE.fullmatch(bad)
        with pytest.raises(ValueError, match="not a MAC address"):
            normalize_mac(bad)
    # a node argument is a MAC when written with separators; bare hex may be a node's name
    assert names_a_mac("52:54:00:AB:CD:EF") and names_a_mac("52-54-00-ab-cd-ef")
    assert not names_a_mac("525400abcdef") and not names_a_mac("n001")


def test_names() -> None:
    assert parse_digest("sha256:" + "a" * 64) == "a" * 64
    with pytest.raises(InvalidArgument, match="not a sha256 digest"):
        parse_digest("sha256:" + "a" * 63 + "\n")
    assert [str(p) for p in Policy] == ["ram", "disk", "sync", "nfs"]
    assert [t.label for t in Tier] == ["site", "parent", "other"]
