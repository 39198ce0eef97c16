"""``dlm-lsp evaluate PATH``: how useful the server's suggestions are on your own code.

Middles are cut from a local source tree (:mod:`engine.eval.repo`) and completed
through the server's own path (:func:`dlm_lsp.completion.complete_text`: context,
engine, post-processing) with the gate off; the gate is then applied at every
threshold of ``--thresholds``, as the server would, which gives the
precision/coverage curve of ``minConfidence`` from one model run per middle.

Per threshold, over all middles: *shown* (coverage), and over the shown ones:
*useful* (the suggestion's first line is a non-empty prefix of the expected
text), exact match, edit similarity (difflib ratio), *parse ok* (inserting it
into the whole document adds no parse error), *parses as the original* (no more
errors than with the true middle: a correct but partial suggestion fails this
one) and *whitespace errors* (it changes the indentation of the cursor's line or
doubles a space). Threshold 0 is the ungated server. Above 0, *parse ok* and
*whitespace errors* are the gate's own checks (for documents up to 50,000
characters) and so hold by construction: they show what the gate removes, not an
independent measurement; *parses as the original* is independent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from engine import SERVING_BACKENDS, single_line

from dlm_lsp.completion import Result, complete_text
from dlm_lsp.gate import gate, parse_surroundings, whitespace_problem
from dlm_lsp.postprocess import Suggestion
from dlm_lsp.settings import Settings
from dlm_lsp.syntax import parse_errors, parser_for

if TYPE_CHECKING:
    from engine import Engine
    from engine.eval.repo import RepoProblem

DEFAULT_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def useful(shown: str, expected: str) -> bool:
    """The suggestion's first line is non-empty and the expected text starts with it."""
    first = single_line(shown).rstrip()
    return bool(first.strip()) and expected.startswith(first)


class _Parses:
    """Parse-error counts of one problem's document with various insertions, each parsed once."""

    def __init__(self, problem: RepoProblem) -> None:
        self.parser = parser_for(problem.language)
        self.before, self.after = problem.text[: problem.offset], problem.text[problem.offset :]
        self._counts: dict[tuple[str, int], int] = {}

    def errors(self, text: str, replace_suffix: int = 0) -> int:
        """Errors of the document with ``text`` inserted at the cursor (replacing ``replace_suffix`` characters)."""
        key = (text, replace_suffix)
        if key not in self._counts:
            self._counts[key] = parse_errors(self.parser, self.before + text + self.after[replace_suffix:])
        return self._counts[key]


def score(problem: RepoProblem, shown: Suggestion | None, result: Result, parses: _Parses) -> dict[str, Any]:
    """Metrics of one shown suggestion (or of nothing shown)."""
    if shown is None:
        return {"shown": False}
    from engine.eval.harness import edit_similarity, exact_match

    expected = problem.middle if problem.kind == "multi" else single_line(problem.middle)
    text = shown.text
    row: dict[str, Any] = {
        "shown": True,
        "useful": useful(text, expected),
        "exact": exact_match(text, expected),
        "edit_similarity": edit_similarity(text, expected),
        "whitespace_error": whitespace_problem(text, result.context.post.line_prefix if result.context else "") is not None,
        "chars": len(text),
    }
    if parses.parser is not None:  # the same tests as adds_parse_errors, on counts parsed once per problem
        errors = parses.errors(text, shown.replace_suffix)
        row["parse_ok"] = errors <= parses.errors("")
        row["parses_as_true"] = errors <= parses.errors(problem.middle)
    return row


def summarise(rows: list[dict[str, Any]], total: int) -> dict[str, Any]:
    """Coverage and the averages over shown suggestions."""
    shown = [r for r in rows if r["shown"]]
    n = len(shown)

    def share(key: str) -> float | None:
        values = [r[key] for r in shown if key in r]
        return round(sum(values) / len(values), 4) if values else None

    return {
        "shown": n,
        "coverage": round(n / total, 4) if total else 0.0,
        "useful": share("useful"),
        "useful_of_all": round(sum(r["useful"] for r in shown) / total, 4) if total else 0.0,
        "exact": share("exact"),
        "edit_similarity": round(statistics.fmean(r["edit_similarity"] for r in shown), 4) if shown else None,
        "parse_ok": share("parse_ok"),
        "parses_as_true": share("parses_as_true"),
        "whitespace_errors": sum(r["whitespace_error"] for r in shown),
        "mean_chars": round(statistics.fmean(r["chars"] for r in shown), 1) if shown else None,
    }


def evaluate(engine: Engine, problems: Sequence[RepoProblem], settings: Settings, thresholds: Sequence[float]) -> dict[str, Any]:
    """Complete every problem once (gate off) and score what each threshold would show."""
    from engine.progress import progress

    ungated = replace(settings, min_confidence=0.0)
    per_threshold: dict[float, list[dict[str, Any]]] = {t: [] for t in thresholds}
    items: list[dict[str, Any]] = []
    latencies: list[float] = []
    verdicts: dict[float, dict[str, int]] = {t: {} for t in thresholds}
    started = time.perf_counter()
    for done, problem in enumerate(problems, 1):
        result = complete_text(engine, problem.text, problem.offset, problem.language, ungated)
        latencies.append(result.latency_ms)
        item = {"task_id": problem.task_id, "middle": problem.middle, "suggestion": result.ungated.text if result.ungated else None,
                "healed": result.engine_stats.get("healed", ""), "latency_ms": round(result.latency_ms, 1), "shown_at": {}}
        parses = _Parses(problem)
        around = parse_surroundings(problem.text, problem.offset, result.context.post) if result.context else None
        for t in thresholds:
            if result.ungated is None or result.context is None:
                shown, reason = None, "empty"
            else:
                verdict = gate(result.ungated, result.raw_text, result.token_ends, result.confidence, result.context.post, t, around)
                shown, reason = verdict.suggestion, verdict.reason
            verdicts[t][reason] = verdicts[t].get(reason, 0) + 1
            per_threshold[t].append(score(problem, shown, result, parses))
            item["shown_at"][str(t)] = shown.text if shown else None
        items.append(item)
        progress(done, len(problems), started)
    curve = []
    for t in thresholds:
        curve.append({"threshold": t, **summarise(per_threshold[t], len(problems)), "verdicts": verdicts[t]})
    return {
        "problems": len(problems),
        "median_latency_ms": round(statistics.median(latencies), 1) if latencies else None,
        "curve": curve,
        "items": items,
    }


def markdown_table(report: dict[str, Any]) -> str:
    """The curve as a Markdown table."""
    head = ("| minConfidence | shown | coverage | useful (of shown) | useful (of all) | exact | edit sim | parse ok "
            "| parses as original | whitespace errors | mean length |\n")
    head += "|---|---|---|---|---|---|---|---|---|---|---|\n"

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"

    rows = [
        f"| {c['threshold']:g} | {c['shown']} | {pct(c['coverage'])} | {pct(c['useful'])} | {pct(c['useful_of_all'])} | "
        f"{pct(c['exact'])} | {'-' if c['edit_similarity'] is None else format(c['edit_similarity'], '.3f')} | "
        f"{pct(c['parse_ok'])} | {pct(c['parses_as_true'])} | {c['whitespace_errors']} | "
        f"{'-' if c['mean_chars'] is None else c['mean_chars']} |"
        for c in report["curve"]
    ]
    return head + "\n".join(rows) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``dlm-lsp evaluate``."""
    p.add_argument("source", type=Path, help="a folder of source code (ideally code the model was not trained on)")
    p.add_argument("--kind", choices=["single", "multi"], default="single", help="middle kind (default: single)")
    p.add_argument("--count", type=int, default=200, help="middles to cut (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--model", default="", help="catalog name or engine folder (default: the shipped model)")
    p.add_argument("--backend", default="auto", choices=SERVING_BACKENDS)
    p.add_argument("--ext", default=".py", help="file name endings to read, comma-separated (default: .py)")
    p.add_argument("--budget-ms", type=float, default=None, help="latency budget (default: the setting's default)")
    p.add_argument("--no-healing", action="store_true", help="turn token healing off (to measure it)")
    p.add_argument("--thresholds", default=",".join(f"{t:g}" for t in DEFAULT_THRESHOLDS),
                   help="minConfidence values of the curve, comma-separated (0 = ungated)")
    p.add_argument("--out", type=Path, default=None, help="write the full report (every item) as JSON here")


def run(args: argparse.Namespace) -> int:
    """``dlm-lsp evaluate``: print the curve as Markdown; ``--out`` keeps every item."""
    from engine import EngineError
    from engine.eval.repo import repo_problems

    from dlm_lsp.model_host import ModelHost

    try:
        thresholds = tuple(sorted({float(t) for t in args.thresholds.split(",") if t.strip()}))
        if not thresholds or not all(0 <= t <= 1 for t in thresholds):
            raise ValueError("thresholds must be numbers in [0, 1]")
        if args.count < 1:
            raise ValueError("--count must be at least 1")
        suffixes = tuple(e if e.startswith(".") else f".{e}" for e in args.ext.split(",") if e.strip())
        problems = repo_problems(args.source, args.kind, args.count, args.seed, suffixes)
    except (ValueError, EngineError) as exc:
        print(f"dlm-lsp evaluate: error: {exc}", file=sys.stderr)
        return 2
    settings = Settings(model=args.model, backend=args.backend, token_healing=not args.no_healing)
    if args.budget_ms is not None:
        settings = replace(settings, latency_budget_ms=args.budget_ms)
    host = ModelHost()
    engine = host.load_now(settings.model, settings.backend, settings.threads)
    if engine is None:
        print(f"dlm-lsp evaluate: error: {host.error}", file=sys.stderr)
        return 2
    report = evaluate(engine, problems, settings, thresholds)
    report.update({"source": str(args.source), "kind": args.kind, "seed": args.seed, "model": str(host.path),
                   "token_healing": settings.token_healing, "budget_ms": settings.latency_budget_ms})
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"{len(problems)} {args.kind}-line middles from {args.source} (seed {args.seed}), model {host.path}, "
          f"token healing {'on' if settings.token_healing else 'off'}, median latency {report['median_latency_ms']} ms\n")
    print(markdown_table(report), end="")
    return 0
