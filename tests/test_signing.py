"""slim.signing: the core's Ed25519 key, signatures in signify's format, checked both by
this module and by Debian's signify-openbsd (what a node's initrd runs)."""

from __future__ import annotations

import json
import logging
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from slim.cli import main
from slim.core.registry import Registry
from slim.core.store import Store
from slim.errors import FailedPrecondition, InvalidArgument
from slim.signing import (
    ENDORSEMENTS_FILE,
    KEY_FILE,
    PREVIOUS_FILE,
    PUBLIC_FILE,
    Endorsement,
    KeyDirectory,
    PublicKey,
    ReloadingSigner,
    SigningKey,
    TrustedKeys,
    follow,
    read_public_keys,
    verify,
)
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
    keys = tmp_path / "keys"
    shown = CliRunner().invoke(main, ["keys", "show", "--keys", str(keys)])
    assert shown.exit_code == 0, shown.output
    key = SigningKey.load(keys / KEY_FILE)
    assert f"signing key {key.public.id} in {keys}" in shown.output
    exported = CliRunner().invoke(main, ["keys", "export", "--keys", str(keys)])
    assert exported.exit_code == 0 and PublicKey.from_text(exported.output) == key.public


# -- rotation ------------------------------------------------------------------------
def test_a_rotation_keeps_the_previous_key_trusted_until_it_ends(tmp_path: Path) -> None:
    keys = KeyDirectory(tmp_path / "keys")
    old = keys.load_or_create()
    assert keys.previous() is None and keys.trusted() == [old.public]
    new = SigningKey.generate()
    assert keys.begin_rotation(new) == old.public
    assert keys.signer().public == new.public  # signs from now on
    assert keys.previous() == old.public and keys.trusted() == [new.public, old.public]
    assert read_public_keys([keys.path]) == [new.public, old.public]  # what a relay given the directory reads
    assert stat.S_IMODE((keys.path / KEY_FILE).stat().st_mode) == 0o600
    assert KEY_FILE.encode() not in b"".join(p.read_bytes() for p in keys.path.iterdir() if p.is_file())
    assert sorted(p.name for p in keys.path.iterdir()) == [
        ".lock", ENDORSEMENTS_FILE, PREVIOUS_FILE, KEY_FILE, PUBLIC_FILE,
    ]  # fmt: skip
    with pytest.raises(
        FailedPrecondition, match=f"under way \\(from key {old.public.id} to {new.public.id}\\)"
    ):
        keys.begin_rotation(SigningKey.generate())
    assert keys.signer().public == new.public  # unchanged by the refusal
    assert keys.finish_rotation() == old.public
    assert keys.previous() is None and keys.trusted() == [new.public]
    assert read_public_keys([keys.path]) == [new.public]
    with pytest.raises(FailedPrecondition, match="no key rotation is under way"):
        keys.finish_rotation()


def test_each_rotation_endorses_its_new_key_with_the_one_it_replaces(tmp_path: Path) -> None:
    """The chain boot media follow: from the first key, each rotation's key is trusted once
    the key before it endorsed it; a link signed by no trusted key adds nothing."""
    keys = KeyDirectory(tmp_path / "keys")
    first = keys.load_or_create().public
    assert keys.endorsements() == []
    made = []
    for _ in range(2):
        new = SigningKey.generate()
        keys.begin_rotation(new)
        keys.finish_rotation()
        made.append(new.public)
    chain = keys.endorsements()
    assert [PublicKey.from_text(e.key) for e in chain] == made
    assert follow([first], chain) == [first, *made]
    assert follow([made[0]], chain) == made  # a medium made after the first rotation
    stranger = SigningKey.generate()
    forged = Endorsement(stranger.public.text(), stranger.sign(stranger.public.text().encode()))
    assert follow([first], [forged, *chain]) == [first, *made]
    assert follow([first], [chain[1]]) == [first]  # a link out of order: its signer not yet trusted
    (keys.path / ENDORSEMENTS_FILE).write_text('{"key": 1}')
    with pytest.raises(FailedPrecondition, match="is not a list of"):
        keys.endorsements()


def test_a_key_directory_from_before_rotations_and_one_a_step_left_half_written(tmp_path: Path) -> None:
    """A directory with signing.key and signing.pub only is a directory with no rotation under
    way; a step interrupted between its files leaves one that still works, and is repaired."""
    keys = KeyDirectory(tmp_path / "keys")
    keys.path.mkdir(mode=0o700)
    key = SigningKey.generate()
    key.save(keys.path)
    assert keys.load_or_create().public == key.public
    assert keys.previous() is None and keys.trusted() == [key.public]
    # a rotation stopped after previous.pub and signing.pub, before signing.key
    (keys.path / PREVIOUS_FILE).write_text(key.public.text())
    (keys.path / PUBLIC_FILE).write_text(SigningKey.generate().public.text())
    assert keys.previous() is None and keys.trusted() == [key.public]  # no rotation under way
    assert keys.load_or_create().public == key.public
    assert PublicKey.from_text((keys.path / PUBLIC_FILE).read_text()) == key.public  # written again
    new = SigningKey.generate()
    assert keys.begin_rotation(new) == key.public  # the step, run again, goes through
    assert keys.trusted() == [new.public, key.public]


def test_the_core_signs_with_the_new_key_from_its_next_signature(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "keys"
    signer = ReloadingSigner(directory)
    old = SigningKey.load(directory / KEY_FILE)
    assert verify(PLAN, signer.sign(PLAN), [old.public]) == old.public
    new = SigningKey.generate()
    KeyDirectory(directory).begin_rotation(new)
    assert signer.public == new.public
    assert verify(PLAN, signer.sign(PLAN), [old.public, new.public]) == new.public
    # a key file that is not a key: logged once, and the key held signs on
    (directory / KEY_FILE).write_text("not a key\n")
    with caplog.at_level(logging.ERROR, "slim.signing"):
        assert verify(PLAN, signer.sign(PLAN), [new.public]) == new.public
        assert verify(PLAN, signer.sign(PLAN), [new.public]) == new.public
    (logged,) = [r.getMessage() for r in caplog.records]
    assert logged.startswith(
        f"still signing with key {new.public.id}: {directory / KEY_FILE} is not a usable"
    )
    # the key written again (as a rotation writes it, replacing the file): signing with it
    newer = SigningKey.generate()
    newer.save(directory)
    assert verify(PLAN, signer.sign(PLAN), [new.public, newer.public]) == newer.public


def test_trusted_keys_follow_their_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys = KeyDirectory(tmp_path / "keys")
    old = keys.load_or_create()
    extra = tmp_path / "extra.pub"
    extra.write_text(SigningKey.generate().public.text())
    trusted = TrustedKeys([keys.path, extra])
    assert trusted.current() == [old.public, PublicKey.from_text(extra.read_text())]
    new = SigningKey.generate()
    keys.begin_rotation(new)
    assert trusted.current()[:2] == [new.public, old.public]
    keys.finish_rotation()
    assert trusted.current()[:1] == [new.public] and old.public not in trusted.current()
    before = trusted.current()
    extra.write_text("garbage\n")  # a bad file later: logged, the keys held are kept
    with caplog.at_level(logging.ERROR, "slim.signing"):
        assert trusted.current() == before
    assert "still trusting keys" in caplog.text and "signify's format" in caplog.text
    with pytest.raises(InvalidArgument, match="signify's format"):
        TrustedKeys([extra])  # ... but at first, it is an error


# -- slim keys rotate -----------------------------------------------------------------
def keys_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["keys", *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_slim_keys_rotate_begins_and_finishes_and_says_when_it_cannot(
    tmp_path: Path, registry_file: Path, store: Store
) -> None:
    """No environment to rebuild: only a release of one the registry no longer names, which
    is left as it was.  (Rebuilding, and nodes booting: tests/test_agent.py.)"""
    where = ("--keys", str(tmp_path / "keys"), "--registry", str(registry_file))
    found = store.release("base")
    assert found is not None
    elsewhere = Store(tmp_path / "elsewhere")
    elsewhere.publish_release(found[1].model_copy(update={"environment": "gone"}))
    at = ("--store", str(elsewhere.root))
    code, out = keys_cli("rotate", "--finish", *where, *at)
    assert code == 1 and "no key rotation is under way" in out
    old = SigningKey.load(tmp_path / "keys" / KEY_FILE)
    code, out = keys_cli("show", *where)
    assert code == 0 and f"trusted: {old.public.id}; no rotation under way" in out
    code, out = keys_cli("rotate", *where, *at)
    assert code == 0, out
    new = SigningKey.load(tmp_path / "keys" / KEY_FILE)
    assert new.public != old.public
    assert "gone: not in the registry any more, its release is left as it was" in out
    assert f"signed with key {new.public.id} from now on" in out
    assert "nothing to restart" in out and f"key {old.public.id} stays trusted" in out
    assert elsewhere.release_signature("gone") == ""
    code, out = keys_cli("show", "--json", *where)
    shown = json.loads(out)
    assert shown["trusted"] == [new.public.id, old.public.id] and shown["rotating"] is True
    code, out = keys_cli("rotate", *where, *at)
    assert code == 1 and "a key rotation is under way" in out and "slim keys rotate --finish" in out
    assert SigningKey.load(tmp_path / "keys" / KEY_FILE).public == new.public
    code, out = keys_cli("rotate", "--finish", "--json", *where, *at)
    assert code == 0, out
    done = json.loads(out)
    assert (done["step"], done["signing"], done["previous"], done["trusted"]) == (
        "finish", new.public.id, old.public.id, [new.public.id]
    )  # fmt: skip
    assert (done["rebuilt"], done["not_in_registry"]) == ([], ["gone"])
    code, out = keys_cli("show", "--json", *where)
    assert json.loads(out)["trusted"] == [new.public.id] and json.loads(out)["previous"] is None


def test_a_rotation_whose_rebuild_fails_leaves_the_keys_as_they_were(
    tmp_path: Path, registry: Registry, registry_file: Path, store: Store
) -> None:
    """The store's releases name images that do not exist here: nothing can be rebuilt, so
    no initrd would trust the new key, and the rotation does not begin."""
    where = ("--keys", str(tmp_path / "keys"), "--registry", str(registry_file), "--store", str(store.root))
    old = SigningKey.load(tmp_path / "keys" / KEY_FILE)  # the store fixture's signer
    signatures = {n: store.release_signature(n) for n in store.environments()}
    code, out = keys_cli("rotate", *where)
    assert code == 1
    assert "environment 'base' could not be rebuilt, so the key rotation has not begun" in out
    assert "/srv/images/base" in out
    assert KeyDirectory(tmp_path / "keys").trusted() == [old.public]
    assert {n: store.release_signature(n) for n in store.environments()} == signatures


def test_a_medium_is_built_from_the_public_keys_alone(tmp_path: Path) -> None:
    """``slim media build`` reads signing.pub (and previous.pub during a rotation), never the
    private key: it may run where only the public files were copied."""
    keys = KeyDirectory(tmp_path / "keys")
    first = keys.load_or_create()
    keys.begin_rotation(SigningKey.generate())
    both = keys.trusted()
    (tmp_path / "keys" / "signing.key").unlink()  # only the public files are left
    assert keys.public_keys() == both and both[1] == first.public
    with pytest.raises(FailedPrecondition):
        keys.trusted()
    with pytest.raises(FailedPrecondition, match=r"no .*signing\.pub"):
        KeyDirectory(tmp_path / "elsewhere").public_keys()
