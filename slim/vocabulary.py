"""SLIM's shared units and names: one meaning for every spelling, in every part.

**Sizes** (:func:`parse_size`): a number of bytes, optionally with a unit.

=====================  =============================  ==========================
unit                   means                          examples
=====================  =============================  ==========================
(none), ``B``          bytes                          ``4096``, ``512B``
``K`` ``M`` ``G`` ``T``   powers of 1024 (as tmpfs,      ``512M``, ``20G``, ``1.5t``
                       ``ls -h`` and ``sort -h``)
``KiB`` ... ``TiB``    powers of 1024                 ``15MiB``, ``2GiB``
``KB`` ... ``TB``      powers of 1000                 ``28.5MB``, ``1GB``
=====================  =============================  ==========================

Units are case-insensitive; a fraction is allowed (``1.5G``) and rounded down
to whole bytes.  So ``50GB`` is 50,000,000,000 bytes everywhere, and ``50G``
or ``50GiB`` is 53,687,091,200.

**Rates** (:func:`parse_rate`) are bits per second in tc's spelling (``100Mbit``,
``1Gbit``: powers of 1000); **durations** (:func:`parse_duration`) are seconds,
``ms``, ``s``, ``min`` (or ``m``) or ``h``.

**Names**: MAC addresses (:data:`MAC_RE`, :func:`normalize_mac`,
:func:`names_a_mac`), object digests (:func:`parse_digest`), the per-directory
policies (:class:`Policy`) and relay tiers (:class:`Tier`), and the limits the
core and the relays share.

Domain code: standard library only (the agent keeps its own small copies, see
``agent/plan.py``).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from enum import IntEnum, StrEnum

from slim.errors import InvalidArgument

# -- sizes, rates, durations ----------------------------------------------------------------
SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    **{f"{p}": 1024 ** (i + 1) for i, p in enumerate("kmgt")},
    **{f"{p}ib": 1024 ** (i + 1) for i, p in enumerate("kmgt")},
    **{f"{p}b": 1000 ** (i + 1) for i, p in enumerate("kmgt")},
}
RATE_UNITS: dict[str, int] = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
TIME_UNITS: dict[str, float] = {"ms": 0.001, "s": 1, "min": 60, "m": 60, "h": 3600, "d": 86400}
SIZE_EXAMPLE = "4096, 512M, 20G (powers of 1024), 15MiB, or 28.5MB (powers of 1000)"
MAX_SIZE = 2**63 - 1  # bytes: what a signed 64-bit count holds
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


def _quantity(value: str | float, units: dict[str, float] | dict[str, int], default: str) -> Decimal | None:
    """A number, or a number and one of ``units`` (case-insensitive; ``default`` when
    none), exactly; None if ``value`` is neither."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Decimal(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    names = "|".join(sorted((u for u in units if u), key=len, reverse=True))
    m = re.fullmatch(rf"\s*{_NUMBER}\s*({names})?\s*", value, re.IGNORECASE)
    if not m:
        return None
    return Decimal(m.group(1)) * Decimal(str(units[(m.group(2) or default).lower()]))


def parse_size(value: str | float, what: str = "size") -> int:
    """Bytes from a size in the grammar above (or a number of bytes); zero is allowed,
    fractions of a byte are dropped, and sizes stop at MAX_SIZE (8 EiB)."""
    size = _quantity(value, SIZE_UNITS, "")
    if size is None:
        raise InvalidArgument(f"{what} {value!r} is not a size: write it as {SIZE_EXAMPLE}")
    if size < 0:
        raise InvalidArgument(f"{what} {value!r} must not be negative")
    if size > MAX_SIZE:
        raise InvalidArgument(f"{what} {value!r} is more than {MAX_SIZE} bytes")
    return int(size)


def tmpfs_size(value: str) -> str:
    """A tmpfs ``size=`` option from a size in the grammar above, or a percentage of RAM
    (``50%``): in the kernel's own spelling (``256m``, ``2g``, bytes when no unit of 1024
    divides it), which it reads as powers of 1024."""
    text = value.strip()
    if re.fullmatch(r"\d+%", text):
        return text
    try:
        size = parse_size(text)
    except InvalidArgument:
        raise InvalidArgument(f"{value!r} is not a tmpfs size (e.g. 512M, 2G, 1.5GB or 50%)") from None
    for unit, factor in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def parse_rate(value: str | float, what: str = "rate") -> float:
    """Bits per second from ``100Mbit``, ``1Gbit``, ``3Mbit`` (tc's spelling) or a number."""
    rate = _quantity(value, RATE_UNITS, "bit")
    if rate is None:
        raise InvalidArgument(f"{what} {value!r}: write it as 100Mbit, 1Gbit, 3Mbit (bits per second)")
    if not 0 < rate <= MAX_SIZE * 8:
        raise InvalidArgument(f"{what} {value!r} must be positive")
    return float(rate)


def parse_duration(value: str | float, zero: bool = False, what: str = "duration") -> float:
    """Seconds from ``300``, ``300s``, ``5min``, ``250ms`` (``zero``: 0 is allowed)."""
    seconds = _quantity(value, TIME_UNITS, "s")
    if seconds is None:
        raise InvalidArgument(f"{what} {value!r}: write it as 300, 300s, 5min or 250ms")
    if not (0 < seconds <= MAX_SIZE or (zero and seconds == 0)):
        raise InvalidArgument(f"{what} {value!r} must be {'zero or more' if zero else 'positive'}")
    return float(seconds)


# -- MAC addresses ----------------------------------------------------------------------------
# Six hex pairs, separated all by ':' or all by '-', or not at all (525400abcdef).
MAC_RE = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(?:\1[0-9a-f]{2}){4}$", re.IGNORECASE)


def normalize_mac(value: str) -> str:
    """``52-54-00-AB-CD-EF`` / ``525400abcdef`` → ``52:54:00:ab:cd:ef`` (ValueError otherwise)."""
    v = value.strip().lower()
    if not MAC_RE.fullmatch(v):
        raise ValueError(f"{value!r} is not a MAC address (want six hex pairs like 52:54:00:12:34:56)")
    hexdigits = v.replace(":", "").replace("-", "")
    return ":".join(hexdigits[i : i + 2] for i in range(0, 12, 2))


def names_a_mac(text: str) -> bool:
    """Whether a "node name or MAC" argument is a MAC: one written with ':' or '-'.  A bare
    12-digit hex string is a node name (a node may be named so)."""
    m = MAC_RE.fullmatch(text)
    return m is not None and m.group(1) != ""


# -- names ---------------------------------------------------------------------------------------
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # sites, relays, environments, nodes
HOSTNAME_RE = re.compile(  # a DNS host name (RFC 1123)
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
HEX_RE = re.compile(r"^[0-9a-f]{64}$")  # an object's name: its sha256
BOOT_ID_RE = re.compile(r"[0-9a-f]{1,64}")  # a boot's id (the core's: 16 hex digits); fullmatch

# -- a boot's stages (boot events) -------------------------------------------------
PLAN_STAGE = "plan"  # the agent has its signed plan (and registers the boot's key)
UP_STAGE = "up"  # the running environment reported in (or a lab on its behalf)
SWITCH_ROOT_STAGE = "switch_root"  # the agent exec'd the environment's init
LOCAL_STAGE = "local"  # the boot menu went to the local disk (the node's own OS); a relay saw it
LOADER_STAGES = ("script", "kernel", "initrd", LOCAL_STAGE)  # recorded by relays themselves; and tftp:NAME


def relay_observed(stage: str) -> bool:
    """A stage a relay recorded itself (stage 1, the script, kernel, initrd): an attempt of
    the loader's, which goes on to another try or relay when one fails, so it never decides
    a boot's state."""
    return stage in LOADER_STAGES or stage.startswith("tftp:")


def parse_digest(digest: str) -> str:
    """``sha256:<hex>`` (or bare hex) → hex; anything else is InvalidArgument."""
    hexpart = digest[7:] if digest.startswith("sha256:") else digest
    if not HEX_RE.fullmatch(hexpart):  # match() would take a trailing newline
        raise InvalidArgument(f"{digest!r} is not a sha256 digest (want sha256:<64 lowercase hex>)")
    return hexpart


class Policy(StrEnum):
    """How one directory of an environment reaches the node (paper sections 4.3-4.4)."""

    RAM = "ram"  # full copy into a tmpfs
    DISK = "disk"  # full copy onto the node's partition
    SYNC = "sync"  # copy-if-needed against a manifest, onto the node's partition
    NFS = "nfs"  # read-only NFSv4 over TCP

    @property
    def needs_disk(self) -> bool:
        return self in (Policy.DISK, Policy.SYNC)


class Tier(IntEnum):
    """Where a relay stands for a node: at its site, the site relays' parent, elsewhere."""

    SITE = 1
    PARENT = 2
    OTHER = 3

    @property
    def label(self) -> str:
        return self.name.lower()


# -- limits the core and the relays share ------------------------------------------------------------
MAX_TIMESTAMP_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, the last protobuf Timestamp
MAX_EVENT_TEXT = 1024  # characters of a boot event's stage, message, ... that a relay accepts
MAX_STAGE_SECONDS = 7 * 86400.0  # the longest a boot stage may say it took
MAX_STORED_TEXT = 4096  # characters of any text the core stores (longer is cut)
MAX_MANIFEST_BYTES = 512 * 1024 * 1024  # a manifest, decompressed
