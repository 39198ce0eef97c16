"""Training examples (masking, shifted targets, EOS-padded slots) and a tiny resumable training run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.train.data import IGNORE, Batcher, SpecialIds, choose_middle, train_tokenizer

TEXT = "".join(
    f"def handler_{i}(request, value={i}):\n    if value > {i}:\n        return request.get('k{i}')\n    return None\n\n\n"
    for i in range(60)
)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return train_tokenizer([TEXT] * 3, 400)


def test_special_tokens_take_the_first_ids(tokenizer):
    ids = SpecialIds()
    assert tokenizer.token_to_id("<|endoftext|>") == ids.eos
    assert tokenizer.token_to_id("<|mask|>") == ids.mask
    assert tokenizer.token_to_id("<|beginoftext|>") == ids.bos


def test_choose_middle_kinds():
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(200):
        a, b, kind = choose_middle(TEXT, rng)
        assert 0 <= a < b <= len(TEXT)
        kinds.add(kind)
        if kind in ("line", "lines", "block"):
            assert TEXT[a - 1] == "\n" and TEXT[b - 1] == "\n"  # whole lines
    assert kinds == {"line", "rest_of_line", "lines", "block", "random"}


def test_span_examples(tokenizer):
    stream = np.array(tokenizer.encode(TEXT).ids, np.uint16)
    batcher = Batcher(tokenizer, [TEXT], stream, window=96, span_share=1.0)
    batch = batcher.batch(32, np.random.default_rng(1))
    ids = SpecialIds()
    assert batch["input_ids"].shape == batch["targets"].shape == batch["valid"].shape == (32, 96)
    for inp, tgt, valid in zip(batch["input_ids"], batch["targets"], batch["valid"]):
        masked = np.flatnonzero(inp == ids.mask)
        assert len(masked) >= 1 and 0 not in masked
        # shifted: the target at row i is the true token of position i+1, and only where i+1 is masked
        assert np.array_equal(np.flatnonzero(tgt != IGNORE), masked - 1)
        assert valid[: masked.max() + 1].all()
    # slots are padded with EOS: some targets are EOS
    assert (batch["targets"] == ids.eos).any()


def test_random_examples(tokenizer):
    stream = np.array(tokenizer.encode(TEXT * 5).ids, np.uint16)
    batcher = Batcher(tokenizer, [TEXT], stream, window=64, span_share=0.0)
    batch = batcher.batch(16, np.random.default_rng(2))
    assert batch["valid"].all()
    ratio = (batch["input_ids"] == SpecialIds().mask).mean()
    assert 0.2 < ratio < 0.8  # t ~ U(0.05, 1) on average ~0.5


@pytest.mark.slow
def test_tiny_training_run_resumes_and_exports(tmp_path):
    pytest.importorskip("torch")
    from engine.checkpoint import Checkpoint
    from engine.train.trainer import TrainConfig, export_hf, prepare, run_training

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, n in (("train", 30), ("heldout", 3)):
        with (corpus / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                f.write(json.dumps({"source": "t", "version": "1", "licence": "MIT", "path": f"{i}.py", "text": TEXT}) + "\n")
    cfg = TrainConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                      window=64, batch_size=4, total_steps=6, warmup_steps=2, eval_every=3)
    run = tmp_path / "run"
    report = prepare(corpus, run, cfg)
    assert report["heldout_bytes_per_token"] > 1.0
    first = run_training(run, minutes=5)
    assert first["step"] == 6
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any("heldout_loss" in r for r in log)
    # resuming a finished run is a no-op that keeps the step count
    assert run_training(run, minutes=5)["step"] == 6
    folder = export_hf(run, tmp_path / "hf")
    ckpt = Checkpoint.open(folder)
    assert ckpt.family.name == "dream" and ckpt.token_ids.mask == SpecialIds().mask
    assert len(ckpt.load_state("pt")) == len(ckpt.family.weight_names(ckpt.arch))


def test_prepare_reports_missing_or_broken_corpus(tmp_path):
    pytest.importorskip("torch")
    from engine.train.trainer import TrainConfig, prepare

    with pytest.raises(SystemExit, match="not found; build the corpus first"):
        prepare(tmp_path, tmp_path / "run", TrainConfig())
    (tmp_path / "train.jsonl").write_text("{broken\n")
    (tmp_path / "heldout.jsonl").write_text("")
    with pytest.raises(SystemExit, match="unreadable corpus"):
        prepare(tmp_path, tmp_path / "run", TrainConfig())
