"""Engine: tokenizer + denoiser + sampler behind one call.

``Engine.load(folder, backend)`` opens an engine folder (written by ``dlm-convert``)
on ONNX Runtime, or, with ``backend="torch"``, a Hugging Face checkpoint folder on
the PyTorch reference. ``Engine.complete(prefix, suffix, params, stop=...)``
returns a :class:`Completion`.

Window policy: prefix + BOS + the longest candidate span + suffix must fit the
model's ``max_positions``. Explicit token budgets are applied first; what still
does not fit is cut from the *far* ends (the start of the prefix, the end of the
suffix), the suffix keeping at most a quarter of the room when both are long.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.backends.base import BACKENDS, Denoiser, ModelInfo, StepOutput, onnxruntime_providers
from engine.errors import BackendUnavailableError, CheckpointError, InputError, ManifestError
from engine.healing import Healing
from engine.manifest import Manifest, is_engine_folder, read_manifest
from engine.reuse import ContextStore
from engine.sampler import SamplingParams, denoise
from engine.scheduler import MAX_ROWS, StepObserver, StepScheduler
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CACHED_SPAN_LENGTH = 32
"""Runs whose longest candidate is at least this long compute only the masked rows at each step by default
(:class:`engine.sampler.SamplingParams` ``cached_span``): measured in docs/engine.md, "Cached span" (64-token
middles 11-21 % faster at the 0.5B shape and 21-25 % for the shipped model's multi-line candidates, a
10-token single line no faster; edit similarity unchanged)."""

CHARS_PER_TOKEN_LIMIT = 16
"""Text longer than window x this many characters is cut before tokenizing (see :meth:`Engine._encode_tail`)."""


@dataclass
class Completion:
    """The middle the engine chose, what it fed the model, and how it got there."""

    text: str
    """The middle as text (end tokens stripped; with token healing, without the healed text)."""
    middle_ids: list[int]
    confidence: list[float]
    """Top-1 probability of each middle token when it was committed (1.0 for healed text the model did not choose)."""
    input_ids: list[int]
    """The window fed to the model for the chosen length: [BOS] prefix, masks, suffix."""
    cut: bool
    """True when the budget or the stop callback ended denoising early (text is the committed part)."""
    prefix_tokens_dropped: int
    """Prefix tokens cut to fit the window (of the tokenized part: text far beyond the window is not tokenized)."""
    suffix_tokens_dropped: int
    stats: dict[str, Any] = field(default_factory=dict)
    token_ends: list[int] = field(default_factory=list)
    """For each middle token, where its text ends in :attr:`text` (0 for tokens inside the healed text; a token
    holding part of a character ends before that character)."""
    healed: str = ""
    """Text removed from the end of the prefix and written again by the first middle tokens (token healing)."""
    healed_tokens: int = 0
    """Leading middle tokens wholly inside :attr:`healed` (the user's text, not a suggestion)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``dlm-complete --json``)."""
        return {
            "text": self.text,
            "middle_ids": self.middle_ids,
            "confidence": [round(c, 6) for c in self.confidence],
            "input_ids": self.input_ids,
            "cut": self.cut,
            "prefix_tokens_dropped": self.prefix_tokens_dropped,
            "suffix_tokens_dropped": self.suffix_tokens_dropped,
            "stats": self.stats,
            "token_ends": self.token_ends,
            "healed": self.healed,
            "healed_tokens": self.healed_tokens,
        }


class Engine:
    """A loaded model ready to fill in middles."""

    def __init__(self, denoiser: Denoiser, tokenizer: Tokenizer, path: Path) -> None:
        self.denoiser = denoiser
        self.tokenizer = tokenizer
        self.path = path
        self.scheduler: StepScheduler | None = None
        """Set by :meth:`batch_requests`: concurrent :meth:`complete` calls then share their steps."""
        self.contexts: ContextStore | None = ContextStore() if getattr(denoiser, "reuses_context", False) else None
        """The last context pass of each document, for :meth:`complete`'s ``reuse`` (None: the graphs
        cannot take prior context, an engine folder of format 2)."""

    def batch_requests(self, max_rows: int = MAX_ROWS, on_step: StepObserver | None = None, lanes: int = 1) -> None:
        """From now on, concurrent :meth:`complete` calls (from several threads) run their denoising
        steps as one forward pass per round (:mod:`engine.scheduler`; ``lanes`` scheduler threads);
        for a server of many clients. ``on_step(requests, rows)`` is told the size of each merged pass."""
        self.scheduler = StepScheduler(self.denoiser, max_rows=max_rows, on_step=on_step, lanes=lanes)

    @property
    def reuses_context(self) -> bool:
        """Whether :meth:`complete`'s ``reuse`` can reuse context (format 3 graphs, the torch reference)."""
        return self.contexts is not None and bool(getattr(self.denoiser, "reuses_context", False))

    @property
    def merges_requests(self) -> bool:
        """Whether the graphs run several requests' span steps as one forward pass (format 3 folders)."""
        return bool(getattr(self.denoiser, "merges_contexts", hasattr(self.denoiser, "step_many")))

    @cached_property
    def line_break_ids(self) -> frozenset[int]:
        """Ids whose text holds a line break (computed on first use: every id decoded once)."""
        return self.tokenizer.ids_containing("\n")

    @property
    def info(self) -> ModelInfo:
        """Family, architecture, token ids, precision, backend and device."""
        return self.denoiser.info

    @classmethod
    def load(
        cls,
        path: str | Path,
        backend: str = "auto",
        *,
        family: str | None = None,
        threads: int | None = None,
        verify: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> "Engine":
        """Load an engine folder (any backend but ``torch``) or a checkpoint folder (``torch`` only).

        ``tensorrt`` runs the folder's native TensorRT engines for this GPU, building them
        first when there are none (minutes; ``progress`` hears how it goes); ``auto`` uses
        such engines when they are already built, else ONNX Runtime (CUDA, else the CPU).

        An engine folder is checked before anything in it runs: its paths stay inside
        it, its architecture is within bounds and, once loaded, matches its graphs'
        shapes; ``verify`` adds every file's size and sha256; a catalog model's
        folder must also hold the very manifest its pull recorded
        (:func:`engine.manifest.read_manifest`, :func:`engine.catalog.recorded_manifest_sha256`).
        """
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise CheckpointError(f"model folder {folder} does not exist")
        if backend == "torch":
            from engine.backends.torch_ref import TorchDenoiser
            from engine.checkpoint import Checkpoint

            if is_engine_folder(folder) and not (folder / "config.json").is_file():
                raise InputError(
                    f"{folder} is an engine folder (ONNX graphs); the torch backend runs a checkpoint folder"
                )
            checkpoint = Checkpoint.open(folder, family)
            return cls(TorchDenoiser(checkpoint), checkpoint.tokenizer, folder)
        if not is_engine_folder(folder):
            if (folder / "config.json").is_file():
                raise CheckpointError(
                    f"{folder} is a checkpoint folder, not an engine folder: convert it first with "
                    f"`dlm-convert {folder} OUT` and load OUT (or use backend 'torch' for the slow reference)"
                )
        manifest = _read_engine_manifest(folder, verify)
        from engine.backends import tensorrt
        from engine.backends.onnxruntime import OnnxRuntimeDenoiser

        denoiser: Denoiser | None = None
        if backend == "tensorrt":
            denoiser = tensorrt.load_denoiser(folder, manifest, build=True, progress=progress)
        elif backend == "auto" and tensorrt.built_any(folder):
            try:  # engines built for some GPU: this one's are used if they are there; auto never builds
                denoiser = tensorrt.load_denoiser(folder, manifest, build=False, progress=progress)
            except (BackendUnavailableError, ManifestError, OSError) as exc:
                log.info("backend auto: not the native TensorRT engines (%s)", exc)
        if denoiser is None:
            _, chosen = onnxruntime_providers(backend)  # auto: CUDA when present, else the CPU (said once)
            if chosen == "cuda":
                denoiser = _cuda_denoiser(folder, manifest, threads)
            if denoiser is None:
                denoiser = OnnxRuntimeDenoiser(folder, manifest, backend=chosen, threads=threads, keep_optimized=True)
        return cls(denoiser, Tokenizer(folder / manifest.tokenizer), folder)

    def resolved(self, params: SamplingParams) -> SamplingParams:
        """``params`` with what it leaves to the engine decided: ``cached_span`` (None) is on when a
        candidate is at least :data:`CACHED_SPAN_LENGTH` tokens long and the context graph takes prior
        context, unless the span steps are merged with other requests' (:meth:`batch_requests`, where
        one pass serves them all) or the run is exact."""
        if params.cached_span is not None:
            return params
        on = (max(params.lengths) >= CACHED_SPAN_LENGTH and self.reuses_context and self.scheduler is None
              and not params.exact)
        return replace(params, cached_span=on)

    def complete(
        self,
        prefix: str,
        suffix: str,
        params: SamplingParams | None = None,
        *,
        stop: Callable[[], bool] | None = None,
        max_prefix_tokens: int | None = None,
        max_suffix_tokens: int | None = None,
        document_start: bool = True,
        heal: bool = False,
        reuse: str | None = None,
    ) -> Completion:
        """Fill the middle between ``prefix`` and ``suffix``.

        ``stop`` is polled between denoising steps; returning True ends the run
        with the committed part (``cut=True``), as does ``params.budget_ms``.
        ``document_start`` says whether ``prefix`` begins where the document does
        (then, if the window keeps all of it, BOS goes first). ``heal`` backs the
        prefix up by its last token and has the middle write it again
        (:mod:`engine.healing`); the returned text starts after it. ``reuse`` names the
        document: its previous request's context pass is reused where it still holds
        (:mod:`engine.reuse`; stats ``context_reused`` and ``context_computed``).
        """
        params = self.resolved(params or SamplingParams())
        start = time.perf_counter()
        tok = self.info.token_ids
        prefix_ids = self._encode_tail(prefix)
        suffix_ids = self._encode_head(suffix)
        healing = self._healing(prefix, prefix_ids) if heal else None
        if healing is not None:
            prefix_ids = prefix_ids[:-1]
        tokenize_ms = (time.perf_counter() - start) * 1000
        prefix_ids, suffix_ids, dropped_p, dropped_s = self._fit_window(
            prefix_ids, suffix_ids, max(params.lengths), max_prefix_tokens, max_suffix_tokens
        )
        if document_start and dropped_p == 0 and tok.bos is not None:
            prefix_ids = [tok.bos, *prefix_ids]  # the window starts where the document does
        elif not prefix_ids and self.info.arch.shifted:
            prefix_ids = [tok.eos]  # a shifted model predicts slot 0 from the position before it
        breaks = self.line_break_ids if params.stop_at_line_break else frozenset()
        encoder = None
        denoiser = self.denoiser
        if reuse is not None and self.contexts is not None and self.reuses_context and not params.exact:
            store, anchor, span = self.contexts, 1 if self.info.arch.shifted else 0, max(params.lengths)
            p_ids, s_ids = np.asarray(prefix_ids, np.int64), np.asarray(suffix_ids, np.int64)

            def encoder() -> tuple[Any, StepOutput, dict[str, Any]]:
                return store.encode(denoiser, reuse, p_ids, s_ids, span, anchor, tok.mask)

        result = denoise(self.denoiser, prefix_ids, suffix_ids, params, stop=stop, line_break_ids=breaks, healing=healing,
                         scheduler=self.scheduler, encoder=encoder)
        t0 = time.perf_counter()
        removed = healing.removed if healing is not None else ""
        text, token_ends, healed_tokens = self._decode_middle(result.ids, removed)
        stats = dict(result.stats)
        stats.update(
            {
                "tokenize_ms": tokenize_ms,
                "decode_ms": (time.perf_counter() - t0) * 1000,
                "total_ms": (time.perf_counter() - start) * 1000,
                "middle_tokens": len(result.ids),
                "context_tokens": len(prefix_ids) + len(suffix_ids),
                "backend": self.info.backend,
                "exact": params.exact,
                "healed": removed,
            }
        )
        length = result.candidates[result.chosen].length
        return Completion(
            text=text,
            middle_ids=result.ids,
            confidence=result.confidence,
            input_ids=[*prefix_ids, *([tok.mask] * length), *suffix_ids],
            cut=result.cut,
            prefix_tokens_dropped=dropped_p,
            suffix_tokens_dropped=dropped_s,
            stats=stats,
            token_ends=token_ends,
            healed=removed,
            healed_tokens=healed_tokens,
        )

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        tok = self.info.token_ids
        return frozenset(i for i in (tok.mask, tok.bos, tok.eos, tok.pad, *tok.end_ids) if i is not None)

    def _token_text(self, token: int) -> str:
        """Text of one id; special tokens have none."""
        return "" if token in self._special_ids else self.tokenizer.decode([token])

    def _healing(self, prefix: str, prefix_ids: list[int]) -> Healing | None:
        """The healing of ``prefix``'s last token, or None when there is nothing to heal.

        Nothing is healed when the prefix is empty or its last token's text is not
        the literal end of the prefix (a byte-level piece of a longer character).
        """
        if not prefix_ids:
            return None
        removed = self._token_text(prefix_ids[-1])
        if not removed or not prefix.endswith(removed):
            return None
        return Healing(removed, self._token_text, self.tokenizer.encode)

    def _decode_middle(self, ids: list[int], removed: str) -> tuple[str, list[int], int]:
        """The middle's text after the healed part, where each token's text ends in it, and how
        many leading tokens lie wholly inside the healed part.

        A token holding only some bytes of a character ends where the last whole
        character before it does: the character belongs to the token that completes
        it. A middle whose text does not start with ``removed`` (healing cut short
        by the budget or a one-token span) has nothing to show: its text is empty.
        """
        text = self.tokenizer.decode(ids)
        if not text.startswith(removed):
            return "", [0] * len(ids), len(ids)
        text = text[len(removed) :]
        decoded = [self.tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
        whole = [len(d.rstrip("\ufffd")) for d in decoded]
        ends = [min(len(text), max(0, n - len(removed))) for n in whole]
        healed_tokens = 0
        while removed and healed_tokens < len(ids) and len(decoded[healed_tokens]) <= len(removed) \
                and not decoded[healed_tokens].endswith("\ufffd"):
            healed_tokens += 1
        return text, ends, healed_tokens

    def _char_limit(self) -> int:
        """Characters surely enough to fill the window: the text beyond is never tokenized."""
        return self.info.window * CHARS_PER_TOKEN_LIMIT

    def _encode_tail(self, text: str) -> list[int]:
        """Token ids of ``text``, or of a tail of it long enough to fill the window.

        Tokenizing a whole long file costs milliseconds per request although only
        its last window's worth of tokens is kept. The tail starts at a line break;
        if it yields fewer tokens than the window holds, the whole text is encoded.
        """
        return self._encode_window_part(text, keep_end=True)

    def _encode_head(self, text: str) -> list[int]:
        """Token ids of ``text``, or of a head of it long enough to fill the window (see :meth:`_encode_tail`)."""
        return self._encode_window_part(text, keep_end=False)

    def _encode_window_part(self, text: str, keep_end: bool) -> list[int]:
        """Ids of the tail (``keep_end``) or head of ``text`` cut at a line break, when the text is long."""
        limit = self._char_limit()
        if len(text) <= limit:
            return self.tokenizer.encode(text)
        if keep_end:
            cut = text.find("\n", len(text) - limit) + 1 or len(text) - limit
            part = text[cut:]
        else:
            cut = text.rfind("\n", 0, limit) + 1 or limit
            part = text[:cut]
        ids = self.tokenizer.encode(part)
        return ids if len(ids) >= self.info.window else self.tokenizer.encode(text)

    def _fit_window(
        self,
        prefix_ids: list[int],
        suffix_ids: list[int],
        span: int,
        max_prefix: int | None,
        max_suffix: int | None,
    ) -> tuple[list[int], list[int], int, int]:
        """Truncate prefix (from its start) and suffix (from its end) to fit the model window."""
        room = self.info.window - span - 1  # one position for BOS / the anchor
        if room < 1:
            raise InputError(f"a {span}-token middle does not fit the model's {self.info.window}-position window")
        keep_p = len(prefix_ids) if max_prefix is None else min(len(prefix_ids), max(0, max_prefix))
        keep_s = len(suffix_ids) if max_suffix is None else min(len(suffix_ids), max(0, max_suffix))
        if keep_p + keep_s > room:
            keep_s = min(keep_s, max(room // 4, room - keep_p))
            keep_p = room - keep_s
        p = prefix_ids[len(prefix_ids) - keep_p :] if keep_p else []
        s = suffix_ids[:keep_s]
        return p, s, len(prefix_ids) - len(p), len(suffix_ids) - len(s)


def _cuda_denoiser(folder: Path, manifest: Manifest, threads: int | None) -> Denoiser | None:
    """ONNX Runtime's CUDA provider with the caches on the GPU (:func:`engine.backends.device.ort_device_denoiser`);
    None, and a log line saying why, where cuda-python (the gpu extra) is missing: the provider then runs with
    its inputs and caches copied from the host at every call."""
    from engine.backends import device

    if manifest.format_version < 3:  # no prior context, no merged caches in these graphs: the host path
        return None
    try:
        return device.ort_device_denoiser(folder, manifest, threads)
    except (BackendUnavailableError, ImportError) as exc:
        log.warning("backend cuda: caches stay on the host, copied at every call (%s)", exc)
        return None


def _read_engine_manifest(folder: Path, verify: bool) -> Manifest:
    """The folder's manifest, checked against the checksum its pull recorded when it is a catalog model's."""
    from engine.catalog import recorded_manifest_sha256

    recorded = recorded_manifest_sha256(folder)
    if recorded is None:
        return read_manifest(folder, verify=verify)
    name, expected = recorded
    advice = f"convert it again with: dlm-lsp models pull {name} --force"
    if expected is None:
        raise ManifestError(
            f"{folder} is a catalog model's folder, but no pull recorded its manifest's checksum (converted by "
            f"an older dlm-lsp, or copied there): {advice}"
        )
    try:
        return read_manifest(folder, verify=verify, expected_sha256=expected)
    except ManifestError as exc:
        raise ManifestError(f"{exc} ({name}: {advice})") from exc
