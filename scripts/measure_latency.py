"""Latency and memory of one engine folder on this machine, at a fixed window and middle length.

    python scripts/measure_latency.py --model FOLDER_OR_CATALOG_NAME --window 1024 --middle 10 \\
        --tokens-per-step 3 --runs 10

Loads the model (load time and RSS after loading are reported), then completes
the same real-code window ``--runs`` times: ``--window`` tokens of this
package's own source around a ``--middle``-token hole, committing
``--tokens-per-step`` tokens per step (random-weight models are never confident,
so the threshold alone would commit one token per step; a real model's step
count is what this fixes). Prints p50/p95 of the whole completion, the context
pass and a span step. This is the engine alone, not the language server.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    """Measure and print a JSON report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--window", type=int, default=1024, help="tokens of context (prefix + suffix)")
    parser.add_argument("--middle", type=int, default=10, help="middle length in tokens")
    parser.add_argument("--tokens-per-step", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)

    from dlm_lsp.model_host import model_path
    from engine import Engine, SamplingParams
    from engine.tiny import default_texts

    started = time.perf_counter()
    engine = Engine.load(model_path(args.model), backend="cpu")
    load_s = time.perf_counter() - started
    text = "\n".join(default_texts())
    ids = engine.tokenizer.encode(text)
    half = args.window // 2
    prefix = engine.tokenizer.decode(ids[:half])
    suffix = engine.tokenizer.decode(ids[half + args.middle : half + args.middle + (args.window - half)])
    params = SamplingParams(lengths=(args.middle,), threshold=1.0, tokens_per_step=args.tokens_per_step)
    engine.complete(prefix, suffix, params)  # warm-up
    totals, contexts, steps, passes = [], [], [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        completion = engine.complete(prefix, suffix, params, max_prefix_tokens=half, max_suffix_tokens=half)
        totals.append((time.perf_counter() - t0) * 1000)
        stats = completion.stats
        contexts.append(stats["context_ms"])
        span_steps = max(1, stats["forward_passes"] - 1)  # the context pass is the first step's forward
        steps.append(stats["denoise_ms"] / span_steps)
        passes.append(stats["forward_passes"])

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    report = {
        "model": str(model_path(args.model)),
        "family": engine.info.family,
        "precision": engine.info.precision,
        "parameters": engine.info.arch.parameters,
        "window": args.window,
        "middle": args.middle,
        "tokens_per_step": args.tokens_per_step,
        "load_s": round(load_s, 2),
        "rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "completion_ms_p50": round(statistics.median(totals), 1),
        "completion_ms_p95": pct(totals, 0.95),
        "context_ms_p50": round(statistics.median(contexts), 1),
        "step_ms_p50": round(statistics.median(steps), 1),
        "note": "step_ms: denoising time / span-step forward passes (sampler bookkeeping included)",
        "forward_passes": passes[0],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
