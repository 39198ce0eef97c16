"""The default model that ships in ``engine/models/default``, through the real entry points.

These run the real model on the real code paths (``dlm-lsp check`` and an LSP
session over stdio); quality numbers live in the model card, produced by dlm-eval.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from dlm_lsp.gate import HIDDEN
from engine import Engine, default_model_path
from engine.manifest import read_manifest


def test_shipped_model_is_a_verified_engine_folder():
    folder = default_model_path()
    manifest = read_manifest(folder)  # checksums verified
    assert manifest.family == "dream" and manifest.precision in ("fp32", "int8")
    assert (folder / "MODEL_CARD.md").is_file()
    total = sum(f.stat().st_size for f in folder.iterdir())
    assert total <= 60 * 1024 * 1024


def test_check_command_completes_the_sample():
    proc = subprocess.run(
        [sys.executable, "-m", "dlm_lsp", "check", "--json", "--backend", "cpu", "--budget-ms", "5000"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["model"] == str(default_model_path())
    assert report["backend"] == "cpu" and report["family"] == "dream"
    assert report["raw_engine_text"].strip()  # the model wrote something at `return |`


def test_check_command_at_a_file_position(tmp_path):
    source = tmp_path / "geometry.py"
    source.write_text("import math\n\n\ndef circle_area(radius):\n    return \n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "dlm_lsp", "check", f"{source}:5:12", "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["target"] == str(source)
    bad = subprocess.run([sys.executable, "-m", "dlm_lsp", "check", f"{source}:99:1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "outside the file" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "dlm_lsp", "check", "--min-confidence", "5"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--min-confidence must be in [0, 1]" in bad.stderr


def test_engine_fills_a_simple_middle():
    engine = Engine.load(default_model_path(), backend="cpu")
    completion = engine.complete("import os\nimport sys\n\n\ndef main():\n    ", "\n")
    assert completion.text.strip()
    assert completion.stats["forward_passes"] >= 2


@pytest_lsp.fixture(config=ClientServerConfig(server_command=[sys.executable, "-m", "dlm_lsp"]))
async def client(lsp_client: LanguageClient):  # type: ignore[no-untyped-def]
    await lsp_client.initialize_session(
        # every suggestion shown: this checks the model and the plumbing, not the gate (tests/lsp/test_gate.py)
        types.InitializeParams(capabilities=types.ClientCapabilities(),
                               initialization_options={"debounceMs": 0, "minConfidence": 0, "latencyBudgetMs": 2000})
    )
    yield
    await lsp_client.shutdown_session()


@pytest.mark.asyncio
async def test_lsp_session_with_the_shipped_model(client: LanguageClient):
    import asyncio

    for _ in range(300):
        status = (await client.protocol.send_request_async("dlm/status", {}))._asdict()
        if status["state"] != "loading":
            break
        await asyncio.sleep(0.1)
    assert status["state"] == "ready", status
    text = "def is_even(n):\n    return \n\n\nfor i in range(10):\n    print(i, is_even(i))\n"
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri="file:///w/even.py", language_id="python", version=1, text=text)))
    suggestions = []
    for line, col in ((1, 11), (4, 0), (5, 4)):
        result = await client.text_document_inline_completion_async(types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri="file:///w/even.py"),
            position=types.Position(line=line, character=col),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked)))
        suggestions += [item.insert_text for item in result.items]
    assert suggestions, "the shipped model suggested nothing at three ordinary positions"
    assert all(s.strip() for s in suggestions)


def test_check_says_what_the_gate_hid_and_that_the_model_is_a_demo():
    def run(*extra: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "dlm_lsp", "check", "--backend", "cpu", "--budget-ms", "5000", *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    report = json.loads(run("--json"))
    shown = run()
    assert "the shipped model is a small demo" in shown
    if report["completion"]:
        assert report["completion"] in shown
    elif report["gate"]:  # the demo model is rarely confident: the user is told what was hidden and why
        assert report["gate"] in HIDDEN
        assert f"the gate hid {report['ungated_completion']!r}" in shown
    else:  # post-processing left nothing
        assert "(no suggestion)" in shown
    everything = json.loads(run("--json", "--min-confidence", "0"))
    assert everything["completion"] == everything["ungated_completion"]
