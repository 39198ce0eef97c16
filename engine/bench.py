"""Engine-level benchmark: our decoding against two baselines, side by side, on real items.

Workloads are fill-in-the-middle items drawn from held-out code of our corpus and
from HumanEval-infilling files, split into single-line and multi-line middles,
at several context sizes (tokens of prefix + suffix the model sees). Every item
is completed by every decoder in turn, in one process on one loaded model, so
the ratios compare like with like on a noisy machine.

Decoders (:func:`decoders`):

* ``dlm``: what the server runs: context cache (prefix and suffix encoded once,
  each step runs only the span), confidence-threshold parallel commits (at least
  ``tokens_per_step``), batched length candidates with early exit, under the
  latency budget.
* ``reference``: recompute the whole window every step and commit a fixed number
  of tokens per step (one by default), lowest confidence remasked, as in LLaDA's
  reference sampler; same candidate lengths, no budget.
* ``one-per-step``: one token per forward pass, left to right, on the context
  cache: what an autoregressive decoder needs; no budget. On single-line
  middles it stops at the first line break, as ``dlm`` does (a newline stop
  sequence); the reference does not (LLaDA's fixed schedule).

Per workload and decoder: p50/p95/max latency, tokens/s, forward passes per
completion, tokens per forward pass, exact match, the share of requests within
the budget, edit similarity (a graded quality signal where exact match is
rare), and empty/cut counts. A single-line middle is scored on its first line,
the part the server shows (:func:`shown`), for every decoder. :func:`summarize`
and :func:`markdown` turn rows into the JSON and table that ``dlm-bench`` writes.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from engine.errors import InputError
from engine.progress import progress
from engine.eval.harness import edit_similarity, exact_match, heldout_problems, load_problems
from engine.sampler import MULTI_LINE_LENGTHS, SINGLE_LINE_LENGTHS, SamplingParams, UnmaskOrder, single_line

SUFFIX_SHARE = 0.2
"""Share of the context room given to the suffix (the rest goes to the prefix)."""


@dataclass(frozen=True)
class Item:
    """One middle to fill, with where it came from."""

    id: str
    source: str
    kind: str
    """``single`` or ``multi`` (the middle spans one line or several)."""
    prefix: str
    suffix: str
    middle: str


def kind_of(middle: str) -> str:
    """``single`` when the middle is (at most) one line, else ``multi``."""
    return "single" if "\n" not in middle.rstrip("\n") else "multi"


def load_items(
    heldout: Path | None = None,
    problems: Sequence[Path] = (),
    kinds: Sequence[str] = ("single", "multi"),
    count: int = 50,
    seed: int = 0,
) -> list[Item]:
    """Up to ``count`` items per source and kind, chosen reproducibly with ``seed``."""
    items: list[Item] = []
    if heldout is not None:
        for kind in kinds:
            for p in heldout_problems(heldout, kind, count, seed):
                items.append(Item(p.task_id, "heldout", kind, p.prompt, p.suffix, p.canonical_solution))
    for path in problems:
        name = Path(path).name.split(".")[0]
        pool = [p for p in load_problems(Path(path)) if kind_of(p.canonical_solution) in kinds]
        rng = np.random.default_rng(seed)
        for kind in kinds:
            of_kind = [p for p in pool if kind_of(p.canonical_solution) == kind]
            picked = sorted(rng.permutation(len(of_kind))[:count].tolist())
            items.extend(Item(of_kind[i].task_id, name, kind, of_kind[i].prompt, of_kind[i].suffix, of_kind[i].canonical_solution) for i in picked)
    if not items:
        raise InputError("no benchmark items: give --heldout and/or --problems with middles of the chosen kinds")
    return items


def decoders(
    lengths: Sequence[int],
    dlm: SamplingParams,
    budget_ms: float | None,
    reference_tokens_per_step: int = 1,
    single_line: bool = False,
) -> dict[str, SamplingParams]:
    """The decoder under test (``dlm``: its commit rule, on these lengths and budget) and its two baselines.

    For a single-line middle, ``dlm`` and ``one-per-step`` stop at the first line
    break, as the server does and as an autoregressive decoder with a newline stop
    sequence would; the reference runs its fixed schedule, as LLaDA's code does.
    """
    lengths = tuple(lengths)
    return {
        "dlm": replace(dlm, lengths=lengths, budget_ms=budget_ms, stop_at_line_break=single_line),
        "reference": SamplingParams(lengths=lengths, threshold=1.0, tokens_per_step=reference_tokens_per_step, exact=True),
        "one-per-step": SamplingParams(
            lengths=lengths, threshold=1.0, order=UnmaskOrder.LEFT_TO_RIGHT, stop_at_line_break=single_line
        ),
    }


def shown(text: str, kind: str) -> str:
    """The part of a middle the server would show: only the first line of a single-line middle."""
    return single_line(text) if kind == "single" else text


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    return float(np.percentile(values, q, method="inverted_cdf"))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_engine_bench(
    engine: Any,
    items: Sequence[Item],
    contexts: Sequence[int] = (256, 1024, 2048),
    dlm: SamplingParams | None = None,
    budget_ms: float | None = 150.0,
    reference_tokens_per_step: int = 1,
    warmup: int = 2,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Complete every item with every decoder at every context size that fits the model.

    ``dlm`` holds the commit rule of the decoder under test (threshold, tokens per
    step, order; default: :class:`SamplingParams`'s, what the server uses).

    Returns ``{"rows": [...], "skipped": [...], "summary": [...]}``: one row per
    item, context size and decoder; context sizes larger than the model's window
    are listed in ``skipped`` with the reason.
    """
    window = engine.info.window
    sizes = [c for c in contexts if c <= window]
    skipped = [{"context": c, "reason": f"model window is {window} positions"} for c in contexts if c > window]
    if not sizes:
        raise InputError(f"no context size fits the model's {window}-position window: {list(contexts)}")
    dlm = dlm or SamplingParams()
    for item in items[:warmup]:  # first runs pay for lazy allocations in ONNX Runtime
        engine.complete(item.prefix, item.suffix, replace(dlm, lengths=SINGLE_LINE_LENGTHS))
    rows: list[dict[str, Any]] = []
    total = len(items) * len(sizes)
    started = time.perf_counter()
    done = 0
    for size in sizes:
        for item in items:
            lengths = SINGLE_LINE_LENGTHS if item.kind == "single" else MULTI_LINE_LENGTHS
            room = size - max(lengths) - 1
            max_suffix = int(room * SUFFIX_SHARE)
            for name, params in decoders(lengths, dlm, budget_ms, reference_tokens_per_step, item.kind == "single").items():
                t0 = time.perf_counter()
                completion = engine.complete(
                    item.prefix, item.suffix, params, max_prefix_tokens=room - max_suffix, max_suffix_tokens=max_suffix,
                    heal=name == "dlm",  # token healing, as the server does; the baselines are textbook decoders
                )
                latency = (time.perf_counter() - t0) * 1000
                stats = completion.stats
                text = shown(completion.text, item.kind)
                context_tokens = len(completion.input_ids) - stats["chosen_length"]
                rows.append(
                    {
                        "item": item.id,
                        "source": item.source,
                        "kind": item.kind,
                        "context": size,
                        "context_tokens": context_tokens,
                        "decoder": name,
                        "latency_ms": latency,
                        "middle_tokens": len(completion.middle_ids),
                        "model_tokens": round(stats["tokens_per_forward"] * stats["forward_passes"]),
                        "forward_passes": stats["forward_passes"],
                        "steps": stats["steps"],
                        "exact_match": exact_match(text, item.middle),
                        "edit_sim": round(edit_similarity(text, item.middle), 4),
                        "empty": not text.strip(),
                        "cut": completion.cut,
                        "within_budget": budget_ms is None or latency <= budget_ms,
                    }
                )
            done += 1
            if show_progress:
                progress(done, total, started, f"ctx {size}")
    return {"rows": rows, "skipped": skipped, "summary": summarize(rows), "peak_rss_mb": round(peak_rss_mb(), 1)}


def latency_and_quality(group: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What every level reports for a group of rows: count, latency percentiles, quality, budget share, empties."""
    latencies = [r["latency_ms"] for r in group]
    return {
        "n": len(group),
        "p50_ms": round(statistics.median(latencies), 2),
        "p95_ms": round(percentile(latencies, 95), 2),
        "max_ms": round(max(latencies), 2),
        "exact_match": round(sum(r["exact_match"] for r in group) / len(group), 4),
        "edit_sim": round(statistics.fmean(r["edit_sim"] for r in group), 4),
        "within_budget": round(sum(r["within_budget"] for r in group) / len(group), 4),
        "empty": sum(r["empty"] for r in group),
    }


def summarize(rows: Iterable[dict[str, Any]], keys: Sequence[str] = ("kind", "context", "decoder")) -> list[dict[str, Any]]:
    """Aggregate rows per workload (``keys``) with the metrics of the module docstring."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, group in groups.items():
        seconds = sum(r["latency_ms"] for r in group) / 1000
        tokens = sum(r["middle_tokens"] for r in group)
        forwards = sum(r["forward_passes"] for r in group)
        entry = {**dict(zip(keys, key)), **latency_and_quality(group)}
        entry.update(
            {
                "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
                "forward_passes": round(forwards / len(group), 2),
                "tokens_per_forward": round(sum(r["model_tokens"] for r in group) / forwards, 3) if forwards else 0.0,
                "cut": sum(r["cut"] for r in group),
            }
        )
        if "context_tokens" in group[0]:
            entry["context_tokens"] = int(statistics.median(r["context_tokens"] for r in group))
        out.append(entry)
    add_ratios(out, keys)
    return out


def add_ratios(summary: list[dict[str, Any]], keys: Sequence[str]) -> None:
    """Add, to each ``dlm`` entry, its ratios against the baselines of the same workload."""
    workload_keys = [k for k in keys if k != "decoder"]
    by = {(tuple(e[k] for k in workload_keys), e["decoder"]): e for e in summary}
    for entry in summary:
        if entry.get("decoder") != "dlm":
            continue
        workload = tuple(entry[k] for k in workload_keys)
        for base in ("reference", "one-per-step"):
            other = by.get((workload, base))
            if other is None:
                continue
            tag = base.replace("-", "_")
            entry[f"speedup_vs_{tag}"] = round(other["p50_ms"] / entry["p50_ms"], 2) if entry["p50_ms"] else None
            entry[f"em_delta_vs_{tag}"] = round(entry["exact_match"] - other["exact_match"], 4)
            entry[f"edit_sim_delta_vs_{tag}"] = round(entry["edit_sim"] - other["edit_sim"], 4)
            if other["tokens_per_forward"]:
                entry[f"tokens_per_forward_vs_{tag}"] = round(entry["tokens_per_forward"] / other["tokens_per_forward"], 2)


COLUMNS = (
    ("p50_ms", "p50 ms"),
    ("p95_ms", "p95 ms"),
    ("max_ms", "max ms"),
    ("tokens_per_s", "tok/s"),
    ("forward_passes", "fwd/compl."),
    ("tokens_per_forward", "tok/fwd"),
    ("exact_match", "EM"),
    ("edit_sim", "edit sim"),
    ("within_budget", "in budget"),
    ("empty", "empty"),
    ("speedup_vs_reference", "x vs ref"),
    ("speedup_vs_one_per_step", "x vs 1/step"),
)


def markdown(
    summary: Sequence[dict[str, Any]],
    keys: Sequence[str] = ("kind", "context", "decoder"),
    columns: Sequence[tuple[str, str]] = COLUMNS,
) -> str:
    """A Markdown table of summary entries (:func:`summarize`'s by default): ``keys``, n, then ``columns``."""
    head = [*keys, "n", *(title for _, title in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in summary:
        cells = [str(entry.get(k, "")) for k in keys] + [str(entry["n"])]
        for name, _ in columns:
            value = entry.get(name, "")
            if name in ("exact_match", "within_budget") and value != "":
                value = f"{100 * value:.1f} %"
            cells.append("" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

