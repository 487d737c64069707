"""The core's signing key: Ed25519 signatures of boot plans (and, later, releases).

The cryptography is the ``cryptography`` package's (OpenSSL); nothing here is more than
key files and the signify wire format around it.  Signatures and public keys are written as
OpenBSD signify writes them, so that a node's initrd verifies them with Debian's
``signify-openbsd`` (a 190 KB binary, no Python cryptography in the initrd):

- public key: ``untrusted comment: …`` then base64 of ``b"Ed"`` + 8-byte key number + 32-byte key;
- signature: ``untrusted comment: …`` then base64 of ``b"Ed"`` + the key number + 64 bytes.

The key number is the first 8 bytes of the public key's SHA-256, so it needs no state of its
own.  The key lives in a directory (``STATE_DIR/keys`` by default): ``signing.key`` (PKCS#8
PEM, mode 0600) and ``signing.pub``; it is created on first use (the core's start, or a
build) when missing.  Back the directory up: a new key means every node's initrd must be
rebuilt before it trusts the plans again.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from slim.errors import FailedPrecondition, InvalidArgument

KEY_FILE = "signing.key"
PUBLIC_FILE = "signing.pub"
ALGORITHM = b"Ed"
COMMENT = "untrusted comment: "


def _keynum(raw_public: bytes) -> bytes:
    return hashlib.sha256(raw_public).digest()[:8]


def _unarmor(text: str, what: str, size: int) -> bytes:
    """The bytes of a signify file: a comment line, then one line of base64."""
    lines = text.splitlines()
    if len(lines) < 2 or not lines[0].startswith(COMMENT):
        raise InvalidArgument(
            f"{what} is not in signify's format (an 'untrusted comment:' line, then base64)"
        )
    try:
        raw = base64.b64decode(lines[1].strip(), validate=True)
    except binascii.Error:
        raise InvalidArgument(f"{what}: its second line is not base64") from None
    if len(raw) != size or raw[:2] != ALGORITHM:
        raise InvalidArgument(f"{what} is not an Ed25519 signify {('key', 'signature')[size == 74]}")
    return raw


@dataclass(frozen=True)
class PublicKey:
    """A public key that signatures are checked against."""

    raw: bytes  # 32 bytes

    @property
    def keynum(self) -> bytes:
        return _keynum(self.raw)

    @property
    def id(self) -> str:
        """The key number in hex: how docs, logs and ``slim keys`` name a key."""
        return self.keynum.hex()

    def text(self, comment: str = "slim signing key") -> str:
        """The key as a signify public key file."""
        body = base64.b64encode(ALGORITHM + self.keynum + self.raw).decode()
        return f"{COMMENT}{comment} {self.id}\n{body}\n"

    @classmethod
    def from_text(cls, text: str, what: str = "public key") -> PublicKey:
        raw = _unarmor(text, what, 42)
        key = cls(raw[10:])
        if raw[2:10] != key.keynum:
            raise InvalidArgument(f"{what}: its key number does not match its key")
        return key

    def verifies(self, data: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            return False
        return True


class SigningKey:
    """The core's private key (see the module's docstring)."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = PublicKey(
            private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, directory: Path) -> SigningKey:
        """The key in ``directory``, made (with its public key file) if it has none."""
        directory = Path(directory)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise FailedPrecondition(f"cannot make the key directory {directory}: {exc.strerror}") from None
        lock = directory / ".lock"
        with open(lock, "a") as held:  # the core and a build may both start at once
            fcntl.flock(held, fcntl.LOCK_EX)
            path = directory / KEY_FILE
            if not path.exists():
                key = cls.generate()
                key.save(directory)
                return key
            return cls.load(path)

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise FailedPrecondition(f"cannot read the signing key {path}: {exc.strerror}") from None
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise FailedPrecondition(f"{path} is not a usable signing key: {exc}") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise FailedPrecondition(f"{path} is not an Ed25519 key")
        return cls(private)

    def save(self, directory: Path) -> None:
        """Write ``signing.key`` (0600) and ``signing.pub`` into ``directory``, atomically."""
        pem = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write(directory / KEY_FILE, pem, 0o600)
        _write(directory / PUBLIC_FILE, self.public.text().encode(), 0o644)

    def sign(self, data: bytes, comment: str = "signature from slim signing key") -> str:
        """``data``'s signature, as a signify signature file."""
        sig = self._private.sign(data)
        body = base64.b64encode(ALGORITHM + self.public.keynum + sig).decode()
        return f"{COMMENT}{comment} {self.public.id}\n{body}\n"


def verify(data: bytes, signature: str, trusted: Iterable[PublicKey], what: str = "document") -> PublicKey:
    """The trusted key that signed ``data``; FailedPrecondition saying why if none did."""
    raw = _unarmor(signature, f"the signature of the {what}", 74)
    keys = {k.keynum: k for k in trusted}
    key = keys.get(raw[2:10])
    if key is None:
        known = ", ".join(k.id for k in keys.values()) or "none"
        raise FailedPrecondition(
            f"the {what} is signed by key {raw[2:10].hex()}, which is not trusted (trusted: {known})"
        )
    if not key.verifies(data, raw[10:]):
        raise FailedPrecondition(f"the {what}'s signature by key {key.id} does not match its bytes")
    return key


def read_public_keys(paths: Iterable[Path]) -> list[PublicKey]:
    """The public keys in these files (signify format); a file that cannot be read, or is
    not a key, is a clear error."""
    keys = []
    for path in paths:
        try:
            keys.append(PublicKey.from_text(Path(path).read_text(), str(path)))
        except OSError as exc:
            raise FailedPrecondition(f"cannot read the public key {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise InvalidArgument(f"{path} is not a signify public key") from None
    return keys


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
