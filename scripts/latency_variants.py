"""Latency of the server's completion path with token healing and the gate off and on, interleaved.

    .venv/bin/python scripts/latency_variants.py SOURCE [--count N] [--kind single|multi]

SOURCE is a folder or a corpus split (as for ``dlm-lsp evaluate``). Prints the
median and p95 of ``complete_text`` (context, engine, post-processing, gate) per
variant, each middle run by every variant in turn, and how long the gate itself took.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

from engine import Engine, default_model_path
from engine.eval.repo import repo_problems

from dlm_lsp.completion import complete_text
from dlm_lsp.gate import gate, parse_surroundings
from dlm_lsp.settings import Settings


def main() -> None:
    """Run the comparison and print one line per variant."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--kind", default="single", choices=["single", "multi"])
    args = parser.parse_args()
    engine = Engine.load(default_model_path(), "cpu")
    problems = repo_problems(args.source, args.kind, args.count, seed=0)
    gated = Settings(backend="cpu")
    variants = {
        "healing off, gate off": replace(gated, min_confidence=0.0, token_healing=False),
        "healing on, gate off": replace(gated, min_confidence=0.0),
        f"healing on, gate on (minConfidence {gated.min_confidence:g}, the default)": gated,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    steps: dict[str, list[int]] = {name: [] for name in variants}
    gate_ms: list[float] = []
    for problem in problems:
        for name, settings in variants.items():  # interleaved: both see the same machine state
            result = complete_text(engine, problem.text, problem.offset, problem.language, settings)
            times[name].append(result.latency_ms)
            steps[name].append(int(result.engine_stats.get("steps", 0)))
        if result.ungated is not None and result.context is not None:
            t0 = time.perf_counter()
            gate(result.ungated, result.raw_text, result.token_ends, result.confidence, result.context.post,
                 gated.min_confidence, parse_surroundings(problem.text, problem.offset, result.context.post))
            gate_ms.append((time.perf_counter() - t0) * 1000)
    for name, values in times.items():
        values.sort()
        print(f"{name}: p50 {statistics.median(values):.1f} ms, p95 {values[int(0.95 * (len(values) - 1))]:.1f} ms, "
              f"{statistics.fmean(steps[name]):.2f} denoising steps per completion")

    gate_ms.sort()
    if not gate_ms:
        print("no suggestion reached the gate")
        return
    print(f"the gate alone: p50 {statistics.median(gate_ms):.2f} ms, p95 {gate_ms[int(0.95 * (len(gate_ms) - 1))]:.2f} ms, "
          f"max {gate_ms[-1]:.1f} ms ({len(problems)} {args.kind}-line middles from {args.source})")


if __name__ == "__main__":
    main()
