"""The cached span against full span steps, side by side on the same problems (docs/engine.md, "Cached span").

    python scripts/cached_span_compare.py --model runs/default-fp32 \\
        --problems ../shared/eval/humaneval-infilling/HumanEval-RandomSpanInfillingLight.jsonl.gz --items 200 \\
        --settings '{"multiline": "always"}'

Each problem is completed through the language server's completion path (window, token
healing, the server's candidate lengths, no budget, the gate off) with ``spanCache``
``off`` and then ``on``, one after the other. Reports how often the two write the same
middle and the same first line, how close each comes to the problem's own middle (exact
match and edit similarity, as ``dlm-eval`` scores them), the span rows each computed (``span_rows``:
rows through the model in span steps, the context pass not counted) and the median
latency of each. Only what the approximation changes is seen on fp32 graphs: an int8
model's activation quantisation moves with the rows of each pass.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import emit, measuring_settings  # noqa: E402
from dlm_lsp.completion import complete_text  # noqa: E402
from engine import Engine  # noqa: E402
from engine.eval.harness import edit_similarity, exact_match, load_problems  # noqa: E402
from reuse_replay import first_line  # noqa: E402

DEFAULT_PROBLEMS = ROOT.parent / "shared/eval/humaneval-infilling/HumanEval-RandomSpanInfillingLight.jsonl.gz"


def main() -> int:
    """Complete every problem both ways; print and optionally write the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="engine folder (fp32 to see only the approximation)")
    p.add_argument("--problems", type=Path, default=DEFAULT_PROBLEMS, help="fill-in-the-middle problems (.jsonl[.gz])")
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--settings", default="{}", help="the language server's settings as JSON")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    settings = measuring_settings(p, args.settings)
    engine = Engine.load(args.model, backend="cpu")
    modes = {"off": replace(settings, span_cache="off"), "on": replace(settings, span_cache="on")}
    rows: dict[str, list[dict]] = {mode: [] for mode in modes}
    problems = load_problems(args.problems)[: args.items]
    for n, problem in enumerate(problems):
        text, offset = problem.prompt + problem.suffix, len(problem.prompt)
        for mode, chosen in modes.items():
            got = complete_text(engine, text, offset, "python", chosen)
            rows[mode].append({"text": got.raw_text or "", "ms": got.latency_ms,
                               "span_rows": got.engine_stats.get("span_rows", 0),
                               "exact": exact_match(got.raw_text or "", problem.canonical_solution),
                               "similarity": edit_similarity(got.raw_text or "", problem.canonical_solution)})
        if (n + 1) % 25 == 0:
            print(f"{n + 1}/{len(problems)} problems", file=sys.stderr)
    off, on = rows["off"], rows["on"]
    report = {
        "model": str(args.model), "precision": engine.info.precision, "problems": str(args.problems),
        "items": len(problems), "settings": args.settings,
        "same_middle": round(sum(a["text"] == b["text"] for a, b in zip(off, on)) / max(1, len(off)), 4),
        "same_first_line": round(sum(first_line(a["text"]) == first_line(b["text"])
                                     for a, b in zip(off, on)) / max(1, len(off)), 4),
    }
    for mode, got in rows.items():
        report[mode] = {
            "exact_match": round(sum(r["exact"] for r in got) / max(1, len(got)), 4),
            "edit_similarity": round(statistics.fmean(r["similarity"] for r in got), 4) if got else 0,
            "span_rows_mean": round(statistics.fmean(r["span_rows"] for r in got), 1) if got else 0,
            "ms_p50": round(statistics.median(r["ms"] for r in got), 1) if got else 0,
        }
    return emit(report, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
