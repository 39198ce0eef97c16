"""Local metrics for ``dlm/status``: latency, counters, acceptance. Never sent anywhere."""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Metrics:
    """Counters and a window of recent latencies."""

    requests: int = 0
    completions: int = 0
    empty: int = 0
    gated: int = 0
    """Suggestions the confidence/syntax gate hid (dlm_lsp.gate)."""
    cancelled: int = 0
    stale: int = 0
    cache_hits: int = 0
    budget_cuts: int = 0
    errors: int = 0
    shown: int = 0
    accepted: int = 0
    partially_accepted: int = 0
    accepted_chars: int = 0
    context_reused: int = 0
    """Context tokens whose keys and values came from the document's previous request (engine.reuse)."""
    context_computed: int = 0
    """Context tokens encoded (all of them without reuse)."""
    primes: int = 0
    """Context passes started while the debounce waited (their tokens are in the two counts above)."""
    prefetches: int = 0
    prefetch_errors: int = 0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=200))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        with self.lock:
            setattr(self, name, getattr(self, name) + n)

    def latency(self, ms: float) -> None:
        """Record one completion's end-to-end latency."""
        with self.lock:
            self.latencies_ms.append(ms)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready view."""
        with self.lock:
            lat = list(self.latencies_ms)
            counters = {f.name: getattr(self, f.name) for f in fields(self) if f.type in (int, "int")}
        return {
            "last_latency_ms": round(lat[-1], 1) if lat else None,
            "median_latency_ms": round(statistics.median(lat), 1) if lat else None,
            "acceptance_rate": round((counters["accepted"] + counters["partially_accepted"]) / counters["shown"], 3)
            if counters["shown"] else None,
            **counters,
        }
