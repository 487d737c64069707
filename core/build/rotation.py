"""``slim keys rotate``: a new signing key, and every built environment rebuilt to trust it.

A rotation has two steps, each run on the core's host against its key directory
(:class:`slim.signing.KeyDirectory`) and store:

- :func:`begin_rotation`: a new key is made, in memory; every environment with a release
  whose registry entry still exists is rebuilt (as ``slim ee build`` does, with the agent)
  so that its initrd trusts the current key and the new one, the release still signed with
  the current key, which every relay trusts.  Only then does the new key become the one that
  signs (``signing.key``; the current public key stays trusted as ``previous.pub`` and its
  private half is gone), and each release is signed again with it.  From the next plan on,
  the core signs with the new key (it reads ``signing.key`` again when it changes,
  :class:`slim.signing.ReloadingSigner`); nodes boot initrds that trust both.
- :func:`finish_rotation`: every such environment is rebuilt trusting the new key alone,
  then ``previous.pub`` goes: relays reading the key directory stop trusting the old key,
  and nodes booting the new initrds refuse plans it signed.

A rebuild that fails stops its step before the key directory changes (the releases rebuilt
before it trust the keys they did before, and a new key never written is trusted by nothing
that matters); fix the environment, or remove it from the registry, and run the step again.
Each step holds the key directory's lock throughout: a build (``slim ee build``, which holds
it shared) waits for it, and it for a build, so no release is published in between that
trusts other keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slim.core.build import copyset
from slim.core.build.agentrt import Runtime
from slim.core.build.release import BuildResult, Progress, build_environment
from slim.core.registry import Registry
from slim.core.store import Store
from slim.errors import FailedPrecondition, SlimError
from slim.signing import KeyDirectory, PublicKey, SigningKey


@dataclass
class Rotation:
    """What a step did."""

    finished: bool  # False: the rotation began; True: it ended
    signer: PublicKey  # the key that signs from now on
    previous: PublicKey  # began: the key rotated out, still trusted; finished: no longer trusted
    trusted: list[PublicKey]  # what the rebuilt initrds trust now, the signer's first
    rebuilt: list[BuildResult] = field(default_factory=list)
    not_in_registry: list[str] = field(default_factory=list)  # releases left as they were


def built_environments(registry: Registry, store: Store) -> tuple[list[str], list[str]]:
    """(the environments with a release that the registry names, those it no longer names)."""
    built = store.environments()
    return [n for n in built if n in registry.environments], [
        n for n in built if n not in registry.environments
    ]


def begin_rotation(
    registry: Registry,
    store: Store,
    key_dir: Path,
    runtime: Runtime | None,
    *,
    level: int = copyset.DEFAULT_LEVEL,
    progress: Progress | None = None,
) -> Rotation:
    """Begin a key rotation (see the module's docstring).  ``runtime`` is the agent's
    (:func:`slim.core.build.agentrt.collect`); None builds initrds without it, which trust no key."""
    SigningKey.load_or_create(key_dir)  # a directory without a key yet: the first one, made
    with KeyDirectory(key_dir).held() as keys:
        old = keys.not_rotating()  # before any rebuild
        new = SigningKey.generate()
        names, gone = built_environments(registry, store)
        trusted = [new.public, old.public]
        rebuilt = _rebuild(registry, store, names, runtime, trusted, old, level, progress, "has not begun")
        keys.begin_rotation(new)
        with store.locked(exclusive=False):
            for name in names:
                store.sign_release(name, new)
    return Rotation(False, new.public, old.public, trusted, rebuilt, gone)


def finish_rotation(
    registry: Registry,
    store: Store,
    key_dir: Path,
    runtime: Runtime | None,
    *,
    level: int = copyset.DEFAULT_LEVEL,
    progress: Progress | None = None,
) -> Rotation:
    """End the key rotation under way (see the module's docstring)."""
    SigningKey.load_or_create(key_dir)  # as the core would: then there is nothing to finish
    with KeyDirectory(key_dir).held() as keys:
        current = keys.signer()
        previous = keys.rotating()  # before any rebuild
        names, gone = built_environments(registry, store)
        trusted = [current.public]
        rebuilt = _rebuild(
            registry, store, names, runtime, trusted, current, level, progress, "has not ended"
        )
        keys.finish_rotation()
    return Rotation(True, current.public, previous, trusted, rebuilt, gone)


def _rebuild(
    registry: Registry,
    store: Store,
    names: list[str],
    runtime: Runtime | None,
    trusted: list[PublicKey],
    signer: SigningKey,
    level: int,
    progress: Progress | None,
    outcome: str,
) -> list[BuildResult]:
    if runtime is not None:
        runtime.trust(trusted)
    results = []
    for name in names:
        try:
            results.append(
                build_environment(
                    registry, store, name, level=level, progress=progress, runtime=runtime, signer=signer
                )
            )
        except SlimError as exc:
            raise FailedPrecondition(
                f"environment {name!r} could not be rebuilt, so the key rotation {outcome} (the key "
                f"directory is unchanged): {exc.message}\nFix it, or remove it from the registry, "
                "and run the step again"
            ) from None
    return results
