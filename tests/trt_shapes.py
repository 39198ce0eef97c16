"""The input shapes a real engine sends its two graphs, recorded at its ONNX Runtime sessions: what every
TensorRT profile set (the provider's, :mod:`engine.backends.tensorrt_ep`, and the native engines',
:mod:`engine.backends.tensorrt`) must hold."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from engine import Engine, SamplingParams

TEXT = (Path(__file__).resolve().parents[1] / "engine" / "sampler.py").read_text()
MERGED_ROWS = 8
"""The merged batch rows the workload allows (its three documents' candidates fit)."""


class ShapeRecorder:
    """An ONNX Runtime session with the shape of every input it is fed written down."""

    def __init__(self, session: Any, seen: list[dict[str, tuple[int, ...]]]) -> None:
        self.session, self.seen = session, seen
        self.gate: threading.Barrier | None = None
        """When set, each call waits there first (lines concurrent requests up)."""

    def run(self, outputs: Any, feed: dict[str, np.ndarray], *args: Any) -> Any:
        self.seen.append({name: tuple(np.shape(value)) for name, value in feed.items()})
        if self.gate is not None:
            self.gate.wait(timeout=60)
        return self.session.run(outputs, feed, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def record_shapes(folder: Path) -> dict[str, list[dict[str, tuple[int, ...]]]]:
    """Per graph, the input shapes of every call of a varied workload on ``folder`` (CPU): full and partial
    context passes with healing and several candidates, a small file, the cached span, and merged steps of three
    documents at once."""
    engine = Engine.load(folder, backend="cpu")
    seen: dict[str, list[dict[str, tuple[int, ...]]]] = {"context": [], "span_step": []}
    for role in seen:
        engine.denoiser.sessions[role] = ShapeRecorder(engine.denoiser.sessions[role], seen[role])
    for k in range(4):  # typing: a full pass, then partial ones
        engine.complete(TEXT[: 6000 + k], TEXT[6100:9000], SamplingParams(lengths=(4, 8, 16)), reuse="doc", heal=True)
    engine.complete(TEXT[:30], TEXT[30:45], SamplingParams(lengths=(4,)))  # a small file: a short window
    engine.complete(TEXT[:900], TEXT[900:1500], SamplingParams(lengths=(8, 32), cached_span=True, threshold=1.0,
                                                                 tokens_per_step=2))
    engine.batch_requests(max_rows=MERGED_ROWS)
    # three documents at once: their context passes wait for each other, so their span steps queue together
    engine.denoiser.sessions["context"].gate = threading.Barrier(3)
    merged = SamplingParams(lengths=(4, 8), threshold=1.0, tokens_per_step=1)
    threads = [threading.Thread(target=engine.complete, args=(TEXT[: 2000 * i], TEXT[2000 * i : 2000 * i + 500],
                                                              merged))
               for i in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.denoiser.sessions["context"].gate = None
    # merged steps were among them: these three requests' steps are 9 wide (the 8-token candidate and its anchor)
    # and each has at most 2 rows, so a 9-wide step of 3 or more rows holds two requests or more
    assert any(f["span_ids"][1] == 9 and f["span_ids"][0] >= 3 for f in seen["span_step"]), \
        [f["span_ids"] for f in seen["span_step"]]
    return seen
