"""SLIM's certificate authority: who may call the core, and who the core is.

The cryptography is the ``cryptography`` package's (OpenSSL) and TLS is gRPC's and
OpenSSL's; nothing here is more than certificate files around them.

* **The CA** lives in a directory (``STATE_DIR/ca`` by default, made by ``slim ca init`` or
  on the core's first start): ``ca.key`` (mode 0600, in a 0700 directory), ``ca.crt`` (what
  relays, tools and nodes check the core and relays against) and ``issued.json``, the record
  of every certificate it issued — name, role, serial, expiry, and when it was revoked.
* **Identities** are a directory of three PEM files: ``key.pem`` (0600), ``cert.pem`` and
  ``ca.pem``.  ``slim relay enroll NAME`` and ``slim admin enroll NAME`` write one; a relay
  takes its with ``--identity DIR``, a tool with ``--identity DIR`` or ``$SLIM_IDENTITY``.
* **Roles**: a certificate's subject says its role in ``OU`` (``relay``, ``admin`` or
  ``core``) and its name in ``CN``.  The core takes a relay's name from its certificate,
  never from what the relay says.  A relay's certificate is also its TLS server
  certificate (for nodes and child relays over HTTPS): it has both extended key usages.
* **The core's name** is :data:`CORE_NAME` (a DNS name in its certificate); clients check
  that name whatever address they dial, so a core reached by IP or any host name verifies
  without listing them all.  No other role's certificate carries it.
* **Revocation**: ``slim relay revoke NAME`` (``slim ca revoke``) marks every certificate of
  that name revoked in ``issued.json``; the core re-reads the file when it changes and
  refuses a revoked (or unrecorded) certificate within a second (:data:`REFRESH_SECONDS`).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from slim.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from slim.files import write_atomically

Role = Literal["relay", "admin", "core"]
ROLES: tuple[Role, ...] = ("relay", "admin", "core")
CORE_NAME = "slim-core"  # the DNS name in the core's certificate that every client checks
CA_KEY, CA_CERT, ISSUED = "ca.key", "ca.crt", "issued.json"
KEY_PEM, CERT_PEM, CA_PEM = "key.pem", "cert.pem", "ca.pem"
CA_DAYS = 3650
DEFAULT_DAYS = 365
RENEW_DAYS = 30  # the core renews its own certificate when fewer days remain
REFRESH_SECONDS = 1.0  # how often the core looks for a changed issued.json (a revocation)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _check_name(name: str, role: Role) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"{role} name {name!r}: use letters, digits, '.', '_' and '-' (at most 63, starting "
            "with a letter or digit)"
        )
    if name == CORE_NAME and role != "core":
        raise InvalidArgument(f"{name!r} is the core's own name; pick another")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Issued:
    """One certificate the CA issued, as ``issued.json`` records it."""

    serial: str  # hex
    name: str
    role: Role
    not_after: float  # Unix time
    revoked_at: float | None = None


@dataclass(frozen=True)
class Identity:
    """Who a certificate says its holder is."""

    name: str
    role: Role
    serial: str  # hex

    @property
    def principal(self) -> str:
        """How logs and "set by" name the holder: ``admin:alice``, ``relay:edge1``."""
        return f"{self.role}:{self.name}"


def identity_of(cert: x509.Certificate) -> Identity:
    """The name, role and serial of a SLIM certificate (no chain check: TLS did that)."""
    try:  # the subject is parsed when first read (a malformed one: ValueError, found by fuzzing)
        subject = cert.subject
        names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        units = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    except (ValueError, TypeError) as exc:  # cryptography's two ways of saying "malformed"
        raise InvalidArgument(f"the certificate's subject cannot be read: {exc}") from None
    if len(names) != 1 or len(units) != 1 or units[0].value not in ROLES:
        raise InvalidArgument("the certificate is not one SLIM's CA issues (no CN and OU role)")
    role: Role = units[0].value
    return Identity(name=str(names[0].value), role=role, serial=format(cert.serial_number, "x"))


def identity_of_pem(pem: bytes) -> Identity:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion: found by fuzzing
        raise InvalidArgument(f"not a PEM certificate: {exc}") from None
    return identity_of(cert)


class CertificateAuthority:
    """The CA in ``directory``; see the module's docstring."""

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.directory = directory
        self._key = key
        self.cert = cert

    # -- making and opening ------------------------------------------------------------------
    @classmethod
    def init(cls, directory: Path, common_name: str = "SLIM CA") -> CertificateAuthority:
        """Make a new CA in ``directory``; refuse if one is there."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _locked(directory):
            if (directory / CA_KEY).exists():
                raise AlreadyExists(f"{directory} already holds a CA ({CA_KEY}); it was left as it is")
            return cls._make(directory, common_name)

    @classmethod
    def _make(cls, directory: Path, common_name: str) -> CertificateAuthority:
        directory.chmod(0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SLIM"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_atomically(directory / CA_KEY, _pem_key(key), 0o600)
        write_atomically(directory / CA_CERT, _pem_cert(cert), 0o644)
        if not (directory / ISSUED).exists():
            write_atomically(directory / ISSUED, b"[]\n", 0o644)
        return cls(directory, key, cert)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """The CA in ``directory``; a clear error if there is none."""
        key_path = directory / CA_KEY
        if not key_path.exists():
            raise NotFound(f"no CA in {directory} (no {CA_KEY}): make one with `slim ca init`")
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(f"the CA in {directory} cannot be read: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FailedPrecondition(f"{key_path} is not an EC private key")
        return cls(directory, key, cert)

    @classmethod
    def load_or_create(cls, directory: Path) -> CertificateAuthority:
        """The CA in ``directory``, made there first if missing (as the core does on its first start)."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _locked(directory):
            if not (directory / CA_KEY).exists():
                return cls._make(directory, "SLIM CA")
        return cls.load(directory)

    @property
    def cert_pem(self) -> bytes:
        return _pem_cert(self.cert)

    # -- issuing -----------------------------------------------------------------------------
    def issue(
        self, name: str, role: Role, *, days: int = DEFAULT_DAYS, dns_names: tuple[str, ...] = ()
    ) -> tuple[bytes, bytes]:
        """A new key and certificate for ``name`` in ``role`` (PEM key, PEM certificate),
        recorded in ``issued.json``."""
        _check_name(name, role)
        if not 1 <= days <= CA_DAYS:
            raise InvalidArgument(f"days {days}: give 1 to {CA_DAYS}")
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if role == "admin" else []
        if role in ("relay", "core"):
            usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        sans: list[x509.GeneralName] = []
        for dns in (CORE_NAME, *dns_names) if role == "core" else dns_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(dns)))
            except ValueError:
                sans.append(x509.DNSName(dns))
        if role == "relay":
            sans.append(x509.DNSName(f"{name}.relay.slim"))
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SLIM"),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                        x509.NameAttribute(NameOID.COMMON_NAME, name),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        record = Issued(format(cert.serial_number, "x"), name, role, not_after.timestamp())
        with _locked(self.directory):
            records = read_issued(self.directory)
            _write_issued(self.directory, [*records, record])
        return _pem_key(key), _pem_cert(cert)

    def enroll(self, name: str, role: Role, out: Path, *, days: int = DEFAULT_DAYS) -> Identity:
        """Issue ``name`` a certificate and write its identity directory ``out``."""
        key, cert = self.issue(name, role, days=days)
        write_identity(out, key, cert, self.cert_pem)
        return identity_of_pem(cert)

    def revoke(self, name: str, role: Role | None = None) -> list[Issued]:
        """Revoke every unrevoked certificate of ``name`` (of ``role`` if given); the ones revoked."""
        with _locked(self.directory):
            records = read_issued(self.directory)
            now = _now().timestamp()
            hit = [r for r in records if r.name == name and r.revoked_at is None and role in (None, r.role)]
            if not hit:
                raise NotFound(f"no unrevoked certificate named {name!r} in {self.directory / ISSUED}")
            done = {r.serial for r in hit}
            _write_issued(
                self.directory,
                [Issued(**{**asdict(r), "revoked_at": now}) if r.serial in done else r for r in records],
            )
        return hit

    def server_identity(self, dns_names: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
        """The core's own key and certificate (``core.key``, ``core.crt`` in the CA's
        directory): made when missing, renewed when it expires within :data:`RENEW_DAYS` or
        lacks one of ``dns_names``."""
        key_path, cert_path = self.directory / "core.key", self.directory / "core.crt"
        wanted = {CORE_NAME, *dns_names}
        if key_path.exists() and cert_path.exists():
            try:
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                have = {str(n) for n in san.get_values_for_type(x509.DNSName)}
                have |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
                fresh = cert.not_valid_after_utc - _now() > dt.timedelta(days=RENEW_DAYS)
                if fresh and wanted <= have and cert.issuer == self.cert.subject:
                    return key_path.read_bytes(), cert_path.read_bytes()
            except (ValueError, x509.InvalidVersion, x509.ExtensionNotFound):
                pass  # unreadable or not ours: issue a new one
        key, cert_pem = self.issue(CORE_NAME, "core", dns_names=tuple(sorted(wanted - {CORE_NAME})))
        write_atomically(key_path, key, 0o600)
        write_atomically(cert_path, cert_pem, 0o644)
        return key, cert_pem


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_issued(directory: Path) -> list[Issued]:
    """The records of ``issued.json`` (none if the file is missing)."""
    path = directory / ISSUED
    try:
        raw = json.loads(path.read_text())
        return [Issued(**r) for r in raw]
    except FileNotFoundError:
        return []
    except (ValueError, TypeError) as exc:
        raise FailedPrecondition(f"{path} is damaged ({exc}): restore it from a backup") from None


def _write_issued(directory: Path, records: list[Issued]) -> None:
    text = json.dumps([asdict(r) for r in records], indent=1) + "\n"
    write_atomically(directory / ISSUED, text.encode(), 0o644)


class Revocations:
    """Which certificates the core accepts: those ``issued.json`` records and has not
    revoked.  :meth:`refresh` re-reads the file if it changed (the core calls it every
    :data:`REFRESH_SECONDS`, off its event loop); :meth:`refusal` only reads memory."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / ISSUED
        self._seen: tuple[int, int, int] | None = None
        self._valid: dict[str, Issued] = {}
        self._revoked: dict[str, Issued] = {}

    def refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self._valid, self._revoked = None, {}, {}
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._seen:
            return
        records = read_issued(self.path.parent)
        self._valid = {r.serial: r for r in records if r.revoked_at is None}
        self._revoked = {r.serial: r for r in records if r.revoked_at is not None}
        self._seen = stamp

    def unknown(self, identity: Identity) -> bool:
        """Whether the record (as last read) does not know ``identity``'s certificate."""
        return identity.serial not in self._valid and identity.serial not in self._revoked

    def refusal(self, identity: Identity) -> str | None:
        """Why ``identity``'s certificate is refused, or ``None`` if it is accepted."""
        if identity.serial in self._revoked:
            return f"the certificate of {identity.principal} (serial {identity.serial}) was revoked"
        record = self._valid.get(identity.serial)
        if record is None:
            return f"the certificate of {identity.principal} (serial {identity.serial}) is not in {self.path}"
        if record.name != identity.name or record.role != identity.role:
            return f"the certificate serial {identity.serial} was issued to {record.role}:{record.name}"
        return None


# -- identity directories -------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsFiles:
    """The PEM bytes a TLS endpoint needs: its key and certificate, and the CA it trusts."""

    key: bytes
    cert: bytes
    ca: bytes


def write_identity(out: Path, key: bytes, cert: bytes, ca: bytes) -> None:
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomically(out / KEY_PEM, key, 0o600)
    write_atomically(out / CERT_PEM, cert, 0o644)
    write_atomically(out / CA_PEM, ca, 0o644)


def read_identity(directory: Path) -> TlsFiles:
    """The identity in ``directory`` (``key.pem``, ``cert.pem``, ``ca.pem``)."""
    try:
        files = TlsFiles(
            key=(directory / KEY_PEM).read_bytes(),
            cert=(directory / CERT_PEM).read_bytes(),
            ca=(directory / CA_PEM).read_bytes(),
        )
    except OSError as exc:
        raise InvalidArgument(
            f"identity {directory}: {exc.strerror}: {exc.filename} (an identity directory holds "
            f"{KEY_PEM}, {CERT_PEM} and {CA_PEM}, as `slim relay enroll` or `slim admin enroll` write them)"
        ) from None
    identity_of_pem(files.cert)  # a clear error now rather than a failed handshake later
    return files


def read_ca(path: Path) -> bytes:
    """A CA certificate (PEM) from ``path``: a file, or an identity or CA directory."""
    candidates = [path] if not path.is_dir() else [path / CA_PEM, path / CA_CERT]
    for candidate in candidates:
        try:
            data = candidate.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise InvalidArgument(f"CA certificate {candidate}: {exc.strerror}") from None
        try:
            x509.load_pem_x509_certificate(data)
        except (ValueError, x509.InvalidVersion):
            raise InvalidArgument(f"{candidate} is not a PEM certificate") from None
        return data
    raise InvalidArgument(f"no CA certificate at {path}")
