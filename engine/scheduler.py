"""Continuous batching: the denoising steps of concurrent requests run as one forward pass.

A server answering many clients runs each request on a worker thread of its own. Without
a scheduler every request runs its own denoising loop, so ``n`` requests in flight cost
``n`` span-step forward passes per step, each reading every weight of the model once.
With a :class:`StepScheduler` the loops run in lockstep on one scheduler thread, and each
round is *one* forward pass holding every request's span rows
(:meth:`~engine.backends.onnxruntime.OnnxRuntimeDenoiser.step_many`: spans padded to the
widest, contexts to the longest, the padding masked). The weights are read once per round
for all of them: a memory-bound step (a real-size model on a CPU, any model on a GPU)
then serves ``n`` requests for little more than the price of one.

One round:

1. **join**: requests whose context pass is done join (each runs that pass on its own
   thread before it joins, beside the rounds of the others: on a CPU another core works
   on it, and the requests in flight do not wait for it);
2. **decide**: every request in flight takes its own decisions, as the single-request
   loop does (early exit, budget pruning, its stop callback, its deadline); those
   finished or out of time **leave** with their result at once;
3. **step**: one merged forward pass for the span rows of the others, at most
   ``max_rows`` rows (requests beyond wait for the next round; the round's first request
   rotates, so none waits twice in a row);
4. **commit**: each request commits its positions from its rows of the output.

Each request's result is what its loop alone would return up to the arithmetic of a
larger batch: exact for fp32 graphs; for int8 graphs, whose activations are quantised
per tensor, the other rows shift the quantisation scale and a near-tie may resolve the
other way (measured in docs/serve.md). A folder whose span step cannot merge contexts
(format 2) still runs through the scheduler, one forward pass per request.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from engine.backends.base import Denoiser, SpanBatch, StepOutput, step_batches
from engine.errors import EngineError
from engine.sampler import Candidate, DenoisingRun, SamplerResult

log = logging.getLogger(__name__)

MAX_ROWS = 64
"""Span rows of one merged forward pass (a request has one per candidate length still running)."""


@dataclass
class _Job:
    run: DenoisingRun
    done: threading.Event = field(default_factory=threading.Event)
    result: SamplerResult | None = None
    error: BaseException | None = None
    shared: int = 0
    """Requests in the forward passes this request took part in, summed (for its mean batch size)."""
    passes: int = 0


StepObserver = Callable[[int, int], None]
"""Called after each merged forward pass with its number of requests and of rows (metrics)."""


@dataclass
class _Lane:
    """One scheduler thread and the requests it runs."""

    arrived: deque[_Job] = field(default_factory=deque)
    thread: threading.Thread | None = None
    load: int = 0
    """Requests given to this lane and not yet answered."""


class StepScheduler:
    """Runs the denoising loops of concurrent requests in lockstep, one merged span step per round.

    ``lanes``: scheduler threads, each merging the steps of its own requests (a new request
    goes to the least loaded). One lane for a model whose operations use every core; one per
    core for a small model whose operations run on one thread each (merging two requests'
    steps into one pass on one core is slower than running them side by side on two).
    """

    def __init__(
        self, denoiser: Denoiser, *, max_rows: int = MAX_ROWS, on_step: StepObserver | None = None, lanes: int = 1
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        self.denoiser = denoiser
        self.max_rows = max_rows
        self.on_step = on_step
        self._lock = threading.Lock()
        self._lanes = [_Lane() for _ in range(lanes)]
        self._closed = False

    def run(self, run: DenoisingRun) -> SamplerResult:
        """Run ``run`` to its end with the other requests in flight; blocks the calling thread.

        Raises what its forward passes raised (an error of a merged pass fails every
        request that took part in it), or :class:`EngineError` once the scheduler is closed.
        """
        if self._closed:
            raise EngineError("the engine was closed")
        # the context pass runs here, on the request's own thread: beside the merged steps of the
        # requests in flight (another core), not between them
        run.encode_context()
        job = _Job(run)
        with self._lock:
            if self._closed:
                raise EngineError("the engine was closed")
            lane = min(self._lanes, key=lambda candidate: candidate.load)
            lane.load += 1
            lane.arrived.append(job)
            if lane.thread is None:  # the thread ends when nothing is left to run; the next request starts one
                lane.thread = threading.Thread(target=self._loop, args=(lane,), name="dlm-step-scheduler", daemon=True)
                lane.thread.start()
        job.done.wait()
        with self._lock:
            lane.load -= 1
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def close(self) -> None:
        """Refuse new requests; those in flight run to their end."""
        with self._lock:
            self._closed = True

    # -- the scheduler thread -----------------------------------------------------------------
    def _loop(self, lane: _Lane) -> None:
        flight: list[_Job] = []
        first = 0  # the round's first request: rotates when max_rows leaves some out
        while True:
            with self._lock:
                joining = list(lane.arrived)
                lane.arrived.clear()
                if not joining and not flight:
                    lane.thread = None
                    return
            flight.extend(joining)
            flight = self._round(flight, first)
            first += 1

    def _round(self, flight: list[_Job], first: int) -> list[_Job]:
        """Decide, step and commit once; the requests still in flight after it."""
        stepping: list[tuple[_Job, list[Candidate], SpanBatch | None]] = []
        rows = 0
        staying: list[_Job] = []
        order = flight[first % len(flight):] + flight[: first % len(flight)] if flight else []
        for job in order:
            run = job.run
            try:
                active = run.active()
                if not active or run.out_of_time(active):
                    _finish(job)
                    continue
                part = run.span_part(active)
            except Exception as exc:  # noqa: BLE001
                _fail(job, exc)
                continue
            staying.append(job)
            width = 0 if part is None else len(part.span_ids)
            if stepping and rows + width > self.max_rows:
                continue  # waits for the next round
            rows += width
            stepping.append((job, active, part))
        parts = [part for _, _, part in stepping if part is not None]
        try:
            outputs = step_batches(self.denoiser, parts) if parts else []
        except Exception as exc:  # noqa: BLE001 - every request of the failed pass gets the error
            log.error("a merged span step of %d requests failed: %s", len(parts), exc)
            for job, _, _ in stepping:
                _fail(job, exc)
            return [job for job in staying if not job.done.is_set()]
        if parts and self.on_step is not None:
            self.on_step(len(parts), rows)
        answers = iter(outputs)
        for job, active, part in stepping:
            out: StepOutput | None = next(answers) if part is not None else None
            if part is not None:
                job.shared += len(parts)
                job.passes += 1
            try:
                job.run.commit_step(active, out)
            except Exception as exc:  # noqa: BLE001
                _fail(job, exc)
        return [job for job in staying if not job.done.is_set()]


def _finish(job: _Job) -> None:
    try:
        result = job.run.result()
    except Exception as exc:  # noqa: BLE001
        _fail(job, exc)
        return
    result.stats["batch_requests"] = job.shared / job.passes if job.passes else 1.0
    job.result = result
    job.done.set()


def _fail(job: _Job, exc: BaseException) -> None:
    job.error = exc
    job.done.set()


