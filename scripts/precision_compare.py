"""Weight precisions side by side: agreement with fp32 and speed (docs/engine.md, "Precision").

    python scripts/precision_compare.py --reference runs/default-fp32 \\
        --models engine/models/default runs/default-int4 \\
        --problems ../shared/eval/humaneval-infilling/HumanEval-SingleLineInfilling.jsonl.gz --items 200
    python scripts/precision_compare.py --reference runs/b05/engine-fp32 --models runs/b05/engine-int8 \\
        runs/b05/engine-int4 --items 0 --window 1024 --span 16 --repeats 9

Every folder holds the same weights at another precision (``dlm-convert CKPT OUT
--precision int8|int4|fp32``). Per candidate:

* **first lines**: each problem is completed through the language server's completion
  path (window, token healing, the server's candidate lengths, no budget) by the
  reference and the candidate; the share whose first line equals the reference's;
* **top-1 per position**: one full forward over the problem's window with the true
  middle masked, and once more with every other middle token revealed (a state half way
  through denoising): the share of masked positions whose best token is the reference's;
* **speed**: a context pass over ``--window`` tokens and a span step of ``--span`` rows
  against it, timed in turn across the folders (one round after another, so that the
  machine's drift falls on every folder alike); medians.

Random-weight folders (``python -m engine.tiny --shape ...``) give speed only: their
distributions are flat, so agreement is noise; use ``--items 0`` for them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from _report import emit, measuring_settings  # noqa: E402
from dlm_lsp.completion import complete_text  # noqa: E402
from engine import Engine  # noqa: E402
from engine.eval.harness import Problem, load_problems  # noqa: E402
from reuse_replay import first_line  # noqa: E402

DEFAULT_PROBLEMS = ROOT.parent / "shared/eval/humaneval-infilling/HumanEval-SingleLineInfilling.jsonl.gz"


def masked_window(engine: Engine, problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of prefix, middle, suffix (cut to the model's positions) and where the middle is."""
    tok = engine.tokenizer
    prefix, middle, suffix = (tok.encode(t) for t in (problem.prompt, problem.canonical_solution, problem.suffix))
    room = engine.info.arch.max_positions - len(middle)
    head = prefix[-max(1, room * 3 // 4):]
    tail = suffix[: max(0, room - len(head))]
    ids = np.array(head + middle + tail, np.int64)
    where = np.zeros(len(ids), bool)
    where[len(head) : len(head) + len(middle)] = True
    return ids, where


def top1(engine: Engine, ids: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """The best token at every masked position of one full forward."""
    x = ids.copy()
    x[masked] = engine.info.token_ids.mask
    n = len(x)
    out = engine.denoiser.full(x[None], np.arange(n, dtype=np.int64)[None], np.ones((1, n), bool))
    return out.ids[0, masked, 0]


def speed(engines: dict[str, Engine], window: int, span: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median context pass (``window`` tokens) and span step (``span`` rows) per folder, timed in turn."""
    rng = np.random.default_rng(0)
    times: dict[str, dict[str, list[float]]] = {name: {"context_ms": [], "step_ms": []} for name in engines}
    arch = next(iter(engines.values())).info.arch
    vocab, mask = arch.vocab_size, next(iter(engines.values())).info.token_ids.mask
    ids = rng.integers(0, min(vocab, 30000), window).astype(np.int64)
    positions = np.arange(window, dtype=np.int64)
    cache_index = np.arange(window - 1, dtype=np.int64)
    span_ids = np.full((1, span), mask, np.int64)
    span_pos = np.arange(window, window + span, dtype=np.int64)[None]
    for round_ in range(repeats + 1):
        for name, engine in engines.items():
            d = engine.denoiser
            t0 = time.perf_counter()
            cache, _ = d.encode_context(ids, positions, cache_index, np.array([window - 1], np.int64))
            t1 = time.perf_counter()
            d.step(cache, span_ids, span_pos, np.ones((1, span), bool), cache_index[None])
            t2 = time.perf_counter()
            if round_:  # the first round warms every session up
                times[name]["context_ms"].append((t1 - t0) * 1000)
                times[name]["step_ms"].append((t2 - t1) * 1000)
    return {name: {k: round(statistics.median(v), 1) for k, v in t.items()} for name, t in times.items()}


def main() -> int:
    """Compare every ``--models`` folder with ``--reference``; print and optionally write the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, required=True, help="the fp32 engine folder")
    p.add_argument("--models", type=Path, nargs="+", required=True, help="the same weights at other precisions")
    p.add_argument("--problems", type=Path, default=DEFAULT_PROBLEMS, help="fill-in-the-middle problems (.jsonl[.gz])")
    p.add_argument("--items", type=int, default=200, help="problems to compare on (0: speed only)")
    p.add_argument("--settings", default="{}", help="the language server's settings as JSON")
    p.add_argument("--window", type=int, default=256, help="context tokens of the timed pass")
    p.add_argument("--span", type=int, default=16, help="rows of the timed span step")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    settings = measuring_settings(p, args.settings)
    engines = {"reference": Engine.load(args.reference, backend="cpu")}
    for path in args.models:
        engines[str(path)] = Engine.load(path, backend="cpu")
    report: dict = {
        "reference": str(args.reference), "settings": args.settings,
        "precisions": {name: e.info.precision for name, e in engines.items()},
    }
    items = load_problems(args.problems)[: args.items] if args.items else []
    agreement = {name: {"first_lines": 0, "positions": 0, "top1": 0, "half_positions": 0, "top1_half": 0} for name in engines if name != "reference"}
    ref = engines["reference"]
    for n, problem in enumerate(items):
        text, offset = problem.prompt + problem.suffix, len(problem.prompt)
        want = first_line(complete_text(ref, text, offset, "python", settings).raw_text)
        ids, masked = masked_window(ref, problem)
        half = masked.copy()
        half[np.flatnonzero(masked)[1::2]] = False
        best, best_half = top1(ref, ids, masked), top1(ref, ids, half)
        for name, counts in agreement.items():
            engine = engines[name]
            counts["first_lines"] += first_line(complete_text(engine, text, offset, "python", settings).raw_text) == want
            counts["positions"] += int(masked.sum())
            counts["top1"] += int((top1(engine, ids, masked) == best).sum())
            counts["half_positions"] += int(half.sum())
            counts["top1_half"] += int((top1(engine, ids, half) == best_half).sum())
        if (n + 1) % 25 == 0:
            print(f"{n + 1}/{len(items)} problems", file=sys.stderr)
    timing = speed(engines, args.window, args.span, args.repeats)
    report["items"] = len(items)
    report["window"], report["span"] = args.window, args.span
    report["models"] = {"reference": {"precision": ref.info.precision, **timing["reference"]}}
    for name, counts in agreement.items():
        row: dict = {"precision": engines[name].info.precision, **timing[name]}
        if items:
            row["same_first_line"] = round(counts["first_lines"] / len(items), 4)
            row["top1_agreement"] = round(counts["top1"] / max(1, counts["positions"]), 4)
            row["top1_agreement_half_revealed"] = round(counts["top1_half"] / max(1, counts["half_positions"]), 4)
        report["models"][name] = row
    return emit(report, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
