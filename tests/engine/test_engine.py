"""The engine facade and the CLIs on a real (tiny, random) model, end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine import Engine, SamplingParams
from engine.checkpoint import Checkpoint
from references import textbook_decode

PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from engine.cli import {0}; sys.exit({0}(sys.argv[1:]))"
    tool, rest = args[0], args[1:]
    entry = {"dlm-complete": "complete_main", "dlm-convert": "convert_main"}[tool]
    return subprocess.run(
        [sys.executable, "-c", code.format(entry), *rest], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cli_threshold_one_exact_is_textbook_greedy_decoding(
    tmp_path, tiny_checkpoint, tiny_engine, backend, hf_reference
):
    pytest.importorskip("transformers")
    (tmp_path / "p.txt").write_text(PREFIX)
    (tmp_path / "s.txt").write_text(SUFFIX)
    model = tiny_engine if backend == "cpu" else tiny_checkpoint
    proc = run_cli(
        "dlm-complete", "--model", str(model), "--backend", backend, "--prefix-file", str(tmp_path / "p.txt"),
        "--suffix-file", str(tmp_path / "s.txt"), "--threshold", "1.0", "--length", "12", "--exact", "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    ckpt = Checkpoint.open(tiny_checkpoint)
    tok = ckpt.tokenizer
    prefix_ids = [ckpt.token_ids.bos, *tok.encode(PREFIX)]
    suffix_ids = tok.encode(SUFFIX)
    assert out["input_ids"] == prefix_ids + [ckpt.token_ids.mask] * 12 + suffix_ids
    assert out["middle_ids"] == textbook_decode(hf_reference, tiny_checkpoint, prefix_ids, suffix_ids, 12)
    assert out["stats"]["tokens_per_step"] == 1.0
    assert out["stats"]["steps"] == out["stats"]["forward_passes"]  # exact mode: no context pass
    assert out["text"] == tok.decode(out["middle_ids"])
    assert len(out["confidence"]) == len(out["middle_ids"])


def test_complete_default_params(tiny_engine):
    engine = Engine.load(tiny_engine, backend="cpu")
    c = engine.complete(PREFIX, SUFFIX)
    assert engine.info.backend == "cpu" and engine.info.family == "dream"
    assert c.stats["chosen_length"] in SamplingParams().lengths
    # the cached span (on for these candidates of up to 64 tokens): one shared context pass, then a
    # smaller pass per candidate and step; without it, one pass per step runs them all as one batch
    assert c.stats["steps"] + 1 <= c.stats["forward_passes"] <= 1 + c.stats["steps"] * len(SamplingParams().lengths)
    batched = engine.complete(PREFIX, SUFFIX, SamplingParams(cached_span=False))
    assert batched.stats["forward_passes"] == batched.stats["steps"] + 1
    assert all(0.0 < p <= 1.0 for p in c.confidence)
    assert engine.info.token_ids.mask not in c.middle_ids
    assert not set(c.middle_ids) & engine.info.token_ids.end_ids
    again = engine.complete(PREFIX, SUFFIX)
    assert again.middle_ids == c.middle_ids  # deterministic


def test_line_break_ids_are_the_tokens_holding_a_newline(tiny_engine):
    engine = Engine.load(tiny_engine, backend="cpu")
    breaks = engine.line_break_ids
    assert breaks and all("\n" in engine.tokenizer.decode([i]) for i in breaks)
    assert set(engine.tokenizer.encode("a = 1\nb = 2")) & breaks
    assert not set(engine.tokenizer.encode("a = 1")) & breaks
    c = engine.complete(PREFIX, SUFFIX, SamplingParams(lengths=(16,), stop_at_line_break=True))
    assert not set(c.middle_ids[:-1]) & breaks  # a break can only be the last token of the middle


def test_parallel_commits_use_fewer_steps(tiny_engine):
    engine = Engine.load(tiny_engine, backend="cpu")
    one = engine.complete(PREFIX, SUFFIX, SamplingParams(lengths=(16,), threshold=1.0))
    many = engine.complete(PREFIX, SUFFIX, SamplingParams(lengths=(16,), threshold=0.02))
    assert one.stats["tokens_per_step"] == 1.0
    assert many.stats["steps"] < one.stats["steps"]


def test_window_truncation(tiny_engine):
    engine = Engine.load(tiny_engine, backend="cpu")
    long_prefix = "x = 1\n" * 2000
    c = engine.complete(long_prefix, SUFFIX * 300, SamplingParams(lengths=(8,)))
    limit = engine.info.arch.max_positions
    assert c.prefix_tokens_dropped > 0 and c.suffix_tokens_dropped > 0
    assert len(c.input_ids) <= limit
    assert c.input_ids[0] != engine.info.token_ids.bos  # a cut prefix does not start the document
    budgets = engine.complete(PREFIX * 10, SUFFIX * 10, SamplingParams(lengths=(8,)), max_prefix_tokens=5, max_suffix_tokens=3)
    assert len(budgets.input_ids) == 5 + 8 + 3


def test_empty_context(tiny_engine):
    engine = Engine.load(tiny_engine, backend="cpu")
    c = engine.complete("", "", SamplingParams(lengths=(4,)))
    assert c.input_ids[0] == engine.info.token_ids.bos


def test_budget_expiry_returns_committed_part(tiny_engine):
    engine = Engine.load(tiny_engine, backend="cpu")
    c = engine.complete(PREFIX, SUFFIX, SamplingParams(lengths=(64,), threshold=1.0, budget_ms=0.01))
    assert c.cut
    assert engine.info.token_ids.mask not in c.middle_ids


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "p.txt").write_text("x")
    proc = run_cli("dlm-complete", "--model", str(tmp_path / "missing"), "--prefix-file", str(tmp_path / "p.txt"))
    assert proc.returncode == 2
    assert "dlm-complete: error: model folder" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("dlm-convert", str(tmp_path), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "no config.json" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_plain_output(tmp_path, tiny_engine):
    (tmp_path / "p.txt").write_text(PREFIX)
    proc = run_cli("dlm-complete", "--model", str(tiny_engine), "--prefix-file", str(tmp_path / "p.txt"), "--length", "8")
    assert proc.returncode == 0, proc.stderr
    assert "[cpu]" in proc.stderr and "tokens/step" in proc.stderr


def test_serving_path_never_imports_torch(tiny_engine):
    """Loading an engine folder and completing works with torch made unimportable."""
    code = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
from engine import Engine, SamplingParams
engine = Engine.load({str(tiny_engine)!r}, backend="cpu")
c = engine.complete("def f(x):\\n    return ", "", SamplingParams(lengths=(4,)))
assert c.stats["steps"] >= 1
assert "torch" not in sys.modules
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_cli_span_cache_choice(tmp_path, tiny_engine):
    """dlm-complete --span-cache: auto caches the span of long candidates, off runs full span steps."""
    (tmp_path / "p.txt").write_text(PREFIX)
    rows = {}
    for mode in ("auto", "off"):
        proc = run_cli("dlm-complete", "--model", str(tiny_engine), "--prefix-file", str(tmp_path / "p.txt"),
                       "--length", "32", "--threshold", "1.0", "--span-cache", mode, "--json")
        assert proc.returncode == 0, proc.stderr
        rows[mode] = json.loads(proc.stdout)["stats"]["span_rows"]
    assert 0 < rows["auto"] < rows["off"]
