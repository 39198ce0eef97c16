"""Training data for the default model: tokenizer, token streams and infilling-aware masking.

Two kinds of training example, mixed in every batch:

* **span** (fill-in-the-middle, what the editor asks for): a middle is cut out of
  a file at the *text* level (a whole line, the rest of a line, a few lines, a
  block body, or a random span), then prefix, middle and suffix are tokenized
  separately, exactly as the engine tokenizes them at inference. The middle sits
  in a slot of one of the engine's candidate lengths (or a few tokens longer than
  the middle), its tail padded with EOS, so the model learns where a middle of
  unknown length ends. A random share of the slot (at least one token) is masked.
* **random**: a window of the token stream with each token masked with
  probability ``t ~ U(0.05, 1)``, the classic masked diffusion objective.

Both are in the dream family's shifted convention: the target of position i is
predicted from the hidden state at i - 1.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.sampler import MULTI_LINE_LENGTHS
from engine.tiny import BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, train_bpe_tokenizer

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

SPECIAL_TOKENS = [EOS_TOKEN, MASK_TOKEN, BOS_TOKEN]
IGNORE = -100


@dataclass(frozen=True)
class SpecialIds:
    """Token ids of the special tokens (fixed by their order in :data:`SPECIAL_TOKENS`)."""

    eos: int = 0
    mask: int = 1
    bos: int = 2


def read_texts(path: Path) -> list[str]:
    """The ``text`` field of every line of a corpus JSONL file."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def train_tokenizer(texts: list[str], vocab_size: int, sample_bytes: int = 40_000_000) -> HFTokenizer:
    """Byte-level BPE on a deterministic sample of the training texts (every k-th file, ~``sample_bytes``)."""
    stride = max(1, sum(map(len, texts)) // sample_bytes)
    tokenizer = train_bpe_tokenizer(texts[::stride], vocab_size, SPECIAL_TOKENS)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, "special tokens must take the first ids"
    return tokenizer


def encode_stream(tokenizer: HFTokenizer, texts: list[str]) -> np.ndarray:
    """All texts as one uint16 stream, each document preceded by BOS."""
    ids = [np.array([SpecialIds.bos], np.uint16)]
    for start in range(0, len(texts), 256):
        for enc in tokenizer.encode_batch(texts[start : start + 256], add_special_tokens=False):
            ids.append(np.array([*enc.ids, SpecialIds.bos], np.uint16))
    return np.concatenate(ids)


def bytes_per_token(tokenizer: HFTokenizer, texts: list[str]) -> float:
    """UTF-8 bytes per token of ``texts``."""
    n_bytes = sum(len(t.encode()) for t in texts)
    n_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    return n_bytes / max(1, n_tokens)


_BLOCK_OPENER = re.compile(r":\s*(#.*)?$")


def choose_middle(text: str, rng: np.random.Generator) -> tuple[int, int, str] | None:
    """Character range [start, end) of a middle to cut out of ``text``, and its kind."""
    lines = text.splitlines(keepends=True)
    starts = np.cumsum([0] + [len(line) for line in lines])
    content = [i for i, line in enumerate(lines) if line.strip()]
    if not content:
        return None
    kind = rng.choice(["line", "rest_of_line", "lines", "block", "random"], p=[0.35, 0.2, 0.15, 0.15, 0.15])
    if kind == "line":
        i = int(rng.choice(content))
        return int(starts[i]), int(starts[i + 1]), "line"
    if kind == "rest_of_line":
        i = int(rng.choice(content))
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        stripped_end = len(line.rstrip("\n"))
        if stripped_end - indent < 2:
            return int(starts[i]), int(starts[i + 1]), "line"
        cut = int(rng.integers(indent, stripped_end))
        return int(starts[i]) + cut, int(starts[i + 1]), "rest_of_line"
    if kind == "lines":
        i = int(rng.choice(content))
        n = int(rng.integers(2, 6))
        j = min(len(lines), i + n)
        return int(starts[i]), int(starts[j]), "lines"
    if kind == "block":
        openers = [i for i in content if _BLOCK_OPENER.search(lines[i].rstrip("\n")) and i + 1 < len(lines)]
        if openers:
            i = int(rng.choice(openers))
            base = len(lines[i]) - len(lines[i].lstrip())
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > base):
                j += 1
            while j > i + 1 and not lines[j - 1].strip():
                j -= 1
            if j > i + 1:
                return int(starts[i + 1]), int(starts[j]), "block"
    a = int(rng.integers(0, max(1, len(text) - 5)))
    b = min(len(text), a + int(rng.integers(5, 200)))
    return a, b, "random"


class Batcher:
    """Makes training batches: ``input_ids``, ``targets`` (IGNORE where no loss) and ``valid`` (B, W)."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        texts: list[str],
        stream: np.ndarray,
        window: int,
        span_share: float = 0.5,
        max_middle: int = 64,
    ) -> None:
        self.tokenizer = tokenizer
        self.texts = texts
        self.weights = np.array([len(t) for t in texts], np.float64)
        self.weights /= self.weights.sum()
        self.stream = stream
        self.window = window
        self.span_share = span_share
        self.max_middle = min(max_middle, window // 2)  # leave room for context
        self.ids = SpecialIds()

    def batch(self, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One batch of ``size`` examples."""
        spans = [self._span(rng) if rng.random() < self.span_share else None for _ in range(size)]
        rows = [r if r is not None else self._random(rng) for r in spans]
        return {key: np.stack([r[key] for r in rows]) for key in ("input_ids", "targets", "valid")}

    def _random(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        w = self.window
        start = int(rng.integers(0, len(self.stream) - w))
        ids = self.stream[start : start + w].astype(np.int64)
        t = rng.uniform(0.05, 1.0)
        masked = rng.random(w) < t
        masked[0] = False
        if not masked.any():
            masked[int(rng.integers(1, w))] = True
        return self._finish(ids, masked, np.ones(w, bool))

    def _span(self, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        for _ in range(4):
            text = self.texts[int(rng.choice(len(self.texts), p=self.weights))]
            picked = choose_middle(text, rng)
            if picked is None:
                continue
            a, b, _kind = picked
            lo = max(0, a - 6 * self.window)
            hi = min(len(text), b + 3 * self.window)
            prefix, middle, suffix = text[lo:a], text[a:b], text[b:hi]
            p, m, s = (e.ids for e in self.tokenizer.encode_batch([prefix, middle, suffix], add_special_tokens=False))
            if not m or len(m) > self.max_middle:
                continue
            if rng.random() < 0.5:
                slot = min(self.max_middle, next((n for n in MULTI_LINE_LENGTHS if n >= len(m)), len(m)))
            else:
                slot = min(self.max_middle, len(m) + int(rng.integers(0, 9)))
            room = self.window - slot - 1
            keep_s = min(len(s), max(room - len(p), int(rng.integers(room // 8, room // 2 + 1))))
            keep_p = min(len(p), room - keep_s)
            at_start = lo == 0 and keep_p == len(p)
            head = ([self.ids.bos] if at_start else []) + p[len(p) - keep_p :]
            if not head:  # a shifted model needs a position before the slot
                head = [self.ids.bos]
            targets_slot = m + [self.ids.eos] * (slot - len(m))
            ids = np.array(head + targets_slot + s[:keep_s], np.int64)
            masked = np.zeros(len(ids), bool)
            slot_mask = rng.random(slot) < rng.uniform(0.1, 1.0)
            if not slot_mask.any():
                slot_mask[int(rng.integers(0, slot))] = True
            masked[len(head) : len(head) + slot] = slot_mask
            valid = np.ones(self.window, bool)
            if len(ids) < self.window:
                pad = self.window - len(ids)
                valid[len(ids) :] = False
                ids = np.concatenate([ids, np.full(pad, self.ids.eos, np.int64)])
                masked = np.concatenate([masked, np.zeros(pad, bool)])
            return self._finish(ids, masked, valid)
        return None

    def _finish(self, ids: np.ndarray, masked: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
        """Shifted targets: row i of the output predicts token i + 1."""
        inputs = np.where(masked, self.ids.mask, ids)
        targets = np.full(len(ids), IGNORE, np.int64)
        targets[:-1] = np.where(masked[1:], ids[1:], IGNORE)
        return {"input_ids": inputs, "targets": targets, "valid": valid}
