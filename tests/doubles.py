"""Test doubles shared by the sampler tests.

:class:`ScriptedDenoiser` stands in for the *model* (never for the sampler under
test): each span slot has a fixed (token, confidence) the model "believes", and
the double records what it was asked so tests can check the calls too.
"""

from __future__ import annotations

import time

import numpy as np

from engine.backends.base import ModelInfo, StepOutput
from engine.families import ArchConfig, TokenIds

MASK, EOS, VOCAB = 1, 0, 100
ARCH = ArchConfig(
    vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
    rms_norm_eps=1e-6, rope_theta=1e4, max_positions=512, qkv_bias=True, tie_word_embeddings=True, shifted=True,
)


class ScriptedDenoiser:
    """Slot j of a span of length m predicts ``beliefs[m][j]`` = (token, p1, p2, entropy)."""

    def __init__(self, beliefs, delay_s: float = 0.0):  # type: ignore[no-untyped-def]
        self.beliefs = beliefs
        self.delay_s = delay_s
        self.info = ModelInfo("dream", ARCH, TokenIds(mask=MASK, eos=EOS, pad=EOS), "fp32", "scripted", "cpu", 2)
        self.calls: list[tuple[str, np.ndarray]] = []
        self.prefix_len = 0
        self.states: list[np.ndarray] = []
        """Span ids (B, anchor + slots) of every denoising step in turn: the first one, the fully
        masked longest span, is answered by the context pass; the others by span steps."""

    def encode_context(self, input_ids, positions, cache_index, span_index):  # type: ignore[no-untyped-def]
        self.calls.append(("context", input_ids))
        self.prefix_len = int(np.flatnonzero(input_ids == MASK)[0])
        longest = len(span_index) - 1  # the span rows are the anchor and the longest span's slots
        self.states.append(np.asarray(input_ids)[np.asarray(span_index)][None])
        return type("Cache", (), {"length": len(cache_index)})(), self._out([longest], len(span_index), 0)

    def _out(self, rows, width, slot0):  # type: ignore[no-untyped-def]
        ids = np.zeros((len(rows), width, 2), np.int64)
        probs = np.zeros((len(rows), width, 2), np.float32)
        ent = np.zeros((len(rows), width), np.float32)
        for r, m in enumerate(rows):
            for j, (tok, p1, p2, h) in enumerate(self.beliefs[m]):
                ids[r, slot0 + j] = (tok, tok + 1)
                probs[r, slot0 + j] = (p1, p2)
                ent[r, slot0 + j] = h
        time.sleep(self.delay_s)
        return StepOutput(ids, probs, ent)

    def step(self, cache, span_ids, span_pos, span_valid, cache_pos):  # type: ignore[no-untyped-def]
        self.calls.append(("step", span_ids.copy()))
        self.states.append(span_ids.copy())
        rows = [int(v.sum()) - 1 for v in span_valid]  # span length = valid - anchor
        return self._out(rows, span_ids.shape[1], 0)

    def full(self, input_ids, positions, valid):  # type: ignore[no-untyped-def]
        self.calls.append(("full", input_ids.copy()))
        if not self.prefix_len:  # first call: every span slot is still masked
            self.prefix_len = int(np.flatnonzero(input_ids[0] == MASK)[0])
        rows = [int((row == MASK).sum()) for row in input_ids]  # only correct on the first step; fine for tests
        rows = [m if m in self.beliefs else max(self.beliefs) for m in rows]
        return self._out(rows, input_ids.shape[1], self.prefix_len - 1 if self.prefix_len else 0)


def beliefs(*slots):  # type: ignore[no-untyped-def]
    return [(tok, p, p / 2, 1.0 - p) for tok, p in slots]
