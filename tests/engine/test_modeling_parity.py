"""Our bidirectional Qwen2 against Hugging Face transformers' Qwen2 with a full (non-causal) mask.

Tolerance: 1e-4 absolute on logits of magnitude ~1-10 (float32 on the CPU; the
two implementations order their reductions differently, seen ~1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine.checkpoint import Checkpoint  # noqa: E402
from engine.modeling import load_transformer  # noqa: E402
from engine.tiny import write_random_checkpoint  # noqa: E402
from references import LOGIT_ATOL, hf_bidirectional_logits  # noqa: E402

@pytest.mark.parametrize(
    "kwargs",
    [
        dict(tie_word_embeddings=True, num_heads=4, num_kv_heads=2),
        dict(tie_word_embeddings=False, num_heads=4, num_kv_heads=4, shards=3),
        dict(tie_word_embeddings=False, num_heads=8, num_kv_heads=1, hidden_size=64, rope_theta=1e6),
    ],
    ids=["tied-gqa", "untied-mha-sharded", "mqa-theta1e6"],
)
def test_logits_match_transformers_qwen2(tmp_path, kwargs, hf_reference):
    ckpt = Checkpoint.open(write_random_checkpoint(tmp_path / "c", seed=7, **kwargs))
    ours = load_transformer(ckpt)
    ref = hf_reference(ckpt)
    ids = torch.randint(0, ckpt.arch.vocab_size, (2, 45), generator=torch.Generator().manual_seed(0))
    expected = hf_bidirectional_logits(ref, ids)
    with torch.no_grad():
        got = ours(ids)
    assert got.shape == expected.shape
    assert expected.abs().max() > 1.0  # distributions are not trivially flat
    assert torch.allclose(got, expected, atol=LOGIT_ATOL), (got - expected).abs().max()


def test_attention_is_bidirectional(tiny_checkpoint):
    """Changing a later token changes the logits at an earlier position (it would not under a causal mask)."""
    model = load_transformer(Checkpoint.open(tiny_checkpoint))
    ids = torch.arange(20)[None] % model.arch.vocab_size
    changed = ids.clone()
    changed[0, 15] = (changed[0, 15] + 1) % model.arch.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert (a[0, 3] - b[0, 3]).abs().max() > 1e-4


def test_span_step_over_cache_equals_full_forward(tiny_checkpoint):
    """With the same window, cached context + span step == one full forward at the span rows,
    and so do the context pass's outputs at those rows (the sampler's first step).

    For the shifted dream family the span input starts one position early (the last
    prefix token), so output row j is the distribution of span slot j.
    """
    from engine.modeling import summarize, suppress_vector

    ckpt = Checkpoint.open(tiny_checkpoint)
    model = load_transformer(ckpt)
    rng = np.random.default_rng(3)
    p, m, s = 11, 6, 9
    window = torch.as_tensor(rng.integers(0, ckpt.arch.vocab_size, p + m + s))[None]
    positions = torch.arange(p + m + s)[None]
    span_rows = torch.arange(p - 1, p + m)  # last prefix token + span
    keep = torch.as_tensor([i for i in range(p + m + s) if i not in set(span_rows.tolist())])
    suppress = suppress_vector(ckpt.arch.vocab_size, [ckpt.token_ids.mask])
    with torch.no_grad():
        keys, values, *first_step = model.encode_context(window, positions, keep, span_rows, suppress, 2)
        ids, probs, entropy = model.span_step(
            window[:, span_rows], positions[:, span_rows], torch.ones(1, m + 1, dtype=torch.bool),
            model.rotate_cache_keys(keys, keep[None]), values, suppress, 2,
        )
        ref_ids, ref_probs, ref_entropy = summarize(model(window)[:, span_rows], suppress, 2)
    # the span step over the cache, and the context pass's own outputs at the span rows
    for got_ids, got_probs, got_entropy in ((ids, probs, entropy), first_step):
        assert torch.equal(got_ids, ref_ids)
        assert torch.allclose(got_probs, ref_probs, atol=1e-5)
        assert torch.allclose(got_entropy, ref_entropy, atol=1e-4)
