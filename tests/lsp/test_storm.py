"""A short storm and soak against the real server (the full-size runs: ``scripts/storm_soak.py``).

Asserted: every request is answered, no suggestion is placed anywhere but at its request's
cursor, the documents end in step with the client, and no thread, task or pending message
is left behind. Speed and memory figures are the script's job, not a test's.
"""

from __future__ import annotations

import pytest
from raw_lsp import StdioServer
from storm import soak, storm


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    srv = StdioServer()
    assert "result" in srv.initialize({"backend": "cpu", "debounceMs": 5, "minConfidence": 0, "latencyBudgetMs": 100})
    assert srv.wait_ready()["state"] == "ready"
    yield srv
    code, err = srv.stop()
    assert code == 0, err


def test_a_storm_of_requests_edits_and_cancellations(server: StdioServer):
    report = storm(server, documents=10, requests=200, seed=3)
    assert report["answered"] == 200 and report["errors"] == 0 and report["bad_ranges"] == 0, report
    assert report["documents_in_step"] == 10 and report["after_storm"]["errors"] == 0, report
    assert report["cancelled"] + report["server_stale"] + report["server_cancelled"] > 0, report  # the paths ran
    assert report["threads_after"] <= report["threads_before"] + 2, report  # the engine pool may have grown to 2
    assert report["tasks_after"] <= report["tasks_before"], report
    assert report["pending_after"] <= 1, report


def test_a_short_soak(server: StdioServer):
    report = soak(server, server.proc.pid, completions=300, block=100)
    assert report["errors"] == 0, report
    assert len(report["blocks"]) == 3 and report["pending_after"] <= 1, report
