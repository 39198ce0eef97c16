"""Command-line tools: ``dlm-convert`` and ``dlm-complete``.

Both print engine errors as one clear line on stderr and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from engine.backends.base import BACKENDS
from engine.errors import EngineError, InputError
from engine.sampler import SPAN_CACHE_MODES, SamplingParams, UnmaskOrder


def _run(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return main(args)
    except EngineError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


def convert_parser() -> argparse.ArgumentParser:
    """Arguments of ``dlm-convert``."""
    from engine.export import PRECISIONS
    from engine.families import family_names

    parser = argparse.ArgumentParser(
        prog="dlm-convert",
        description="Convert a Hugging Face-format diffusion checkpoint folder into an engine folder "
        "(context + span-step ONNX graphs, validated against PyTorch, with a checksummed manifest).",
    )
    parser.add_argument("src", type=Path, help="checkpoint folder (config.json, *.safetensors, tokenizer.json); "
                        "with --engine alone, an engine folder to build engines for")
    parser.add_argument("dst", type=Path, nargs="?", help="engine folder to write")
    parser.add_argument("--family", choices=family_names(), help="model family (default: detect from config.json)")
    parser.add_argument(
        "--precision", choices=(*PRECISIONS, "auto"), default="int8",
        help="weight precision (default: int8; int4: 4-bit weights, smaller, slower on CPUs; auto: int8 if it passes "
        "validation, else fp32, and int8 alone for a model larger than memory)",
    )
    parser.add_argument("--top-k", type=int, default=2, help="candidates per position the graphs return (>= 2)")
    parser.add_argument(
        "--memory-gb", type=_positive_gb, default=None,
        help="memory the conversion plans on (default: what the machine has available now); a model whose "
        "float32 path needs more converts one weight at a time, without float32 graphs",
    )
    parser.add_argument(
        "--engine", choices=("tensorrt",),
        help="also build native TensorRT engines for this machine's GPU (needs the gpu extra and --precision fp32); "
        "`dlm-convert --engine tensorrt FOLDER` builds them for an engine folder already converted",
    )
    parser.add_argument(
        "--engine-dtype", choices=("auto", "fp16", "bf16"), default="auto",
        help="the engines' half precision (default auto: fp16 unless it overflows on this model, checked on the CPU)",
    )
    parser.add_argument("--force", action="store_true", help="replace DST if it exists (and rebuild engines)")
    parser.add_argument(
        "--to-checkpoint",
        action="store_true",
        help="the other way: SRC is an engine folder, DST the fp32 checkpoint folder to recover from its graphs "
        "(int8 weights dequantised; validated against SRC)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _positive_gb(value: str) -> float:
    try:
        gb = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, got {value!r}") from None
    if not gb > 0:
        raise argparse.ArgumentTypeError(f"memory must be more than 0 GB, got {value}")
    return gb


def _convert(args: argparse.Namespace) -> int:
    from engine.export import convert, recover_checkpoint

    say = lambda msg: print(f"dlm-convert: {msg}", file=sys.stderr)  # noqa: E731
    if args.dst is None:
        if args.engine is None or args.to_checkpoint:
            raise InputError("DST is missing: dlm-convert SRC DST (only --engine tensorrt FOLDER takes one folder)")
        return _build_engine(args.src, args.engine_dtype, args.force, say)
    if args.to_checkpoint:
        print(json.dumps({"checkpoint": str(recover_checkpoint(args.src, args.dst, force=args.force))}))
        return 0
    if args.engine is not None and args.precision != "fp32":
        raise InputError(f"--engine tensorrt builds from fp32 graphs: add --precision fp32 (not {args.precision})")

    manifest = convert(
        args.src,
        args.dst,
        family=args.family,
        precision=args.precision,
        top_k=args.top_k,
        force=args.force,
        progress=say,
        memory=None if args.memory_gb is None else int(args.memory_gb * 1e9),
    )
    print(json.dumps({"engine": str(args.dst), "validation": manifest.validation}, indent=2))
    return 0 if args.engine is None else _build_engine(args.dst, args.engine_dtype, args.force, say)


def _build_engine(folder: Path, dtype: str, force: bool, say: Callable[[str], None]) -> int:
    """``dlm-convert --engine tensorrt``: the folder's native engines for this GPU; prints their build record."""
    from engine.backends.tensorrt import BUILD_RECORD, build_engines
    from engine.manifest import is_engine_folder, read_manifest

    if not is_engine_folder(folder):
        raise InputError(f"{folder} is not an engine folder (no manifest.json): convert the checkpoint first, "
                         f"dlm-convert CHECKPOINT {folder} --precision fp32 --engine tensorrt")
    where = build_engines(folder, read_manifest(folder), dtype=dtype, progress=say, force=force)
    print((where / BUILD_RECORD).read_text(encoding="utf-8"))
    return 0


def convert_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dlm-convert``."""
    return _run(_convert, convert_parser(), argv)


def _lengths(value: str) -> tuple[int, ...] | None:
    if value == "auto":
        return None
    try:
        lengths = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N, N,N,... or 'auto', got {value!r}") from None
    if any(n < 1 for n in lengths):
        raise argparse.ArgumentTypeError("lengths must be positive")
    return lengths


def complete_parser() -> argparse.ArgumentParser:
    """Arguments of ``dlm-complete``."""
    defaults = SamplingParams()
    parser = argparse.ArgumentParser(
        prog="dlm-complete",
        description="Fill in the middle between a prefix and a suffix with a masked diffusion model.",
    )
    parser.add_argument(
        "--model", required=True,
        help="catalog name (dlm-lsp models list), engine folder, or checkpoint folder with --backend torch",
    )
    parser.add_argument("--prefix-file", type=Path, required=True, help="text before the cursor ('-' for stdin)")
    parser.add_argument("--suffix-file", type=Path, help="text after the cursor (default: empty)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="runtime (default: auto)")
    parser.add_argument(
        "--length",
        type=_lengths,
        default=None,
        help=f"middle length in tokens: N, a list N,N,... of candidates, or auto (default: {','.join(map(str, defaults.lengths))})",
    )
    parser.add_argument("--threshold", type=float, default=defaults.threshold, help="commit confidence threshold; 1.0 = one token per step")
    parser.add_argument("--tokens-per-step", type=int, default=defaults.tokens_per_step, help="minimum commits per step")
    parser.add_argument("--order", choices=[o.value for o in UnmaskOrder], default=defaults.order.value, help="unmasking order")
    parser.add_argument(
        "--span-cache", choices=list(SPAN_CACHE_MODES), default="auto",
        help="compute only the still-masked rows at each step and cache the committed ones (an approximation; "
        "auto: on for candidates of 32 tokens or more)",
    )
    parser.add_argument(
        "--exact", action="store_true",
        help="reference decoding: recompute the whole window every step, plain confidence order (no end-token deferral)",
    )
    parser.add_argument(
        "--heal", action="store_true",
        help="token healing: back the prefix up by its last token and have the middle write it again (as the server does)",
    )
    parser.add_argument("--budget-ms", type=float, default=None, help="latency budget of the denoising loop")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed (random order only; decoding is greedy)")
    parser.add_argument("--family", help="family override for a checkpoint folder (torch backend)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per op (default: 1 for a model of hidden size <= 512, else all available)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _read(path: Path | None) -> str:
    if path is None:
        return ""
    if str(path) == "-":
        return sys.stdin.read()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


def _complete(args: argparse.Namespace) -> int:
    from engine.engine import Engine

    kwargs = {}
    if args.length is not None:
        kwargs["lengths"] = args.length
    params = SamplingParams(
        threshold=args.threshold,
        tokens_per_step=args.tokens_per_step,
        order=UnmaskOrder(args.order),
        exact=args.exact,
        defer_end=not args.exact,
        cached_span=SPAN_CACHE_MODES[args.span_cache],
        budget_ms=args.budget_ms,
        seed=args.seed,
        **kwargs,
    )
    prefix, suffix = _read(args.prefix_file), _read(args.suffix_file)
    from engine.catalog import resolve

    engine = Engine.load(resolve(args.model), backend=args.backend, family=args.family, threads=args.threads)
    completion = engine.complete(prefix, suffix, params, heal=args.heal)
    if args.json:
        info = engine.info
        result = {
            "model": str(resolve(args.model)),
            "family": info.family,
            "backend": info.backend,
            "device": info.device,
            "precision": info.precision,
            **completion.to_dict(),
        }
        print(json.dumps(result, indent=2))
    else:
        sys.stdout.write(completion.text)
        if not completion.text.endswith("\n"):
            sys.stdout.write("\n")
        stats = completion.stats
        print(
            f"[{engine.info.backend}] {stats['middle_tokens']} tokens in {stats['total_ms']:.1f} ms, "
            f"{stats['steps']} steps, {stats['tokens_per_step']:.2f} tokens/step"
            + (" (cut by budget)" if completion.cut else ""),
            file=sys.stderr,
        )
    return 0


def complete_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dlm-complete``."""
    return _run(_complete, complete_parser(), argv)
