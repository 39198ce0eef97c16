"""``dlm-eval``: completion quality of an engine on fill-in-the-middle problems.

Problems come in the HumanEval-infilling JSONL format (``task_id``, ``prompt``,
``suffix``, ``canonical_solution``, ``test``, ``entry_point``; ``.jsonl`` or
``.jsonl.gz``), from any file given with ``--problems``, or are cut from the
held-out split of our corpus with ``--heldout FILE --kind single|multi`` (those
have no tests: exact match only).

Each problem is completed twice: with the **oracle** length (the number of tokens
of the canonical middle, as the engine tokenizes it) and with **unknown** length
(the engine's own candidate lengths and choice). Metrics per mode:

* exact match: the completion equals the canonical middle, ignoring trailing whitespace;
* edit similarity: difflib's ratio of the two (CodeXGLUE's measure), a graded signal where exact match is rare;
* pass@1 (problems with tests): ``prompt + completion + suffix + test +
  check(entry_point)`` exits 0 in the sandbox (:mod:`engine.eval.sandbox`).

Per-problem results and a summary go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import difflib
import gzip
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from engine.errors import EngineError, InputError

REQUIRED_FIELDS = ("task_id", "prompt", "suffix", "canonical_solution")


@dataclass(frozen=True)
class Problem:
    """One fill-in-the-middle problem."""

    task_id: str
    prompt: str
    suffix: str
    canonical_solution: str
    test: str = ""
    entry_point: str = ""


def load_problems(path: Path) -> list[Problem]:
    """Read a problems file; a malformed line raises ``InputError`` naming the line and the field."""
    if not path.is_file():
        raise InputError(f"problems file {path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except ValueError as exc:
                    raise InputError(f"{path}:{number}: not valid JSON ({exc})") from exc
                missing = [f for f in REQUIRED_FIELDS if not isinstance(data.get(f), str)]
                if missing:
                    raise InputError(f"{path}:{number}: missing or non-string field(s): {', '.join(missing)}")
                if data.get("test") and not data.get("entry_point"):
                    raise InputError(f"{path}:{number}: has a test but no entry_point")
                problems.append(
                    Problem(
                        data["task_id"], data["prompt"], data["suffix"], data["canonical_solution"],
                        data.get("test") or "", data.get("entry_point") or "",
                    )
                )
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    return problems


def heldout_problems(path: Path, kind: str, count: int, seed: int) -> list[Problem]:
    """Single-line or multi-line (2-5 lines) middles cut from held-out corpus files (no tests)."""
    from engine.train.corpus import read_jsonl

    rng = np.random.default_rng(seed)
    files = [row["text"] for row in read_jsonl(path)]
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < count and attempts < count * 20:
        attempts += 1
        text = files[int(rng.integers(0, len(files)))]
        lines = text.splitlines(keepends=True)
        content = [i for i, line in enumerate(lines) if line.strip() and len(line.strip()) > 3]
        if len(content) < 10:
            continue
        i = int(rng.choice(content[3:]))
        j = i + 1 if kind == "single" else min(len(lines), i + int(rng.integers(2, 6)))
        middle = "".join(lines[i:j])
        if not middle.strip() or len(middle) > 400:
            continue
        problems.append(
            Problem(f"heldout-{kind}/{len(problems)}", "".join(lines[:i]), "".join(lines[j:]), middle)
        )
    return problems


def exact_match(completion: str, solution: str) -> bool:
    """Equal up to trailing whitespace."""
    return completion.rstrip() == solution.rstrip()


def edit_similarity(completion: str, solution: str) -> float:
    """Character-level similarity in [0, 1] (difflib's ratio, as CodeXGLUE's edit similarity), trailing whitespace ignored."""
    a, b = completion.rstrip(), solution.rstrip()
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def program(problem: Problem, completion: str) -> str:
    """The program whose exit status decides pass@1."""
    return f"{problem.prompt}{completion}{problem.suffix}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def evaluate(
    engine: Any,
    problems: list[Problem],
    params: Any,
    modes: Iterable[str] = ("oracle", "unknown"),
    run_tests: bool = True,
    timeout_s: float = 10.0,
    progress: bool = True,
    sandbox: bool = True,
) -> dict[str, Any]:
    """Complete every problem in every mode; returns ``{"summary": ..., "results": [...]}``.

    Tests run in :mod:`engine.eval.sandbox`; ``sandbox=False`` runs them without isolation.
    Raises ``SandboxUnavailableError`` (an ``EngineError``) when they cannot be sandboxed.
    """
    from dataclasses import replace

    from engine.progress import progress as progress_bar
    from engine.eval.sandbox import Limits, run_program

    modes = list(modes)
    results = []
    started = time.perf_counter()
    hits = {m: 0 for m in modes}
    for n, problem in enumerate(problems, 1):
        for mode in modes:
            mode_params = params
            if mode == "oracle":
                length = max(1, len(engine.tokenizer.encode(problem.canonical_solution)))
                mode_params = replace(params, lengths=(length,))
            try:
                completion = engine.complete(problem.prompt, problem.suffix, mode_params)
            except InputError as exc:  # e.g. an oracle middle longer than the model's window
                results.append(_unanswerable(problem, mode, str(exc), run_tests))
                continue
            row: dict[str, Any] = {
                "task_id": problem.task_id,
                "mode": mode,
                "completion": completion.text,
                "exact_match": exact_match(completion.text, problem.canonical_solution),
                "edit_sim": round(edit_similarity(completion.text, problem.canonical_solution), 4),
                "latency_ms": round(completion.stats["total_ms"], 2),
                "steps": completion.stats["steps"],
                "tokens_per_step": round(completion.stats["tokens_per_step"], 3),
                "chosen_length": completion.stats["chosen_length"],
                "cut": completion.cut,
            }
            if run_tests and problem.test:
                outcome = run_program(program(problem, completion.text), Limits(timeout_s=timeout_s), sandbox=sandbox)
                row["passed"] = outcome.passed
                row["status"] = outcome.status
            hits[mode] += row["exact_match"]
            results.append(row)
        if progress:
            progress_bar(n, len(problems), started, " ".join(f"EM[{m}]={hits[m] / n:.3f}" for m in modes))
    summary: dict[str, Any] = {"problems": len(problems)}
    for mode in modes:
        rows = [r for r in results if r["mode"] == mode]
        answered = [r for r in rows if "error" not in r]
        entry = {
            "exact_match": sum(r["exact_match"] for r in rows) / max(1, len(rows)),
            "edit_sim": round(statistics.fmean(r["edit_sim"] for r in rows), 4) if rows else None,
            "median_latency_ms": statistics.median(r["latency_ms"] for r in answered) if answered else None,
            "median_tokens_per_step": statistics.median(r["tokens_per_step"] for r in answered) if answered else None,
            "empty": sum(not r["completion"].strip() for r in answered),
            "unanswerable": len(rows) - len(answered),
        }
        tested = [r for r in rows if "passed" in r]
        if tested:
            entry["pass@1"] = sum(r["passed"] for r in tested) / len(tested)
            entry["tested"] = len(tested)
        summary[mode] = entry
    return {"summary": summary, "results": results}


def _unanswerable(problem: Problem, mode: str, reason: str, run_tests: bool) -> dict[str, Any]:
    """The result row of a problem the engine cannot attempt: a failure with the reason, never a crash."""
    row: dict[str, Any] = {
        "task_id": problem.task_id,
        "mode": mode,
        "completion": "",
        "exact_match": False,
        "edit_sim": 0.0,
        "error": reason,
    }
    if run_tests and problem.test:
        row["passed"] = False
        row["status"] = "not run"
    return row


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dlm-eval``."""
    from engine.engine import Engine
    from engine.sampler import SamplingParams, UnmaskOrder

    parser = argparse.ArgumentParser(prog="dlm-eval", description="Fill-in-the-middle quality: exact match and pass@1.")
    parser.add_argument(
        "--model", required=True, help="catalog name, engine folder, or checkpoint folder with --backend torch"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--problems", type=Path, help="HumanEval-infilling style .jsonl or .jsonl.gz")
    source.add_argument("--heldout", type=Path, help="held-out corpus split (heldout.jsonl from dlm-corpus)")
    parser.add_argument("--kind", choices=("single", "multi"), default="single", help="held-out middles: one line or 2-5 lines")
    parser.add_argument("--count", type=int, default=200, help="held-out problems to cut")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only N problems (after shuffling with --seed)")
    parser.add_argument("--seed", type=int, default=0, help="problem order and held-out cuts")
    parser.add_argument("--mode", choices=("oracle", "unknown", "both"), default="both", help="middle length given or not")
    parser.add_argument("--backend", default="auto")
    defaults = SamplingParams()
    parser.add_argument("--threshold", type=float, default=defaults.threshold, help="commit confidence threshold")
    parser.add_argument("--tokens-per-step", type=int, default=defaults.tokens_per_step, help="minimum commits per step")
    parser.add_argument(
        "--order", choices=[o.value for o in UnmaskOrder], default=defaults.order.value, help="ranking of the minimum commits"
    )
    parser.add_argument("--lengths", default=",".join(map(str, defaults.lengths)), help="unknown-length candidates")
    parser.add_argument("--exact", action="store_true", help="reference decoding: recompute the whole window every step")
    parser.add_argument("--no-tests", action="store_true", help="exact match only, do not execute code")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per test program")
    parser.add_argument(
        "--no-sandbox", action="store_true",
        help="run test programs without the bubblewrap sandbox (unsafe: they get your files, processes and network)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write per-problem results and summary here (JSON)")
    args = parser.parse_args(argv)
    try:
        if args.problems:
            problems = load_problems(args.problems)
        else:
            problems = heldout_problems(args.heldout, args.kind, args.count, args.seed)
        if args.limit is not None:
            order = np.random.default_rng(args.seed).permutation(len(problems))
            problems = [problems[i] for i in sorted(order[: args.limit])]
        params = SamplingParams(
            threshold=args.threshold,
            tokens_per_step=args.tokens_per_step,
            order=UnmaskOrder(args.order),
            lengths=tuple(int(v) for v in args.lengths.split(",")),
            exact=args.exact,
        )
        if not args.no_tests and not args.no_sandbox:
            from engine.eval.sandbox import check_sandbox

            check_sandbox()  # before loading a model: no sandbox, no run
        elif not args.no_tests:
            print("dlm-eval: warning: --no-sandbox: generated programs run WITHOUT isolation, "
                  "with your files, processes and network", file=sys.stderr)
        from engine.catalog import resolve

        engine = Engine.load(resolve(args.model), backend=args.backend)
        modes = ("oracle", "unknown") if args.mode == "both" else (args.mode,)
        report = evaluate(
            engine, problems, params, modes, run_tests=not args.no_tests, timeout_s=args.timeout, sandbox=not args.no_sandbox
        )
    except EngineError as exc:
        print(f"dlm-eval: error: {exc}", file=sys.stderr)
        return 2
    report["summary"]["model"] = str(engine.path)
    report["summary"]["source"] = str(args.problems or args.heldout)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
