"""What a test needs from the host (a tool, root): missing locally, the test is
skipped; missing in CI (CI=true), it fails, because CI installs everything."""

from __future__ import annotations

import os
import shutil

import pytest


def need(condition: bool, why: str) -> None:
    """Skip (locally) or fail (in CI) with ``why`` unless ``condition`` holds."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must be able to run this test: {why}")
    pytest.skip(why)


def need_tool(name: str, package: str | None = None) -> str:
    """The tool's path, by :func:`need`."""
    path = shutil.which(name)
    need(path is not None, f"{name} is not installed (apt-get install {package or name})")
    assert path is not None
    return path
