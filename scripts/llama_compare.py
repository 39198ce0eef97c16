"""Our engine and llama.cpp side by side on the same typing, shape and windows (docs/benchmark.md, "Against llama.cpp").

    python scripts/llama_compare.py /work/corpus/heldout.jsonl --model runs/b05/engine-int8 \\
        --quant Q8_0 Q4_0 --windows 512 1024 2048 --sequences 2 --keys 12 --out runs/llama_compare.json

The autoregressive baseline a laptop user would pick is llama.vim on llama.cpp: this runs
llama.cpp through ``llama-cpp-python`` (``pip install llama-cpp-python gguf``: it builds
llama.cpp from source with the machine's compiler) on a GGUF written here with the ``gguf``
package at the engine folder's shape (the qwen2 architecture, random weights, Q8_0 / Q4_0),
``n_threads`` all cores, greedy, end of text ignored, its prompt cache on (a request
evaluates only what follows the longest prefix it shares with the previous one).

Both replay the same typing: lines of held-out files typed again one character per
keystroke (``scripts/reuse_replay.py``'s sequences), every keystroke a request for a
middle of ``N`` tokens (``--kinds``: ``single`` 10, ``multi32``, ``multi64``) in a window
of ``W`` tokens (3/4 prefix, 1/4 suffix; ``--windows``). The first keystroke of a sequence
is its cold request (no cache for that file), the rest are follow-ups.

* **dlm**: the language server's completion path (``complete_text``: window, context reuse
  per document, the sampler) with ``tokensPerStep`` 3 and a confidence threshold of 1, so
  that every step commits exactly 3 tokens, as a confident model would (random weights
  never are): ``ceil(N / 3)`` span steps after the context pass; ``lengthCandidates [N]``.
* **llama.cpp**, two prompt layouts: ``psm`` (``<PRE> prefix <SUF> suffix <MID>``, what
  llama.cpp's ``/infill`` builds by default and llama.vim gets: a keystroke changes the
  prefix's end, so the suffix is evaluated again), and ``spm`` (``<SUF> suffix <PRE> prefix
  <MID>``, ``--spm-infill``: only the new tokens are evaluated; a model must be trained
  for it). Its window keeps its start for the whole sequence (llama.vim cuts by lines),
  so the cache survives the sequence.

Each system runs in a process of its own (``--worker``), so that its load time, its
resident memory and its peak are its own. Reports per system, kind and window: p50/p95 of
follow-up keystrokes, the cold requests' median, tokens/s of the follow-ups, load time and
RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402

from _report import emit  # noqa: E402
from engine.bench import peak_rss_mb, percentile  # noqa: E402
from reuse_replay import sequences  # noqa: E402
from storm import rss_kb  # noqa: E402

KINDS = {"single": 10, "multi32": 32, "multi64": 64}
"""Middle kinds and the tokens each generates."""

FIM = {"pre": 3, "suf": 4, "mid": 5}
"""Token ids standing for the FIM markers in llama.cpp's prompts (the weights are random: any ids do)."""


def rss_mb() -> tuple[float, float]:
    """Current and peak resident memory of this process, MB."""
    return rss_kb(os.getpid()) / 1024, peak_rss_mb()


def write_gguf(path: Path, arch: Any, quant: str, seed: int = 0) -> None:
    """A qwen2-architecture GGUF of ``arch``'s shape with random weights (std 0.02), matrices in ``quant``."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, quant)
    rng = np.random.default_rng(seed)
    hidden, kv = arch.hidden_size, arch.num_kv_heads * arch.head_dim
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_context_length(arch.max_positions)
    writer.add_embedding_length(hidden)
    writer.add_block_count(arch.num_layers)
    writer.add_feed_forward_length(arch.intermediate_size)
    writer.add_head_count(arch.num_heads)
    writer.add_head_count_kv(arch.num_kv_heads)
    writer.add_rope_freq_base(arch.rope_theta)
    writer.add_layer_norm_rms_eps(arch.rms_norm_eps)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{quant}"))
    writer.add_tokenizer_model("llama")  # the ids are fed directly: a vocabulary of placeholders
    writer.add_token_list([f"<t{i}>".encode() for i in range(arch.vocab_size)])
    writer.add_token_scores([0.0] * arch.vocab_size)
    writer.add_token_types([gguf.TokenType.NORMAL] * arch.vocab_size)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(0)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = rng.normal(0, 0.02, (rows, cols)).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def vector(name: str, n: int, value: float | None = None) -> None:
        data = np.full(n, value, np.float32) if value is not None else rng.normal(0, 0.02, n).astype(np.float32)
        writer.add_tensor(name, data)

    matrix("token_embd.weight", arch.vocab_size, hidden)  # tied: also the output head
    for i in range(arch.num_layers):
        b = f"blk.{i}"
        vector(f"{b}.attn_norm.weight", hidden, 1.0)
        matrix(f"{b}.attn_q.weight", hidden, hidden)
        vector(f"{b}.attn_q.bias", hidden)
        matrix(f"{b}.attn_k.weight", kv, hidden)
        vector(f"{b}.attn_k.bias", kv)
        matrix(f"{b}.attn_v.weight", kv, hidden)
        vector(f"{b}.attn_v.bias", kv)
        matrix(f"{b}.attn_output.weight", hidden, hidden)
        vector(f"{b}.ffn_norm.weight", hidden, 1.0)
        matrix(f"{b}.ffn_gate.weight", arch.intermediate_size, hidden)
        matrix(f"{b}.ffn_up.weight", arch.intermediate_size, hidden)
        matrix(f"{b}.ffn_down.weight", hidden, arch.intermediate_size)
    vector("output_norm.weight", hidden, 1.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def typing(heldout: Path, count: int, keys: int) -> list[tuple[str, str, str]]:
    """The typing sequences both systems replay."""
    return sequences(heldout, count, keys, seed=0)


def run_dlm(cfg: dict[str, Any]) -> dict[str, Any]:
    """Replay the sequences through the language server's completion path."""
    from dlm_lsp.completion import complete_text
    from dlm_lsp.settings import parse_settings
    from engine import Engine

    t0 = time.perf_counter()
    engine = Engine.load(cfg["model"], backend="cpu")
    load_s = time.perf_counter() - t0
    rows = []
    for window in cfg["windows"]:
        for kind in cfg["kinds"]:
            n = KINDS[kind]
            settings, problems = parse_settings({
                "prefixTokens": window * 3 // 4, "suffixTokens": window // 4, "tokensPerStep": 3,
                "confidenceThreshold": 1.0, "minConfidence": 0, "latencyBudgetMs": 60000, "multiline": "always",
                "lengthCandidates": [n], "maxMiddleTokens": max(n, 64), "tokenHealing": False,
                **cfg.get("settings", {}),
            })
            assert not problems, problems
            for s, (before, line, after) in enumerate(typing(Path(cfg["heldout"]), cfg["sequences"], cfg["keys"])):
                for k in range(1, len(line) + 1):
                    prefix = before + line[:k]
                    got = complete_text(engine, prefix + after, len(prefix), "python", settings, reuse=f"{window}-{kind}-{s}")
                    stats = got.engine_stats
                    rows.append({"window": window, "kind": kind, "cold": k == 1, "ms": got.latency_ms, "tokens": n,
                                 "steps": stats.get("steps"), "context_ms": stats.get("context_ms"),
                                 "context_computed": stats.get("context_computed")})
            print(f"dlm {window} {kind} done", file=sys.stderr)
    current, peak = rss_mb()
    return {"load_s": load_s, "rss_mb": current, "peak_rss_mb": peak, "rows": rows}


def run_llama(cfg: dict[str, Any]) -> dict[str, Any]:
    """Replay the sequences on llama.cpp with its prompt cache (one layout, one quantisation)."""
    from llama_cpp import Llama

    from engine import Engine

    tokenizer = Engine.load(cfg["model"], backend="cpu").tokenizer  # the same ids as ours
    t0 = time.perf_counter()
    llm = Llama(model_path=cfg["gguf"], n_ctx=max(cfg["windows"]) + 128, n_batch=512, n_threads=cfg["threads"],
                n_threads_batch=cfg["threads"], flash_attn=False, verbose=False)
    load_s = time.perf_counter() - t0
    rows = []
    for window in cfg["windows"]:
        for kind in cfg["kinds"]:
            n = KINDS[kind]
            for before, line, after in typing(Path(cfg["heldout"]), cfg["sequences"], cfg["keys"]):
                head = tokenizer.encode(before)[-(window * 3 // 4):]  # kept for the sequence (llama.vim cuts by lines)
                tail = tokenizer.encode(after)[: window // 4]
                llm.reset()
                for k in range(1, len(line) + 1):
                    prefix = head + tokenizer.encode(line[:k])
                    if cfg["layout"] == "psm":
                        prompt = [FIM["pre"], *prefix, FIM["suf"], *tail, FIM["mid"]]
                    else:
                        prompt = [FIM["suf"], *tail, FIM["pre"], *prefix, FIM["mid"]]
                    started = time.perf_counter()
                    made = 0
                    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
                        made += 1
                        if made == n:
                            break
                    rows.append({"window": window, "kind": kind, "cold": k == 1,
                                 "ms": (time.perf_counter() - started) * 1000, "tokens": made})
            print(f"llama {cfg['quant']} {cfg['layout']} {window} {kind} done", file=sys.stderr)
    current, peak = rss_mb()
    return {"load_s": load_s, "rss_mb": current, "peak_rss_mb": peak, "rows": rows}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per window and kind: follow-up p50/p95, cold median, tokens/s of follow-ups."""
    out = []
    for window in sorted({r["window"] for r in rows}):
        for kind in KINDS:
            group = [r for r in rows if r["window"] == window and r["kind"] == kind]
            if not group:
                continue
            follow = sorted(r["ms"] for r in group if not r["cold"])
            cold = [r["ms"] for r in group if r["cold"]]
            p95 = percentile(follow, 95) if follow else None
            p50 = statistics.median(follow) if follow else None
            extra = {}
            for key in ("steps", "context_ms", "context_computed"):
                values = [r[key] for r in group if not r["cold"] and r.get(key) is not None]
                if values:
                    extra[f"{key}_p50"] = round(statistics.median(values), 1)
            out.append({
                **extra, "window": window, "kind": kind, "followups": len(follow),
                "p50_ms": round(p50, 1) if p50 else None, "p95_ms": round(p95, 1) if p95 else None,
                "cold_ms": round(statistics.median(cold), 1) if cold else None,
                "tokens_per_s": round(KINDS[kind] / p50 * 1000, 1) if p50 else None,
            })
    return out


def markdown(report: dict[str, Any]) -> str:
    """One table: a row per window and kind, a column pair (p50 / p95, cold) per system."""
    systems = list(report["systems"])
    head = "| window | middle | " + " | ".join(f"{s} p50 / p95 (cold)" for s in systems) + " |"
    lines = [head, "|" + "---|" * (2 + len(systems))]
    keyed = {s: {(r["window"], r["kind"]): r for r in report["systems"][s]["summary"]} for s in systems}
    for window in report["windows"]:
        for kind in report["kinds"]:
            cells = []
            for s in systems:
                r = keyed[s].get((window, kind))
                cells.append(f"{r['p50_ms']:.0f} / {r['p95_ms']:.0f} ({r['cold_ms']:.0f}) ms" if r and r["p50_ms"] else "-")
            lines.append(f"| {window} | {kind} ({KINDS[kind]} tokens) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| system | load | RSS after the run | peak RSS |")
    lines.append("|---|---|---|---|")
    for s in systems:
        r = report["systems"][s]
        lines.append(f"| {s} | {r['load_s']:.1f} s | {r['rss_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB |")
    return "\n".join(lines)


def main() -> int:
    """Write the GGUFs, run every system in its own process, print and optionally write the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("heldout", type=Path, help="held-out corpus split (heldout.jsonl from dlm-corpus)")
    p.add_argument("--model", type=Path, required=True, help="our engine folder (its shape is llama.cpp's too)")
    p.add_argument("--quant", nargs="+", default=["Q8_0", "Q4_0"], choices=["Q8_0", "Q4_0"])
    p.add_argument("--layouts", nargs="+", default=["psm", "spm"], choices=["psm", "spm"])
    p.add_argument("--windows", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--sequences", type=int, default=2)
    p.add_argument("--keys", type=int, default=12, help="keystrokes per sequence (at most)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: every core)")
    p.add_argument("--gguf-dir", type=Path, default=None, help="where the GGUFs are written (kept for a rerun)")
    p.add_argument("--skip", nargs="*", default=[], help="systems not to run (dlm, llama.cpp-Q8_0-psm, ...)")
    p.add_argument("--no-llama", action="store_true", help="run ours only (its rows, measured alone)")
    p.add_argument("--settings", type=json.loads, default={},
                   help='more language server settings for ours, as JSON (e.g. \'{"spanCache": "off"}\')')
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.worker:
        cfg = json.loads(args.worker)
        result = run_dlm(cfg) if cfg["system"] == "dlm" else run_llama(cfg)
        print(json.dumps(result))
        return 0
    from engine.manifest import read_manifest

    arch = read_manifest(args.model).arch
    threads = args.threads or len(os.sched_getaffinity(0))
    gguf_dir = args.gguf_dir or Path(tempfile.mkdtemp(prefix="llama_compare."))
    gguf_dir.mkdir(parents=True, exist_ok=True)
    base = {"model": str(args.model), "heldout": str(args.heldout), "windows": args.windows, "kinds": args.kinds,
            "sequences": args.sequences, "keys": args.keys, "threads": threads}
    jobs: dict[str, dict[str, Any]] = {"dlm": {**base, "system": "dlm", "settings": args.settings}}
    for quant in args.quant:
        path = gguf_dir / f"qwen2-shape-{quant}.gguf"
        for layout in args.layouts:
            jobs[f"llama.cpp-{quant}-{layout}"] = {**base, "system": "llama", "gguf": str(path), "quant": quant,
                                                   "layout": layout}
    report: dict[str, Any] = {"model": str(args.model), "windows": args.windows, "kinds": args.kinds,
                              "settings": args.settings,
                              "sequences": args.sequences, "keys": args.keys, "threads": threads, "systems": {}}
    for name, cfg in jobs.items():
        if name in args.skip or (args.no_llama and name != "dlm"):
            continue
        if cfg["system"] == "llama" and not Path(cfg["gguf"]).is_file():
            print(f"writing {cfg['gguf']}", file=sys.stderr)
            write_gguf(Path(cfg["gguf"]), arch, cfg["quant"])
        done = subprocess.run([sys.executable, __file__, str(args.heldout), "--model", str(args.model),
                               "--worker", json.dumps(cfg)], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["summary"] = summarize(result.pop("rows"))
        report["systems"][name] = result
        print(f"{name}: {json.dumps(result['summary'])}", file=sys.stderr)
    report["markdown"] = markdown(report)
    print(report["markdown"], file=sys.stderr)
    return emit(report, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
