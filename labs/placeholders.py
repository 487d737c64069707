"""Stand-in releases of tiny objects, for a core that must answer plans and menus
without a built EE: the core's tests, the control-plane demo and its benchmark."""

from __future__ import annotations

from slim.core.registry import Registry
from slim.core.store import Store
from slim.release import Release, ReleaseDirectory
from slim.signing import SigningKey
from slim.vocabulary import Policy


def publish_placeholder_releases(
    reg: Registry, store: Store, only: list[str] | None = None, signer: SigningKey | None = None
) -> None:
    """Stand-in releases (tiny objects) so that plans and menus have digests to show;
    ``signer`` (the core's key) signs them, as a build does."""
    for name in reg.environments if only is None else only:
        dirs = {}
        for path, spec in reg.directories(name).items():
            payload = f"placeholder {spec.policy} content of {path} in {name}\n".encode()
            ref = store.put_bytes(payload)
            dirs[path] = ReleaseDirectory(
                policy=spec.policy,
                archive=None if spec.policy is Policy.NFS else ref,
                manifest=ref,
                bytes=len(payload),
                files=1,
            )
        store.publish_release(
            Release(
                environment=name,
                kernel=store.put_bytes(f"placeholder kernel of {name}\n".encode()),
                initrd=store.put_bytes(f"placeholder initrd of {name}\n".encode()),
                directories=dirs,
                created="demo",
            ),
            signer,
        )
