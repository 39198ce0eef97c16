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

    def counting(original):  # type: ignore[no-untyped-def]
        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            steps_seen.append(time.perf_counter())
            return original(*args, **kwargs)
        return counted

    # observe the real denoiser, do not replace it: a step is a span step, or (the cached span, on for
    # this long middle) a context-graph pass
    engine.denoiser.step = counting(engine.denoiser.step)
    engine.denoiser.encode_context = counting(engine.denoiser.encode_context)
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


BODY = "".join(f"def helper_{i}(value):\n    return value * {i}\n\n" for i in range(20))


@pytest.mark.asyncio
async def test_the_context_pass_runs_while_the_debounce_waits(tiny_engine):
    """An automatic request starts its window's context pass at once, not after the debounce; the
    request then reuses all of it (nothing computed twice), and a request whose keystroke was
    superseded leaves its pass to the next one."""
    from engine import Engine

    engine = Engine.load(tiny_engine, backend="cpu")
    encodes: list[float] = []
    original = engine.denoiser.encode_context

    def observed(*args, **kwargs):  # type: ignore[no-untyped-def]
        encodes.append(time.perf_counter())
        return original(*args, **kwargs)

    engine.denoiser.encode_context = observed  # observe the real denoiser, do not replace it
    settings = Settings(debounce_ms=400, length_candidates=(4,), min_confidence=0.0)
    service = CompletionService(Metrics())
    text = BODY + "def greet(name):\n    message = \n"
    offset = len(text) - 1

    def request(text: str, offset: int):  # type: ignore[no-untyped-def]
        return service.complete(engine, "file:///x.py", text, offset, "python", settings,
                                version=1, current_version=lambda: 1, automatic=True)

    started = time.perf_counter()
    result = await request(text, offset)
    assert encodes and encodes[0] - started < 0.2  # during the debounce, which waited 0.4 s
    assert result.source in ("model", "empty", "gated")
    assert result.engine_stats["context_computed"] == 0 and result.engine_stats["context_reused"] > 150
    assert service.metrics.primes == 1 and len(encodes) == 2  # the prime's full pass, the request's reuse
    typed = text[:offset] + "f" + text[offset:]
    first = asyncio.ensure_future(request(typed, offset + 1))
    await asyncio.sleep(0.1)
    retyped = typed[: offset + 1] + "o" + typed[offset + 1:]
    second = await request(retyped, offset + 2)
    assert (await first).source == "cancelled"
    assert service.metrics.primes == 3  # each keystroke's window started encoding
    # the second keystroke's pass reused the first's, which reused the first request's
    assert second.engine_stats["context_computed"] == 0
    assert service.metrics.context_computed < 2 * result.engine_stats["context_reused"]


@pytest.mark.asyncio
async def test_no_priming_without_context_reuse(tiny_engine):
    from engine import Engine

    engine = Engine.load(tiny_engine, backend="cpu")
    settings = Settings(debounce_ms=50, length_candidates=(4,), context_reuse=False)
    service = CompletionService(Metrics())
    text = BODY + "def greet(name):\n    message = \n"
    result = await service.complete(engine, "file:///x.py", text, len(text) - 1, "python", settings,
                                    version=1, current_version=lambda: 1, automatic=True)
    assert service.metrics.primes == 0 and "context_computed" not in result.engine_stats
