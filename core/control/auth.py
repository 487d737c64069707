"""Who is calling the core, and what they may do.

A call reaches the core one of three ways (``docs/security.md``, "The core's gRPC"):

* **mutual TLS** on ``listen``: the caller holds a certificate of SLIM's CA
  (:mod:`slim.pki`); its role and name come from the certificate (``relay:edge1``,
  ``admin:alice``), and a revoked or unrecorded certificate is refused at its next call;
* **TLS with a token** on ``admin_listen``: an admin token (``authorization: Bearer …``),
  issued by ``slim admin token create``, stored hashed, with an expiry;
* **the local socket** (``socket``), mode 0600: whoever can open it is root (or the
  core's user) on the core's host.

``tls: false`` turns all of it off: every caller is trusted (documented as unsafe).

Relay calls (the ``Core`` service) need a relay's certificate, the local socket or no TLS.
Admin calls need an admin certificate, an admin token, the local socket or no TLS.  A
caller with no credential gets UNAUTHENTICATED; a known caller in the wrong role,
PERMISSION_DENIED.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from slim.errors import InvalidArgument, PermissionDenied, Unauthenticated
from slim.pki import Identity, Revocations, identity_of_pem

Kind = Literal["admin", "node", "code"]
TOKEN_RE = re.compile(r"(admin|node)\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})")
MAX_TOKEN_TEXT = 128
# A one-time code (slim node code): 16 characters someone types at a generic medium's prompt,
# 80 random bits, from an alphabet without look-alikes (Crockford's base32), in groups of 4.
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_GROUPS = 4
_CODE_RE = re.compile(f"[{CODE_ALPHABET}]{{{CODE_GROUPS * 4}}}")


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: ``principal`` is what logs and "set by" name it."""

    principal: str
    role: Literal["relay", "admin", "local", "insecure"]
    relay: str = ""  # the relay's name, from its certificate


LOCAL = Caller("local:root", "local")
INSECURE = Caller("insecure", "insecure")


@dataclass(frozen=True)
class TokenRecord:
    """One issued token as the state keeps it (the secret only hashed)."""

    id: str
    kind: Kind
    name: str  # the admin's or the node's name
    hash: str  # sha256 of the secret, hex
    created: float
    expires: float | None
    revoked_at: float | None = None


@dataclass(frozen=True)
class NewToken:
    record: TokenRecord
    text: str  # shown once, never stored


def new_token(kind: Kind, name: str, now: float, ttl: float | None) -> NewToken:
    """A fresh token for ``name``: ``KIND.ID.SECRET`` (32 random bytes)."""
    token_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    record = TokenRecord(
        id=token_id,
        kind=kind,
        name=name,
        hash=hashlib.sha256(secret.encode()).hexdigest(),
        created=now,
        expires=now + ttl if ttl is not None else None,
    )
    return NewToken(record, f"{kind}.{token_id}.{secret}")


def new_code(node: str, now: float, ttl: float) -> NewToken:
    """A fresh one-time code for ``node``: ``XXXX-XXXX-XXXX-XXXX`` (the record keeps its hash;
    its id is for listing and revoking it)."""
    chars = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_GROUPS * 4))
    record = TokenRecord(
        id=secrets.token_hex(8),
        kind="code",
        name=node,
        hash=hashlib.sha256(chars.encode()).hexdigest(),
        created=now,
        expires=now + ttl,
    )
    return NewToken(record, "-".join(chars[i : i + 4] for i in range(0, len(chars), 4)))


def normalize_code(text: str) -> str:
    """A code as typed (any case, with or without dashes or spaces; O for 0, I and L for 1, as
    Crockford's base32 reads them) in its canonical form; Unauthenticated if it cannot be one."""
    if len(text) > 64:
        raise Unauthenticated("that is not a one-time code (they read XXXX-XXXX-XXXX-XXXX)")
    chars = re.sub(r"[\s-]", "", text).upper().translate(str.maketrans("OIL", "011"))
    if not _CODE_RE.fullmatch(chars):
        raise Unauthenticated("that is not a one-time code (they read XXXX-XXXX-XXXX-XXXX)")
    return chars


def parse_token(text: str) -> tuple[Kind, str, str]:
    """(kind, id, secret) of a token's text; a clear error if it is not one."""
    found = TOKEN_RE.fullmatch(text.strip()) if len(text) <= MAX_TOKEN_TEXT else None
    if found is None:
        raise Unauthenticated("the token is malformed (a SLIM token reads KIND.ID.SECRET)")
    kind: Kind = found.group(1)  # type: ignore[assignment]
    return kind, found.group(2), found.group(3)


class TokenBook:
    """The issued tokens, in memory (loaded from the state at start and kept in step
    with every issue and revocation), so that checking one never waits on the disk."""

    def __init__(self, records: Iterable[TokenRecord] = ()) -> None:
        self._by_id = {r.id: r for r in records}
        self._lock = threading.Lock()  # written on the core's writer thread, read on its loop

    def put(self, record: TokenRecord) -> None:
        with self._lock:
            self._by_id[record.id] = record

    def records(self) -> list[TokenRecord]:
        with self._lock:
            found = list(self._by_id.values())
        return sorted(found, key=lambda r: (r.kind, r.name, r.created))

    def check(self, text: str, kind: Kind, now: float) -> TokenRecord:
        """The record of a valid ``kind`` token ``text``; UNAUTHENTICATED saying why not."""
        got, token_id, secret = parse_token(text)
        record = self._by_id.get(token_id)
        digest = hashlib.sha256(secret.encode()).hexdigest()
        if record is None or not hmac.compare_digest(record.hash, digest):
            raise Unauthenticated(f"unknown {got} token {token_id}")
        if got != kind or record.kind != kind:
            raise PermissionDenied(f"token {token_id} is a {record.kind} token, not an {kind} token")
        if record.revoked_at is not None:
            raise Unauthenticated(f"{kind} token {token_id} ({record.name}) was revoked")
        if record.expires is not None and now >= record.expires:
            raise Unauthenticated(f"{kind} token {token_id} ({record.name}) expired")
        return record

    def code(self, text: str, now: float) -> TokenRecord:
        """The record of the valid one-time code ``text``; UNAUTHENTICATED saying why not
        (unknown, already used or withdrawn, expired)."""
        digest = hashlib.sha256(normalize_code(text).encode()).hexdigest()
        with self._lock:
            found = [r for r in self._by_id.values() if r.kind == "code"]
        record = next((r for r in found if hmac.compare_digest(r.hash, digest)), None)
        if record is None:
            raise Unauthenticated("unknown one-time code (check what was typed)")
        if record.revoked_at is not None:
            raise Unauthenticated(f"this one-time code ({record.id}) was already used, or withdrawn")
        if record.expires is not None and now >= record.expires:
            raise Unauthenticated(f"this one-time code ({record.id}) has expired")
        return record


def bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer TOKEN`` header, if one was sent."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated("authorization must read 'Bearer TOKEN'")
            return token.strip()
    return None


class Authenticator:
    """Decides who a call's caller is (see the module's docstring)."""

    def __init__(self, revocations: Revocations | None, tokens: TokenBook, clock: Any) -> None:
        self.revocations = revocations  # None: TLS is off, everyone is trusted
        self.tokens = tokens
        self.clock = clock
        self._identities: dict[bytes, Identity] = {}

    async def _certificate(self, pem: bytes) -> Identity:
        identity = self._identities.get(pem)
        if identity is None:
            try:
                identity = identity_of_pem(pem)
            except InvalidArgument as exc:
                raise Unauthenticated(str(exc)) from None
            if len(self._identities) > 4096:
                self._identities.clear()
            self._identities[pem] = identity
        assert self.revocations is not None
        refusal = self.revocations.refusal(identity)
        if refusal and self.revocations.unknown(identity):
            # enrolled since the record was last read: read it now (off the event loop)
            await asyncio.get_running_loop().run_in_executor(None, self.revocations.refresh)
            refusal = self.revocations.refusal(identity)
        if refusal:
            raise Unauthenticated(refusal)
        return identity

    async def caller(self, context: Any) -> Caller:
        """Who is calling (raises UNAUTHENTICATED if nobody we know)."""
        auth: dict[str, list[bytes]] = context.auth_context() or {}
        kind = (auth.get("transport_security_type") or [b""])[0]
        if kind == b"local":
            return LOCAL
        if self.revocations is None:
            return INSECURE
        if kind != b"ssl":
            raise Unauthenticated("the core takes calls over TLS or its local socket only")
        pems = auth.get("x509_pem_cert")
        if pems:
            identity = await self._certificate(pems[0])
            if identity.role == "relay":
                return Caller(identity.principal, "relay", relay=identity.name)
            if identity.role == "admin":
                return Caller(identity.principal, "admin")
            raise PermissionDenied(f"{identity.principal} may not call the core")
        token = bearer(context.invocation_metadata())
        if token is None:
            raise Unauthenticated(
                "no credential: admin calls need an admin token (slim admin token create) or an "
                "admin certificate (slim admin enroll)"
            )
        record = self.tokens.check(token, "admin", self.clock())
        return Caller(f"token:{record.name}", "admin")

    async def relay(self, context: Any) -> Caller:
        """The caller of a relay call: a relay (by certificate), root, or anyone without TLS."""
        caller = await self.caller(context)
        if caller.role == "admin":
            raise PermissionDenied(f"{caller.principal} is not a relay: relay calls need a relay certificate")
        return caller

    async def node_call(self, context: Any, peek: bool) -> bool:
        """A call made for a node (Locate, GetBootPlan, GetBootScript): a relay's, which an
        admin or root may also make to see what the core would answer (``peek``: nothing
        counted).  True if the caller vouches for the node itself (a tool peeking, not a
        relay): the core then does not ask for the node's token or site."""
        caller = await self.caller(context)
        if caller.role == "admin" and not peek:
            raise PermissionDenied(
                f"{caller.principal} is not a relay: relay calls need a relay certificate (admins may peek)"
            )
        return peek and caller.role != "relay"

    async def admin(self, context: Any) -> Caller:
        """The caller of an Admin call: an admin (certificate or token), root, or anyone without TLS."""
        caller = await self.caller(context)
        if caller.role == "relay":
            raise PermissionDenied(f"{caller.principal} may not make admin calls")
        return caller
