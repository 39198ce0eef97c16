"""``dlm-train``: train the default model (a small dream-family model) in resumable chunks.

    dlm-train prepare CORPUS RUN   # tokenizer + token streams + model config
    dlm-train run RUN --minutes 60 # train; resumes from RUN/checkpoint.pt; stops with a checkpoint
    dlm-train export RUN OUT       # Hugging Face-format folder (config.json, safetensors, tokenizer)

PyTorch on the CPU here (CUDA when present), seeded, checkpointed every few
minutes with optimizer and RNG state, so a session limit never loses more than
one interval. Progress (loss, tokens/s, ETA) goes to stderr and ``RUN/log.jsonl``.
The objective is in :mod:`engine.train.data`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.families import ArchConfig


@dataclass
class TrainConfig:
    """Hyper-parameters of a run (``RUN/train_config.json``)."""

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    window: int = 256
    batch_size: int = 24
    peak_lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 300
    total_steps: int = 6000
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    span_share: float = 0.5
    seed: int = 0
    checkpoint_minutes: float = 5.0
    eval_every: int = 250

    def arch(self) -> ArchConfig:
        """The model's architecture (dream family: bidirectional, shifted, q/k/v bias, tied head)."""
        return ArchConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.hidden_size // self.num_heads,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            max_positions=self.window,
            qkv_bias=True,
            tie_word_embeddings=True,
            shifted=True,
        )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * peak_lr`` at ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.peak_lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    return cfg.peak_lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def init_weights(model: Any, cfg: TrainConfig) -> None:
    """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2L), norms at 1, biases 0."""
    import torch

    std = 0.02
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            torch.nn.init.ones_(param)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(param)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(param, 0.0, std / math.sqrt(2 * cfg.num_layers))
        else:
            torch.nn.init.normal_(param, 0.0, std)


def prepare(corpus: Path, run: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Tokenizer, token streams and config for a new run."""
    from engine.train.data import bytes_per_token, encode_stream, read_texts, train_tokenizer

    for split in ("train.jsonl", "heldout.jsonl"):
        if not (corpus / split).is_file():
            raise SystemExit(f"dlm-train: error: {corpus / split} not found; build the corpus first with dlm-corpus")
    try:
        train_texts = read_texts(corpus / "train.jsonl")
        heldout_texts = read_texts(corpus / "heldout.jsonl")
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"dlm-train: error: unreadable corpus in {corpus}: {exc!r}; rebuild it with dlm-corpus") from exc
    run.mkdir(parents=True, exist_ok=True)
    if not train_texts or not heldout_texts:
        raise SystemExit(f"dlm-train: error: {corpus} has an empty train or held-out split")
    t0 = time.time()
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    tokenizer.save(str(run / "tokenizer.json"))
    cfg.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    stream = encode_stream(tokenizer, train_texts)
    np.save(run / "train_tokens.npy", stream)
    np.save(run / "heldout_tokens.npy", encode_stream(tokenizer, heldout_texts))
    report = {
        "tokenizer_seconds": round(time.time() - t0, 1),
        "vocab_size": cfg.vocab_size,
        "train_tokens": int(len(stream)),
        "heldout_bytes_per_token": round(bytes_per_token(tokenizer, heldout_texts), 3),
        "train_files": len(train_texts),
        "heldout_files": len(heldout_texts),
    }
    (run / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    (run / "data_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (run / "corpus_path.txt").write_text(str(corpus.resolve()) + "\n")
    return report


def _save(path: Path, state: dict[str, Any]) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-save keeps the previous checkpoint


def _load_checkpoint(path: Path, device: str) -> dict[str, Any]:
    """A run's checkpoint: tensors and plain data only (``weights_only``), so loading one runs no code.

    A checkpoint is a pickle; unpickled in full, a crafted one executes whatever it
    names. Ours hold only tensors, numbers, strings, lists and dicts.
    """
    import pickle

    import torch

    from engine.errors import CheckpointError

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds more than tensors and plain data, so it is not loaded (unpickling it could run code): "
            f"it is not a dlm-train checkpoint ({str(exc).splitlines()[0]})"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a dlm-train checkpoint (a {type(state).__name__}, not a dict)")
    return state


def _loss(model: Any, batch: dict[str, Any]) -> Any:
    """Mean cross-entropy over the positions that have a target.

    The LM head runs only on those rows (about half of all positions): on this CPU
    the head and its log-softmax were ~40 % of a step when computed everywhere.
    """
    import torch.nn.functional as F

    hidden = model.hidden_states(batch["input_ids"], valid=batch["valid"])
    rows = batch["targets"] != -100
    logits = F.linear(hidden[rows], model.head_weight())
    return F.cross_entropy(logits, batch["targets"][rows])


def evaluate(model: Any, batches: list[dict[str, Any]]) -> float:
    """Mean masked-token loss over fixed held-out batches."""
    import torch

    model.eval()
    with torch.no_grad():
        losses = [float(_loss(model, b)) for b in batches]
    model.train()
    return float(np.mean(losses))


def run_training(run: Path, minutes: float, threads: int | None = None) -> dict[str, Any]:
    """Train until ``minutes`` have passed or ``total_steps`` is reached; resumes from ``RUN/checkpoint.pt``."""
    import torch
    from tokenizers import Tokenizer

    from engine.modeling import Transformer
    from engine.train.data import Batcher, read_texts

    cfg = TrainConfig(**json.loads((run / "train_config.json").read_text()))
    torch.set_num_threads(threads or torch.get_num_threads())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = Tokenizer.from_file(str(run / "tokenizer.json"))
    corpus = Path((run / "corpus_path.txt").read_text().strip())
    batcher = Batcher(tokenizer, read_texts(corpus / "train.jsonl"), np.load(run / "train_tokens.npy"), cfg.window, cfg.span_share)
    heldout = Batcher(tokenizer, read_texts(corpus / "heldout.jsonl"), np.load(run / "heldout_tokens.npy"), cfg.window, cfg.span_share)

    def to_device(b: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: torch.as_tensor(v).to(device) for k, v in b.items()}

    eval_rng = np.random.default_rng(12345)
    eval_batches = [to_device(heldout.batch(cfg.batch_size, eval_rng)) for _ in range(8)]
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.arch()).to(device)
    init_weights(model, cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.peak_lr, betas=(0.9, 0.95), eps=1e-8,
    )
    step, tokens_seen, train_seconds = 0, 0, 0.0
    rng = np.random.default_rng(cfg.seed)
    ckpt_path = run / "checkpoint.pt"
    if ckpt_path.is_file():
        state = _load_checkpoint(ckpt_path, device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, tokens_seen, train_seconds = state["step"], state["tokens_seen"], state["train_seconds"]
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        print(f"dlm-train: resumed at step {step} ({tokens_seen / 1e6:.1f}M tokens)", file=sys.stderr)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"dlm-train: {n_params / 1e6:.2f}M parameters on {device}, {torch.get_num_threads()} threads", file=sys.stderr)

    def checkpoint() -> None:
        _save(ckpt_path, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "tokens_seen": tokens_seen,
            "train_seconds": train_seconds, "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "config": asdict(cfg),
        })

    log = (run / "log.jsonl").open("a")
    start = time.time()
    last_ckpt = start
    ema = None
    model.train()
    while step < cfg.total_steps and time.time() - start < minutes * 60:
        t0 = time.time()
        batch = to_device(batcher.batch(cfg.batch_size, rng))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = _loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens_seen += int(batch["valid"].sum())
        dt = time.time() - t0
        train_seconds += dt
        value = loss.item()
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        if step % 20 == 0 or step == 1:
            tps = cfg.batch_size * cfg.window / dt
            eta_min = (cfg.total_steps - step) * dt / 60
            record = {"step": step, "loss": round(ema, 4), "lr": lr_at(step, cfg), "tokens_per_s": round(tps), "tokens_seen": tokens_seen, "train_hours": round(train_seconds / 3600, 3)}
            print(f"step {step}/{cfg.total_steps} loss {ema:.3f} lr {record['lr']:.2e} {tps:.0f} tok/s ETA {eta_min:.0f} min", file=sys.stderr)
            log.write(json.dumps(record) + "\n")
            log.flush()
        if step % cfg.eval_every == 0:
            val = evaluate(model, eval_batches)
            print(f"step {step} held-out loss {val:.4f}", file=sys.stderr)
            log.write(json.dumps({"step": step, "heldout_loss": round(val, 4), "tokens_seen": tokens_seen}) + "\n")
            log.flush()
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    log.close()
    return {"step": step, "tokens_seen": tokens_seen, "train_hours": train_seconds / 3600}


def export_hf(run: Path, out: Path) -> Path:
    """Write the run's latest checkpoint as a Hugging Face-format dream checkpoint folder."""
    import shutil

    from safetensors.torch import save_file

    from engine.families import TokenIds
    from engine.families.dream import to_config
    from engine.tiny import write_tokenizer_config
    from engine.train.data import SpecialIds

    cfg = TrainConfig(**json.loads((run / "train_config.json").read_text()))
    state = _load_checkpoint(run / "checkpoint.pt", "cpu")
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in state["model"].items() if not k.startswith("rotary")}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    ids = SpecialIds()
    token_ids = TokenIds(mask=ids.mask, eos=ids.eos, pad=ids.eos, bos=ids.bos)
    training = {"step": state["step"], "tokens_seen": state["tokens_seen"], "train_hours": round(state["train_seconds"] / 3600, 3)}
    config = to_config(cfg.arch(), token_ids, dlm_training=training)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy2(run / "tokenizer.json", out / "tokenizer.json")
    write_tokenizer_config(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dlm-train``."""
    parser = argparse.ArgumentParser(prog="dlm-train", description="Train the default dream-family model.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenizer, token streams and config for a new run")
    p.add_argument("corpus", type=Path)
    p.add_argument("run", type=Path)
    for field_name, default in asdict(TrainConfig()).items():
        p.add_argument("--" + field_name.replace("_", "-"), type=type(default), default=default)
    r = sub.add_parser("run", help="train (resumes from RUN/checkpoint.pt)")
    r.add_argument("run", type=Path)
    r.add_argument("--minutes", type=float, default=60.0, help="stop (with a checkpoint) after this long")
    r.add_argument("--threads", type=int, default=None)
    e = sub.add_parser("export", help="write a Hugging Face-format checkpoint folder")
    e.add_argument("run", type=Path)
    e.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
        print(json.dumps(prepare(args.corpus, args.run, cfg), indent=2))
    elif args.cmd == "run":
        print(json.dumps(run_training(args.run, args.minutes, args.threads)))
    else:
        print(export_hf(args.run, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
