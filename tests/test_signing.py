"""slim.signing: the core's Ed25519 key, signatures in signify's format, checked both by
this module and by Debian's signify-openbsd (what a node's initrd runs)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from slim.errors import FailedPrecondition, InvalidArgument
from slim.signing import KEY_FILE, PUBLIC_FILE, PublicKey, SigningKey, read_public_keys, verify
from tests.support import need_tool

PLAN = b'{"node": "n1", "nonce": "00ff"}\n'


def test_a_key_is_made_once_and_kept_private(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    first = SigningKey.load_or_create(keys)
    assert stat.S_IMODE((keys / KEY_FILE).stat().st_mode) == 0o600
    again = SigningKey.load_or_create(keys)
    assert again.public == first.public and len(first.public.id) == 16
    assert read_public_keys([keys / PUBLIC_FILE]) == [first.public]
    assert PublicKey.from_text((keys / PUBLIC_FILE).read_text()) == first.public


def test_signatures_verify_and_a_changed_byte_or_another_key_does_not(tmp_path: Path) -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    signature = key.sign(PLAN)
    assert verify(PLAN, signature, [other.public, key.public]) == key.public
    with pytest.raises(FailedPrecondition, match="does not match its bytes"):
        verify(PLAN.replace(b"n1", b"n2"), signature, [key.public])
    with pytest.raises(FailedPrecondition, match=f"signed by key {key.public.id}, which is not trusted"):
        verify(PLAN, signature, [other.public])
    with pytest.raises(InvalidArgument, match="signify's format"):
        verify(PLAN, "garbage", [key.public])
    with pytest.raises(InvalidArgument, match="not base64"):
        verify(PLAN, "untrusted comment: x\n!!!\n", [key.public])


def test_signify_openbsd_checks_our_signatures(tmp_path: Path) -> None:
    """What the agent runs in the initrd: Debian's signify verifies the core's signatures."""
    signify = need_tool("signify-openbsd", "signify-openbsd")
    key, other = SigningKey.generate(), SigningKey.generate()
    (tmp_path / "k.pub").write_text(key.public.text())
    (tmp_path / "other.pub").write_text(other.public.text())
    (tmp_path / "plan").write_bytes(PLAN)
    (tmp_path / "plan.sig").write_text(key.sign(PLAN))
    (tmp_path / "bad").write_bytes(PLAN.replace(b"00ff", b"00fe"))

    def check(pub: str, message: str) -> int:
        argv = [signify, "-V", "-q", "-p", str(tmp_path / pub), "-m", str(tmp_path / message)]
        return subprocess.run(
            [*argv, "-x", str(tmp_path / "plan.sig")], capture_output=True, timeout=30
        ).returncode

    assert check("k.pub", "plan") == 0
    assert check("k.pub", "bad") != 0
    assert check("other.pub", "plan") != 0


def test_an_unusable_key_file_is_a_clear_error(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / KEY_FILE).write_text("not a key\n")
    with pytest.raises(FailedPrecondition, match="is not a usable signing key"):
        SigningKey.load_or_create(keys)


def test_slim_keys_shows_and_exports_the_core_key(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from slim.cli import main

    keys = tmp_path / "keys"
    shown = CliRunner().invoke(main, ["keys", "show", "--keys", str(keys)])
    assert shown.exit_code == 0, shown.output
    key = SigningKey.load(keys / KEY_FILE)
    assert f"signing key {key.public.id} in {keys}" in shown.output
    exported = CliRunner().invoke(main, ["keys", "export", "--keys", str(keys)])
    assert exported.exit_code == 0 and PublicKey.from_text(exported.output) == key.public
