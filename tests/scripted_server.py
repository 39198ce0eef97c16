"""The real language server with a scripted model, for deterministic end-to-end tests.

    python tests/scripted_server.py [dlm-lsp arguments]      # DLM_TEST_SCRIPT='{"text": "a + b\\n", "p": 0.9}'
    python tests/scripted_server.py --serve [dlm-serve arguments]

Everything is the production server (``dlm_lsp.cli.main``: pygls, settings, the
completion service, context, engine facade, sampler, post-processing, gate); only
the *model* is replaced: :class:`ScriptedModel` "believes" that the middle is
``text`` (tokenized with the shipped model's tokenizer), every token with
probability ``p``, then end-of-text; its first ``failures`` model calls of real requests raise. The engine folder, tokenizer and window are
the shipped model's, so the rest of the stack runs unchanged. Use
``tokenHealing: false`` with it: the script does not adapt to a healed prefix.
The cached decoding path only: ``full`` (the exact reference mode) would need the
script shifted to the span's first row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import Engine  # noqa: E402 - after the path setup
from engine.backends.base import ModelInfo, StepOutput  # noqa: E402


class ScriptedModel:
    """A denoiser whose every span slot ``j`` predicts the ``j``-th token of the script."""

    def __init__(self, info: ModelInfo, ids: list[int], probability: float, failures: int = 0) -> None:
        self.info = dataclasses.replace(info, backend="scripted", device="test double")
        self.ids = ids
        self.probability = probability
        self.failures = failures
        self.busy = False
        """Model calls that raise (a runtime error inside the engine, mid-request) before calls work again."""

    def _out(self, rows: int, width: int) -> StepOutput:
        eos = self.info.token_ids.eos
        script = (self.ids + [eos] * width)[:width]
        ids = np.zeros((rows, width, 2), np.int64)
        ids[:, :, 0] = script
        ids[:, :, 1] = eos
        probs = np.zeros((rows, width, 2), np.float32)
        probs[:, :, 0] = self.probability
        probs[:, :, 1] = (1 - self.probability) / 2
        return StepOutput(ids, probs, np.full((rows, width), 1.0, np.float32))

    def _maybe_fail(self) -> None:
        if self.failures > 0 and self.busy:
            self.failures -= 1
            raise RuntimeError("injected failure inside the model")

    def encode_context(self, input_ids: Any, positions: Any, cache_index: Any, span_index: Any) -> tuple[object, StepOutput]:
        self.busy = input_ids.shape[-1] > len(span_index) + 2  # a real request, not the load's warm-up run
        self._maybe_fail()
        return object(), self._out(1, len(span_index))

    def step(self, cache: Any, span_ids: Any, span_pos: Any, span_valid: Any, cache_pos: Any) -> StepOutput:
        self._maybe_fail()
        return self._out(span_ids.shape[0], span_ids.shape[1])

    def full(self, input_ids: Any, positions: Any, valid: Any) -> StepOutput:
        return self._out(input_ids.shape[0], input_ids.shape[1])


def install_script() -> None:
    """Make ``Engine.load`` return the shipped model's engine with a :class:`ScriptedModel` inside."""
    script = json.loads(os.environ.get("DLM_TEST_SCRIPT", '{"text": ""}'))
    real_load = Engine.load

    def load(cls: type[Engine], path: Any, backend: str = "auto", **kwargs: Any) -> Engine:
        engine = real_load(path, "cpu", **kwargs)
        ids = engine.tokenizer.encode(script["text"])
        engine.denoiser = ScriptedModel(engine.denoiser.info, ids, float(script.get("p", 0.95)), int(script.get("failures", 0)))
        return engine

    Engine.load = classmethod(load)  # type: ignore[method-assign, assignment]


if __name__ == "__main__":
    install_script()
    if sys.argv[1:2] == ["--serve"]:  # dlm-serve (the HTTP APIs) instead of the language server
        from dlm_lsp.http.cli import main as serve

        sys.exit(serve(sys.argv[2:]))
    from dlm_lsp.cli import main

    sys.exit(main(sys.argv[1:]))
