"""CompletionService on a real tiny engine: what ``$/cancelRequest`` does to a running request.

pygls turns ``$/cancelRequest`` into cancelling the handler's asyncio task; the
service must then stop the denoising loop at its next step (not let it run on).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from dlm_lsp.completion import CompletionService
from dlm_lsp.settings import Settings
from dlm_lsp.status import Metrics

TEXT = "def greet(name):\n    message = \n"


@pytest.mark.asyncio
async def test_task_cancellation_stops_the_engine(tiny_engine):
    from engine import Engine

    engine = Engine.load(tiny_engine, backend="cpu")
    steps_seen = []
    original = engine.denoiser.step

    def counting_step(*args):  # type: ignore[no-untyped-def]
        steps_seen.append(time.perf_counter())
        return original(*args)

    engine.denoiser.step = counting_step  # observe the real denoiser, do not replace it
    settings = Settings(confidence_threshold=1.0, multiline="always", max_middle_tokens=512,
                        length_candidates=(512,), latency_budget_ms=60_000, debounce_ms=0)
    service = CompletionService(Metrics())
    task = asyncio.ensure_future(service.complete(
        engine, "file:///x.py", TEXT, TEXT.index("= ") + 2, "python", settings,
        version=1, current_version=lambda: 1, automatic=False,
    ))
    while len(steps_seen) < 3:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.3)  # let the worker thread notice
    settled = len(steps_seen)
    await asyncio.sleep(0.3)
    assert len(steps_seen) == settled  # the loop has stopped
    assert settled < 512  # long before the middle was done
    assert service.metrics.cancelled == 1


@pytest.mark.asyncio
async def test_debounce_drops_superseded_automatic_requests(tiny_engine):
    from engine import Engine

    engine = Engine.load(tiny_engine, backend="cpu")
    settings = Settings(debounce_ms=150, length_candidates=(4,))
    service = CompletionService(Metrics())
    offset = TEXT.index("= ") + 2

    def request():  # type: ignore[no-untyped-def]
        return service.complete(engine, "file:///x.py", TEXT, offset, "python", settings,
                                version=1, current_version=lambda: 1, automatic=True)

    first = asyncio.ensure_future(request())
    await asyncio.sleep(0.02)
    second = await request()
    assert (await first).source == "cancelled"  # never reached the model
    assert second.source in ("model", "empty", "gated")
    assert service.metrics.cancelled == 1 and service.metrics.requests == 2
