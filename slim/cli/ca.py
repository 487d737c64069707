"""``slim ca`` and ``slim admin``: SLIM's certificate authority and who may administer
the core (certificates and admin tokens).  See docs/security.md."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from slim.cli.common import (
    ca_option,
    ca_path_or_default,
    console,
    core_client,
    core_option,
    days_option,
    err_console,
    errors_to_exit,
    identity_out_option,
    json_option,
    registry_option,
    timestamp,
    token_out_option,
)
from slim.errors import InvalidArgument
from slim.vocabulary import parse_duration


def enroll(
    registry_path: Path, ca_path: Path | None, name: str, role: str, out: Path | None, days: int
) -> None:
    """Issue ``name`` a ``role`` certificate and write its identity directory."""
    from slim.pki import CertificateAuthority

    out = out or Path(name)
    with errors_to_exit():
        ca = CertificateAuthority.load(ca_path_or_default(ca_path, registry_path))
        identity = ca.enroll(name, role, out, days=days)  # type: ignore[arg-type]
    console.print(
        f"{identity.principal}: certificate {identity.serial} valid {days} days, written to {out}/ "
        "(key.pem, cert.pem, ca.pem; keep key.pem secret)"
    )


def revoke(registry_path: Path, ca_path: Path | None, name: str, role: str | None) -> None:
    from slim.pki import CertificateAuthority

    with errors_to_exit():
        ca = CertificateAuthority.load(ca_path_or_default(ca_path, registry_path))
        gone = ca.revoke(name, role)  # type: ignore[arg-type]
    for record in gone:
        console.print(f"revoked {record.role}:{record.name} certificate {record.serial}")
    console.print("the core refuses them from its next call on (it re-reads issued.json when it changes)")


@click.group()
def ca() -> None:
    """SLIM's certificate authority, on the core's host: it issues relays' and admins'
    certificates (slim relay enroll, slim admin enroll) and the core's own.

    It lives in STATE_DIR/ca (ca.key, private, mode 0600; ca.crt; issued.json, the record
    of every certificate issued and revoked) and is made on the core's first start if
    missing.  Back the directory up with the signing key (docs/security.md)."""


@ca.command("init")
@registry_option
@ca_option()
def ca_init(registry_path: Path, ca_path: Path | None) -> None:
    """Make the CA (refused if one is there)."""
    from slim.pki import CertificateAuthority

    directory = ca_path_or_default(ca_path, registry_path)
    with errors_to_exit():
        authority = CertificateAuthority.init(directory)
    console.print(
        f"CA made in {directory} (certificate: {directory / 'ca.crt'}, valid until "
        f"{authority.cert.not_valid_after_utc:%Y-%m-%d})"
    )


@ca.command("list")
@registry_option
@ca_option()
@json_option
def ca_list(registry_path: Path, ca_path: Path | None, as_json: bool) -> None:
    """Every certificate the CA issued: name, role, serial, expiry, revoked."""
    from dataclasses import asdict

    from slim.pki import read_issued

    directory = ca_path_or_default(ca_path, registry_path)
    with errors_to_exit():
        records = read_issued(directory)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in records], indent=2))
        return
    now = time.time()
    for r in records:
        state = "revoked" if r.revoked_at else "expired" if r.not_after < now else "valid"
        until = time.strftime("%Y-%m-%d", time.gmtime(r.not_after))
        console.print(f"{r.role}:{r.name}  serial {r.serial}  until {until}  {state}")


@ca.command("revoke")
@click.argument("name")
@click.option(
    "--role", type=click.Choice(["relay", "admin"]), default=None, help="Only certificates of this role."
)
@registry_option
@ca_option()
def ca_revoke(name: str, role: str | None, registry_path: Path, ca_path: Path | None) -> None:
    """Revoke every certificate issued to NAME."""
    revoke(registry_path, ca_path, name, role)


@click.group()
def admin() -> None:
    """Who may administer the core: admin certificates and admin tokens.

    Root on the core's host needs neither (the local socket).  Elsewhere the CLI and the
    Slurm plugin read their credential from the environment: $SLIM_IDENTITY (a directory
    from slim admin enroll), or $SLIM_TOKEN / $SLIM_TOKEN_FILE with $SLIM_CA (the CA's
    certificate) for a core with --admin-listen."""


@admin.command("enroll")
@click.argument("name")
@identity_out_option("Write the identity here (default: ./NAME).")
@days_option
@registry_option
@ca_option()
def admin_enroll(name: str, out: Path | None, days: int, registry_path: Path, ca_path: Path | None) -> None:
    """Issue an admin certificate for NAME (on the core's host): point $SLIM_IDENTITY at it."""
    enroll(registry_path, ca_path, name, "admin", out, days)


@admin.group("token")
def token() -> None:
    """Admin tokens: for admin calls over the core's --admin-listen.  Stored hashed."""


def _ttl(text: str | None) -> float:
    if text is None:
        return 0.0
    with errors_to_exit():
        return parse_duration(text, what="--ttl")


@token.command("create")
@click.argument("name")
@click.option(
    "--ttl", default=None, metavar="DURATION", help="How long it is valid, e.g. 30d, 12h (default: 90d)."
)
@token_out_option
@core_option
def token_create(name: str, ttl: str | None, out: Path | None, core_address: str) -> None:
    """Issue an admin token for NAME (printed once; the core keeps its hash)."""
    _issue("admin", name, _ttl(ttl), 0.0, out, core_address)


@token.command("rotate")
@click.argument("name")
@click.option("--ttl", default=None, metavar="DURATION", help="The new token's lifetime (default: 90d).")
@click.option(
    "--overlap",
    default="1h",
    show_default=True,
    metavar="DURATION",
    help="How long NAME's older tokens stay valid, to switch over.",
)
@token_out_option
@core_option
def token_rotate(name: str, ttl: str | None, overlap: str, out: Path | None, core_address: str) -> None:
    """Issue NAME a new admin token; its older ones expire after --overlap."""
    with errors_to_exit():
        retire = parse_duration(overlap, what="--overlap")
    _issue("admin", name, _ttl(ttl), max(retire, 0.001), out, core_address)


def _issue(kind: str, name: str, ttl: float, retire: float, out: Path | None, core_address: str) -> None:
    from slim.v1 import core_pb2 as pb

    kinds = {"admin": pb.TOKEN_KIND_ADMIN, "node": pb.TOKEN_KIND_NODE, "code": pb.TOKEN_KIND_CODE}
    request = pb.IssueTokenRequest(kind=kinds[kind], name=name, ttl_seconds=ttl, retire_others_after=retire)
    with errors_to_exit(), core_client(core_address) as client:
        issued = client.call(client.admin.IssueToken, request)
    expires = timestamp(issued.info.expires)
    if out is not None:
        from slim.files import write_atomically

        with errors_to_exit():
            try:
                write_atomically(out, (issued.token + "\n").encode(), 0o600)
            except OSError as exc:
                raise InvalidArgument(
                    f"--out {out}: {exc.strerror} (the token {issued.info.id} was issued: revoke it)"
                ) from None
        console.print(f"{kind} token {issued.info.id} for {name} (expires {expires}) written to {out}")
    else:
        click.echo(issued.token)
        what = "one-time code" if kind == "code" else f"{kind} token"
        err_console.print(f"{what} {issued.info.id} for {name}, expires {expires}: shown once")


@token.command("list")
@click.option(
    "--kind",
    type=click.Choice(["admin", "node", "code"]),
    default=None,
    help="Only this kind (code: one-time codes).",
)
@core_option
@json_option
def token_list(kind: str | None, core_address: str, as_json: bool) -> None:
    """Every token issued (never its secret): id, kind, name, expiry, revoked."""
    list_tokens(kind, "", core_address, as_json)


def list_tokens(kind: str | None, name: str, core_address: str, as_json: bool) -> None:
    from slim.cli.common import print_json
    from slim.v1 import core_pb2 as pb

    kinds = {
        None: pb.TOKEN_KIND_UNSPECIFIED,
        "admin": pb.TOKEN_KIND_ADMIN,
        "node": pb.TOKEN_KIND_NODE,
        "code": pb.TOKEN_KIND_CODE,
    }
    with errors_to_exit(), core_client(core_address) as client:
        answer = client.call(client.admin.ListTokens, pb.ListTokensRequest(kind=kinds[kind], name=name))
    if as_json:
        print_json(answer)
        return
    now = time.time()
    for t in answer.tokens:
        gone = t.HasField("revoked") or (t.HasField("expires") and t.expires.seconds < now)
        state = "revoked" if t.HasField("revoked") else "expired" if gone else "valid"
        console.print(
            f"{t.id}  {pb.TokenKind.Name(t.kind).removeprefix('TOKEN_KIND_').lower()}  {t.name}  "
            f"created {timestamp(t.created)}  expires {timestamp(t.expires)}  {state}"
        )


@token.command("revoke")
@click.argument("id_or_name")
@core_option
def token_revoke(id_or_name: str, core_address: str) -> None:
    """Revoke an admin token by id, or every admin token of a name."""
    revoke_tokens("admin", id_or_name, core_address)


def revoke_tokens(kind: str, id_or_name: str, core_address: str) -> None:
    import re

    from slim.v1 import core_pb2 as pb

    kinds = {"admin": pb.TOKEN_KIND_ADMIN, "node": pb.TOKEN_KIND_NODE, "code": pb.TOKEN_KIND_CODE}
    if re.fullmatch(r"[0-9a-f]{16}", id_or_name):
        request = pb.RevokeTokensRequest(id=id_or_name, kind=kinds[kind])
    else:
        request = pb.RevokeTokensRequest(kind=kinds[kind], name=id_or_name)
    with errors_to_exit(), core_client(core_address) as client:
        answer = client.call(client.admin.RevokeTokens, request)
    for t in answer.tokens:
        console.print(f"revoked token {t.id} of {t.name}")
