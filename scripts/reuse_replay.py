"""Context reuse against a full context pass, replayed over real typing (docs/engine.md, "Context reuse").

    python scripts/reuse_replay.py /work/corpus/heldout.jsonl --sequences 30 --keys 40
    python scripts/reuse_replay.py /work/corpus/heldout.jsonl --model runs/b05/engine-int8 \\
        --settings '{"prefixTokens": 768, "suffixTokens": 256, "tokensPerStep": 3}' --sequences 8 --keys 24

Each sequence picks a line of a held-out file and types it again, one character per
keystroke, with the rest of the file after the cursor; every keystroke asks for a
completion through the language server's completion path (window, token healing, the
server's candidate lengths; no budget, so that no cut mixes in) once with a full context
pass and once per reuse policy (each policy with its own state, carried from keystroke to
keystroke as the server would). Reports, per policy, how often the middle's first line
equals the full pass's, and the median context-pass time and share of context reused.

An int8 model quantises activations per call, over the rows of that call: a partial pass
rounds differently from a full one even where nothing is stale. ``--reference`` (the same
weights in fp32, e.g. ``dlm-convert CKPT OUT --precision fp32``) separates the two: each
variant's first lines are also compared with the reference's full pass, so that reuse is
judged by whether it moves the int8 model away from what its weights compute.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from _report import emit, measuring_settings  # noqa: E402
from dlm_lsp.completion import complete_text  # noqa: E402
from engine import Engine, default_model_path  # noqa: E402
from engine.bench import percentile  # noqa: E402
from engine.reuse import ContextStore, ReusePolicy  # noqa: E402
from engine.train.corpus import read_jsonl  # noqa: E402

POLICIES = {
    f"band{band}-age{age}": ReusePolicy(band=band, max_age=age)
    for band, age in ((8, 8), (8, 16), (16, 8), (16, 16), (32, 8), (32, 16), (48, 16), (48, 32), (64, 4), (64, 8),
                      (64, 16), (64, 32), (96, 32), (128, 32))
}


def sequences(path: Path, count: int, keys: int, seed: int) -> list[tuple[str, str, str]]:
    """(text before the line, the line typed again, the text after it) from held-out files."""
    rng = np.random.default_rng(seed)
    files = [row["text"] for row in read_jsonl(path)]
    out: list[tuple[str, str, str]] = []
    while len(out) < count:
        lines = files[int(rng.integers(0, len(files)))].splitlines(keepends=True)
        content = [i for i, line in enumerate(lines) if len(line.strip()) > 10]
        if len(content) < 8:
            continue
        i = int(rng.choice(content[3:]))
        typed = lines[i].rstrip("\n")[: keys]
        out.append(("".join(lines[:i]), typed, "\n" + "".join(lines[i + 1 :])))
    return out


def first_line(text: str | None) -> str:
    """The first line of a middle (what a single-line suggestion shows)."""
    return (text or "").split("\n", 1)[0]


def main() -> int:
    """Replay every sequence, print and optionally write the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("heldout", type=Path, help="held-out corpus split (heldout.jsonl from dlm-corpus)")
    p.add_argument("--model", type=Path, default=None, help="engine folder (default: the shipped model)")
    p.add_argument("--settings", default="{}", help="the language server's settings as JSON")
    p.add_argument("--sequences", type=int, default=30)
    p.add_argument("--keys", type=int, default=40, help="keystrokes per sequence (at most)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--reference", type=Path, default=None,
                   help="the same weights at fp32 (an engine folder): agreement with its full pass is reported too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    settings = measuring_settings(p, args.settings)
    engine = Engine.load(args.model or default_model_path(), backend="cpu")
    if engine.contexts is None:
        p.error(f"{engine.path} cannot reuse context (an engine folder of format 2): convert it again")
    reference = Engine.load(args.reference, backend="cpu") if args.reference else None
    stores = {name: ContextStore(POLICIES[name]) for name in args.policies}
    rows: dict[str, list[dict]] = {name: [] for name in ["full", *args.policies]}
    truth: list[str] = []
    for n, (before, line, after) in enumerate(sequences(args.heldout, args.sequences, args.keys, args.seed)):
        for k in range(len(line) + 1):
            prefix = before + line[:k]
            text, offset = prefix + after, len(prefix)
            full = complete_text(engine, text, offset, "python", replace(settings, context_reuse=False))
            if reference is not None:
                truth.append(first_line(complete_text(reference, text, offset, "python",
                                                      replace(settings, context_reuse=False)).raw_text))
            rows["full"].append({"first": first_line(full.raw_text), "context_ms": full.engine_stats["context_ms"],
                                 "total_ms": full.latency_ms})
            for name, store in stores.items():
                engine.contexts = store
                got = complete_text(engine, text, offset, "python", settings, reuse=f"seq{n}")
                stats = got.engine_stats
                rows[name].append({
                    "first": first_line(got.raw_text), "context_ms": stats["context_ms"], "total_ms": got.latency_ms,
                    "reused": stats.get("context_reused", 0), "computed": stats.get("context_computed", 0),
                })
        print(f"sequence {n + 1}/{args.sequences}: {len(line) + 1} keystrokes", file=sys.stderr)
    report: dict = {"model": str(engine.path), "settings": args.settings, "keystrokes": len(rows["full"]), "policies": {}}
    full_rows = rows["full"]
    report["full"] = {"context_ms_p50": round(statistics.median(r["context_ms"] for r in full_rows), 2),
                      "total_ms_p50": round(statistics.median(r["total_ms"] for r in full_rows), 2),
                      "total_ms_p95": round(percentile([r["total_ms"] for r in full_rows], 95), 2)}
    if truth:
        report["reference"] = str(args.reference)
        report["full"]["same_as_reference"] = round(sum(a == r["first"] for a, r in zip(truth, full_rows)) / len(truth), 4)
    for name in args.policies:
        replayed = rows[name]
        same = sum(a["first"] == b["first"] for a, b in zip(full_rows, replayed))
        context = [r["reused"] + r["computed"] for r in replayed]
        report["policies"][name] = {
            "identical_first_lines": same, "of": len(replayed), "share": round(same / len(replayed), 4),
            "context_ms_p50": round(statistics.median(r["context_ms"] for r in replayed), 2),
            "total_ms_p50": round(statistics.median(r["total_ms"] for r in replayed), 2),
            "total_ms_p95": round(percentile([r["total_ms"] for r in replayed], 95), 2),
            "reused_share": round(sum(r["reused"] for r in replayed) / max(1, sum(context)), 3),
            "computed_mean": round(statistics.fmean(r["computed"] for r in replayed), 1),
            "computed_max_partial": max((r["computed"] for r in replayed if r["reused"]), default=0),
            "partial_passes": sum(r["reused"] > 0 for r in replayed),
        }
        if truth:
            report["policies"][name]["same_as_reference"] = round(
                sum(a == r["first"] for a, r in zip(truth, replayed)) / len(truth), 4)
    return emit(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
