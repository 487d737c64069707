"""The core's signing key: Ed25519 signatures of boot plans and release documents.

The cryptography is the ``cryptography`` package's (OpenSSL); nothing here is more than
key files and the signify wire format around it.  Signatures and public keys are written as
OpenBSD signify writes them, so that a node's initrd verifies them with Debian's
``signify-openbsd`` (a 190 KB binary, no Python cryptography in the initrd):

- public key: ``untrusted comment: …`` then base64 of ``b"Ed"`` + 8-byte key number + 32-byte key;
- signature: ``untrusted comment: …`` then base64 of ``b"Ed"`` + the key number + 64 bytes.

The key number is the first 8 bytes of the public key's SHA-256, so it needs no state of its
own.  The key lives in a directory (``STATE_DIR/keys`` by default, :class:`KeyDirectory`):

- ``signing.key`` (PKCS#8 PEM, mode 0600): the key that signs, made on first use (the core's
  start, or a build) when missing;
- ``signing.pub``: its public half;
- ``previous.pub``, only while a rotation is under way (``slim keys rotate``): the public
  key being rotated out, still trusted — its private half is gone, nothing signs with it;
- ``endorsements.json``: for every rotation, the new public key signed by the key it replaced
  (the chain from the first key to the current one).  Boot media carry the key of the day they
  were made and follow this chain (:func:`follow`), so a rotation needs no new medium; a key
  that leaked can thus endorse an attacker's, for media made before the leak (re-issue them).

The public keys to trust are ``signing.pub`` and, during a rotation, ``previous.pub``: a build
puts them into every initrd, and a relay given the directory (``--trust DIR``) trusts every
``.pub`` file in it, reading it again when it changes (:class:`TrustedKeys`).  The core signs
with whatever ``signing.key`` holds now (:class:`ReloadingSigner`).  Back up ``signing.key``:
a new key means every node's initrd must be rebuilt before it trusts the plans again.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from slim.errors import FailedPrecondition, InvalidArgument, SlimError
from slim.files import write_atomically

KEY_FILE = "signing.key"
PUBLIC_FILE = "signing.pub"
PREVIOUS_FILE = "previous.pub"  # during a rotation: the key being rotated out, still trusted
ENDORSEMENTS_FILE = "endorsements.json"  # each rotation's new key, signed by the key it replaced
MAX_ENDORSEMENTS = 256  # rotations a chain may hold (a medium follows at most this many)
LOCK_FILE = ".lock"
ALGORITHM = b"Ed"
COMMENT = "untrusted comment: "

log = logging.getLogger(__name__)


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
        return KeyDirectory(directory).load_or_create()

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
        """Write ``signing.pub`` then ``signing.key`` (0600) into ``directory``, each atomically:
        the private key, written last, is what makes the new key the one that signs."""
        pem = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomically(Path(directory) / PUBLIC_FILE, self.public.text().encode(), 0o644)
        write_atomically(Path(directory) / KEY_FILE, pem, 0o600)

    def sign(self, data: bytes, comment: str = "signature from slim signing key") -> str:
        """``data``'s signature, as a signify signature file."""
        sig = self._private.sign(data)
        body = base64.b64encode(ALGORITHM + self.public.keynum + sig).decode()
        return f"{COMMENT}{comment} {self.public.id}\n{body}\n"

    def endorsements(self) -> list[Endorsement]:
        """A key alone has no chain of rotations (a :class:`ReloadingSigner` reads its directory's)."""
        return []


class Signer(Protocol):
    """What signs plans: a :class:`SigningKey`, or the core's :class:`ReloadingSigner`."""

    @property
    def public(self) -> PublicKey: ...

    def sign(self, data: bytes, comment: str = ...) -> str: ...

    def endorsements(self) -> list[Endorsement]: ...


class KeyDirectory:
    """The core's key directory (see the module's docstring): the key that signs, and the
    public keys to trust.  Its methods take no lock; :meth:`held` does, for a step that
    must see the directory unchanged from start to end (a rotation, a build)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextmanager
    def held(self, exclusive: bool = True) -> Iterator[KeyDirectory]:
        """The directory (made if missing, mode 0700), locked: exclusively for a step that
        changes it (a rotation), shared for one that relies on it (a build)."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise FailedPrecondition(f"cannot make the key directory {self.path}: {exc.strerror}") from None
        with open(self.path / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield self

    def load_or_create(self) -> SigningKey:
        """The key that signs, made (with ``signing.pub``) if there is none.  ``signing.pub``
        is written again if it does not match (a step interrupted between the two files)."""
        try:
            key = self.signer()
            if self._public_file_matches(key):
                return key  # the usual case: no lock, the files are replaced atomically
        except FailedPrecondition:
            if (self.path / KEY_FILE).exists():
                raise  # there is a key, and it is unusable: say so, never replace it
        with self.held():  # the core and a build may both start at once
            if not (self.path / KEY_FILE).exists():
                key = SigningKey.generate()
                key.save(self.path)
                return key
            key = self.signer()
            if not self._public_file_matches(key):
                write_atomically(self.path / PUBLIC_FILE, key.public.text().encode(), 0o644)
            return key

    def _public_file_matches(self, key: SigningKey) -> bool:
        try:
            return PublicKey.from_text((self.path / PUBLIC_FILE).read_text()) == key.public
        except (OSError, UnicodeDecodeError, InvalidArgument):
            return False

    def signer(self) -> SigningKey:
        """The key that signs (FailedPrecondition if there is none)."""
        return SigningKey.load(self.path / KEY_FILE)

    def previous(self) -> PublicKey | None:
        """The key being rotated out (still trusted), or None when no rotation is under way."""
        path = self.path / PREVIOUS_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FailedPrecondition(f"cannot read the public key {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise InvalidArgument(f"{path} is not a signify public key") from None
        key = PublicKey.from_text(text, str(path))
        # the same key as the signer's: a rotation stopped before its new key was written
        return None if key == self.signer().public else key

    def trusted(self) -> list[PublicKey]:
        """The public keys to trust: the signer's first, then, during a rotation, the previous."""
        previous = self.previous()
        return [self.signer().public, *([previous] if previous else [])]

    def public_keys(self) -> list[PublicKey]:
        """The same keys as :meth:`trusted`, from the public files alone: what a boot medium is
        built with, where the private key need not be (or be read)."""
        found: list[PublicKey] = []
        for name in (PUBLIC_FILE, PREVIOUS_FILE):
            path = self.path / name
            try:
                text = path.read_text()
            except FileNotFoundError:
                if name == PUBLIC_FILE:
                    raise FailedPrecondition(f"no {path}: not the core's key directory") from None
                continue
            except OSError as exc:
                raise FailedPrecondition(f"cannot read the public key {path}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise InvalidArgument(f"{path} is not a signify public key") from None
            key = PublicKey.from_text(text, str(path))
            if key not in found:  # previous.pub the same as signing.pub: a rotation stopped early
                found.append(key)
        return found

    def not_rotating(self) -> SigningKey:
        """The key that signs, when no rotation is under way (FailedPrecondition if one is)."""
        current = self.signer()
        under_way = self.previous()
        if under_way is not None:
            raise FailedPrecondition(
                f"a key rotation is under way (from key {under_way.id} to {current.public.id}): "
                "finish it first with: slim keys rotate --finish"
            )
        return current

    def rotating(self) -> PublicKey:
        """The key being rotated out (FailedPrecondition if no rotation is under way)."""
        previous = self.previous()
        if previous is None:
            raise FailedPrecondition(
                "no key rotation is under way (slim keys show); begin one with: slim keys rotate"
            )
        return previous

    def begin_rotation(self, new: SigningKey) -> PublicKey:
        """Make ``new`` the key that signs, keeping the current one's public half trusted
        (``previous.pub``); its private half is gone.  The current public key is returned.
        The old key endorses the new one first (``endorsements.json``: boot media follow it).
        Hold the directory (:meth:`held`) around this and what depends on it."""
        old = self.not_rotating()
        chain = self.endorsements()
        if len(chain) >= MAX_ENDORSEMENTS:
            raise FailedPrecondition(f"{MAX_ENDORSEMENTS} rotations: boot media follow no longer a chain")
        text = new.public.text("slim signing key")
        signed = Endorsement(text, old.sign(text.encode(), f"endorses slim signing key {new.public.id}"))
        records = [{"key": e.key, "signature": e.signature} for e in [*chain, signed]]
        write_atomically(
            self.path / ENDORSEMENTS_FILE, (json.dumps(records, indent=1) + "\n").encode(), 0o644
        )
        # the public files first: whoever reads the directory meanwhile trusts both keys
        # before anything is signed with the new one (written last, signing.key)
        write_atomically(
            self.path / PREVIOUS_FILE, old.public.text("slim signing key, previous").encode(), 0o644
        )
        new.save(self.path)
        return old.public

    def endorsements(self) -> list[Endorsement]:
        """The chain of rotations, oldest first ([] before the first)."""
        path = self.path / ENDORSEMENTS_FILE
        try:
            records = json.loads(path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise FailedPrecondition(f"cannot read the key endorsements {path}: {exc}") from None
        if not isinstance(records, list) or not all(
            isinstance(r, dict) and isinstance(r.get("key"), str) and isinstance(r.get("signature"), str)
            for r in records
        ):
            raise FailedPrecondition(f"{path} is not a list of {{key, signature}}")
        return [Endorsement(r["key"], r["signature"]) for r in records]

    def finish_rotation(self) -> PublicKey:
        """Stop trusting the key rotated out (``previous.pub`` goes); it is returned."""
        previous = self.rotating()
        (self.path / PREVIOUS_FILE).unlink()
        return previous


@dataclass(frozen=True)
class Endorsement:
    """A public key (signify's text) and an older key's signature of exactly that text."""

    key: str
    signature: str


def follow(trusted: Iterable[PublicKey], chain: Iterable[Endorsement]) -> list[PublicKey]:
    """``trusted`` and every key of ``chain`` (in order) that a key trusted by then endorsed."""
    keys = list(trusted)
    for e in chain:
        try:
            verify(e.key.encode(), e.signature, keys, "key endorsement")
            key = PublicKey.from_text(e.key, "an endorsed key")
        except SlimError:
            continue  # signed by a key not trusted here (an older link of the chain), or malformed
        if key not in keys:
            keys.append(key)
    return keys


def _stamp(path: Path) -> tuple[int, ...]:
    """What changes when ``path`` is replaced or written (OSError if it is missing)."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ReloadingSigner:
    """The key directory's key that signs, as it is now: ``signing.key`` is read again when
    it changes (``slim keys rotate`` replaced it), found by one stat per signature, so the
    core signs with the new key from the next plan on, without a restart or a signal.  A
    file that cannot be read or is not a key is logged once, and the key held is kept."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._path = self.directory / KEY_FILE
        self._lock = threading.Lock()
        self._key = KeyDirectory(self.directory).load_or_create()
        self._stamp = _stamp(self._path)
        # a rotation writes the chain before the new key: both are read when the key changes
        self._chain = KeyDirectory(self.directory).endorsements()

    def current(self) -> SigningKey:
        try:
            stamp = _stamp(self._path)
        except OSError:
            stamp = ()  # gone: keep signing with the key held (logged once, below)
        if stamp == self._stamp:
            return self._key
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    key = SigningKey.load(self._path)
                except SlimError as exc:
                    log.error("still signing with key %s: %s", self._key.public.id, exc.message)
                    return self._key
                try:
                    self._chain = KeyDirectory(self.directory).endorsements()
                except SlimError as exc:
                    log.error("key endorsements kept as they were: %s", exc.message)
                if key.public != self._key.public:
                    log.info(
                        "signing key %s replaced by key %s (%s)",
                        self._key.public.id,
                        key.public.id,
                        self._path,
                    )
                self._key = key
            return self._key

    @property
    def public(self) -> PublicKey:
        return self.current().public

    def endorsements(self) -> list[Endorsement]:
        """The directory's chain of rotations, as of the key that signs now (read with it)."""
        self.current()
        return list(self._chain)

    def sign(self, data: bytes, comment: str = "signature from slim signing key") -> str:
        return self.current().sign(data, comment)


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
    """The public keys in these files (signify format) and directories (every ``.pub`` file
    in it, ``signing.pub`` first: a key directory gives its signer's key, then the previous
    one during a rotation), each key once.  A file that cannot be read, or is not a key, is
    a clear error; a directory may hold none."""
    keys: dict[bytes, PublicKey] = {}
    for path in map(Path, paths):
        files = _public_files(path) if path.is_dir() else [path]
        for file in files:
            try:
                key = PublicKey.from_text(file.read_text(), str(file))
            except OSError as exc:
                raise FailedPrecondition(f"cannot read the public key {file}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise InvalidArgument(f"{file} is not a signify public key") from None
            keys.setdefault(key.keynum, key)
    return list(keys.values())


def _public_files(directory: Path) -> list[Path]:
    try:
        files = sorted(p for p in directory.iterdir() if p.suffix == ".pub" and not p.name.startswith("."))
    except OSError as exc:
        raise FailedPrecondition(f"cannot list the key directory {directory}: {exc.strerror}") from None
    return sorted(files, key=lambda p: p.name != PUBLIC_FILE)  # stable: signing.pub, then by name


class TrustedKeys:
    """The public keys in these files and directories (:func:`read_public_keys`), read again
    whenever one of them changes: a relay given the core's key directory trusts both keys
    during a rotation, and only the new one after it, without a restart.  Reading them
    at first raises on a bad file; a bad file later is logged, and the keys held are kept."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self._keys = read_public_keys(self.paths)

    def _stamps(self) -> tuple[tuple[object, ...], ...]:
        out: list[tuple[object, ...]] = []
        for path in self.paths:
            try:
                files = [path, *_public_files(path)] if path.is_dir() else [path]
                out.extend((str(f), *_stamp(f)) for f in files)
            except (OSError, SlimError):
                out.append((str(path),))  # missing for now: read_public_keys says why
        return tuple(out)

    def current(self) -> list[PublicKey]:
        """The keys, as the files are now (a few stats; read again only when they changed)."""
        stamp = self._stamps()
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    keys = read_public_keys(self.paths)
                except SlimError as exc:
                    log.error(
                        "still trusting keys %s: %s",
                        ", ".join(k.id for k in self._keys) or "none",
                        exc.message,
                    )
                    return list(self._keys)
                if keys != self._keys:
                    log.info("trusted keys now: %s", ", ".join(k.id for k in keys) or "none")
                self._keys = keys
            return list(self._keys)
