"""Independent reference computations the parity tests compare our engine with (transformers-based).

Tolerance: 1e-4 absolute on logits of magnitude ~1-10 (float32 on the CPU; the
two implementations order their reductions differently, seen ~1e-5).
"""

from __future__ import annotations

import pytest

from engine.checkpoint import Checkpoint

LOGIT_ATOL = 1e-4


def hf_bidirectional_logits(model, ids):  # type: ignore[no-untyped-def]
    """Logits of a transformers model with every position attending to every position."""
    torch = pytest.importorskip("torch")
    batch, length = ids.shape
    full = torch.zeros(batch, 1, length, length)  # additive mask: every position sees every position
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=full).logits


def textbook_decode(hf_reference, checkpoint_dir, prefix_ids, suffix_ids, length):  # type: ignore[no-untyped-def]
    """Reference masked-diffusion decoding written independently with transformers' model of the family.

    Whole window every step, shifted logits for a shifted family (slot i read
    from position i-1, else from i), the mask token and ids no token has
    excluded, one token per step: the masked slot whose argmax probability is
    highest. The first committed end token ends the middle (every later slot
    becomes EOS), as the engine documents.
    """
    torch = pytest.importorskip("torch")

    ckpt = Checkpoint.open(checkpoint_dir)
    model = hf_reference(ckpt)
    shift = 1 if ckpt.arch.shifted else 0
    never = [ckpt.token_ids.mask, *ckpt.tokenizer.unassigned_ids(ckpt.arch.vocab_size)]
    mask, eos = ckpt.token_ids.mask, ckpt.token_ids.eos
    window = list(prefix_ids) + [mask] * length + list(suffix_ids)
    start = len(prefix_ids)
    while any(t == mask for t in window[start : start + length]):
        ids = torch.tensor([window])
        full = torch.zeros(1, 1, len(window), len(window))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=full).logits[0]
        logits[:, never] = -float("inf")
        probs = logits.softmax(-1)
        best = None
        for slot in range(length):
            if window[start + slot] == mask:
                p, tok = probs[start + slot - shift].max(-1)
                if best is None or p.item() > best[0]:
                    best = (p.item(), slot, int(tok))
        _, slot, tok = best
        window[start + slot] = tok
        if tok in ckpt.token_ids.end_ids:
            for later in range(slot + 1, length):
                window[start + later] = eos
    middle = window[start : start + length]
    ends = [i for i, t in enumerate(middle) if t in ckpt.token_ids.end_ids]
    return middle[: ends[0]] if ends else middle
