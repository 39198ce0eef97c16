"""Tests that run programs in the sandbox skip where bubblewrap cannot isolate them, except in CI
(``DLM_REQUIRE_SANDBOX=1``, set by ``.ci/run``), where they fail."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def sandbox_available() -> None:
    """Skip (or, under ``DLM_REQUIRE_SANDBOX=1``, fail) the test unless programs can run sandboxed here."""
    from engine.eval.sandbox import SandboxUnavailableError, check_sandbox

    try:
        check_sandbox()
    except SandboxUnavailableError as exc:
        if os.environ.get("DLM_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"{exc} (DLM_REQUIRE_SANDBOX=1: the sandbox tests must run)")
        pytest.skip(f"no sandbox here: {exc}")
