"""Random-weight checkpoints written in the real on-disk format: tiny, or at a published shape.

Tests, benchmarks and the docs' examples need a checkpoint that exists without a
download. These are the same kind of folder a real download is (the family's
``config.json``, safetensors weights under the family's own tensor names,
optionally sharded with an index, and a byte-level BPE ``tokenizer.json``), only
random. :data:`SHAPES` holds published architectures (Open-dCoder-0.5B's Qwen2
shape, ...): their embedding is padded past the small tokenizer, as real
checkpoints pad theirs, so conversion, memory and speed are measured at the real
size. No torch needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|beginoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> HFTokenizer:
    """Train a byte-level BPE (Hugging Face ``tokenizers``) on ``texts``; special tokens get the first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def write_tokenizer_config(
    folder: Path, mask: str | None = MASK_TOKEN, eos: str = EOS_TOKEN, bos: str = BOS_TOKEN
) -> None:
    """``tokenizer_config.json`` naming the special tokens (``mask=None``: left to config.json, as LLaDA does)."""
    config = {"eos_token": eos, "pad_token": eos, "bos_token": bos, **({"mask_token": mask} if mask else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def default_texts() -> list[str]:
    """Some Python source to train a throwaway tokenizer on: this package's own files."""
    root = Path(__file__).resolve().parent
    return [p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.py"))]


SHARD_BYTES = 4 << 30
"""Checkpoints larger than this are written in shards of about this size, as real ones are."""

FAMILY_TRAITS: dict[str, dict[str, bool]] = {
    "dream": dict(qkv_bias=True, shifted=True),
    "llada": dict(qkv_bias=False, shifted=False),
    "qwen3": dict(qkv_bias=False, shifted=True, qk_norm=True),
}
"""The architecture each family fixes (the rest is the checkpoint's shape)."""

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {},
    # CoDA-v0 (Qwen3-1.7B based, untied head as its modelling code builds it): 2.03B parameters.
    "qwen3-1.7b": dict(
        family="qwen3", embedding_rows=151936, hidden_size=2048, intermediate_size=6144, num_layers=28,
        num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=False, rope_theta=1_000_000.0,
        max_positions=40960,
    ),
    # LLaDA-8B: 8.02B parameters (untied head, multi-head attention).
    "llada-8b": dict(
        family="llada", embedding_rows=126464, hidden_size=4096, intermediate_size=12288, num_layers=32,
        num_heads=32, num_kv_heads=32, tie_word_embeddings=False, rope_theta=500_000.0, max_positions=4096,
    ),
    # Open-dCoder-0.5B / Qwen2.5-0.5B: 494M parameters.
    "qwen2-0.5b": dict(
        embedding_rows=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
        num_kv_heads=2, tie_word_embeddings=True, rope_theta=1_000_000.0, max_positions=32768,
    ),
    # Dream-Coder-7B / DiffuCoder-7B (Qwen2.5-Coder-7B based, untied head): 7.62B parameters.
    "qwen2-7b": dict(
        embedding_rows=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, tie_word_embeddings=False, rope_theta=1_000_000.0, max_positions=32768,
    ),
    # Qwen2.5-1.5B (the base of 1.5B diffusion code models): 1.54B parameters.
    "qwen2-1.5b": dict(
        embedding_rows=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
        num_kv_heads=2, tie_word_embeddings=True, rope_theta=1_000_000.0, max_positions=32768,
    ),
}
"""Architectures ``--shape`` accepts (keyword arguments of :func:`write_random_checkpoint`)."""


def write_random_checkpoint(
    folder: str | Path,
    *,
    family: str = "dream",
    vocab_size: int = 512,
    embedding_rows: int | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = True,
    max_positions: int = 1024,
    rope_theta: float = 10000.0,
    head_dim: int | None = None,
    init_std: float = 0.2,
    shards: int = 1,
    seed: int = 0,
    texts: Iterable[str] | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a random-weight checkpoint of ``family`` to ``folder`` and return its path.

    The family decides the ``config.json``, the tensor names and the fixed parts of
    the architecture (dream: q/k/v bias, shifted; llada: no bias, unshifted; qwen3:
    per-head q/k norms).

    ``init_std`` is large on purpose: with tiny random weights the output
    distributions are then far from uniform, which makes parity tests meaningful.
    ``shards > 1`` splits the weights and writes ``model.safetensors.index.json``.
    ``vocab_size`` is the tokenizer's size; ``embedding_rows`` (default: the same)
    pads the embedding and head past it, as published checkpoints do.
    ``dtype`` ``bfloat16`` stores the weights as published 7-8B checkpoints do
    (half the bytes; needs torch to write them).
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype {dtype!r}: float32 or bfloat16")
    from safetensors.numpy import save_file as save_numpy

    def save_file(tensors: dict[str, np.ndarray], path: str) -> None:
        if dtype == "float32":
            return save_numpy(tensors, path)
        import torch
        from safetensors.torch import save_file as save_torch

        save_torch({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}, path, metadata={"format": "pt"})

    from engine.checkpoint import expected_shapes
    from engine.families import ArchConfig, TokenIds, get_family

    fam = get_family(family)
    traits = FAMILY_TRAITS[family]
    tokens = {name: fam.special_token_names[name][0] for name in ("eos", "mask", "bos")}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe_tokenizer(texts if texts is not None else default_texts(), vocab_size, list(tokens.values()))
    tokenizer.save(str(folder / "tokenizer.json"))
    real_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {name: tokenizer.token_to_id(tok) for name, tok in tokens.items()}
    if embedding_rows is not None and embedding_rows < real_vocab:
        raise ValueError(f"embedding_rows={embedding_rows} is smaller than the tokenizer ({real_vocab} ids)")
    arch = ArchConfig(
        vocab_size=embedding_rows or real_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads,
        rms_norm_eps=1e-6,
        rope_theta=rope_theta,
        max_positions=max_positions,
        tie_word_embeddings=tie_word_embeddings,
        **traits,
    )
    mask, eos = ids["mask"], ids["eos"]
    assert mask is not None and eos is not None, "special tokens are added by train_bpe_tokenizer"
    token_ids = TokenIds(mask=mask, eos=eos, pad=eos, bos=ids["bos"])
    config = fam.to_config(arch, token_ids)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    write_tokenizer_config(folder, None if family == "llada" else tokens["mask"], tokens["eos"], tokens["bos"])
    rng = np.random.default_rng(seed)
    names = fam.weight_names(arch)  # ours -> the checkpoint's
    shapes = expected_shapes(arch)
    total = (4 if dtype == "float32" else 2) * sum(int(np.prod(shape)) for shape in shapes.values())
    if shards <= 1 and total > SHARD_BYTES:
        shards = -(-total // SHARD_BYTES)  # a real-size model: written shard by shard, never whole in memory

    def draw(name: str) -> np.ndarray:
        if name.endswith("norm.weight"):
            return (1.0 + 0.1 * rng.standard_normal(shapes[name])).astype(np.float32)
        if total > SHARD_BYTES:  # float32 draws: half the memory of float64 at real sizes
            return init_std * rng.standard_normal(shapes[name], dtype=np.float32)
        return (init_std * rng.standard_normal(shapes[name])).astype(np.float32)

    if shards <= 1:
        save_file({names[n]: draw(n) for n in shapes}, str(folder / "model.safetensors"))
        return folder
    order = sorted(shapes, key=lambda n: names[n])
    weight_map: dict[str, str] = {}
    for i, chunk in enumerate(np.array_split(np.array(order, dtype=object), shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[str(n)]: draw(str(n)) for n in chunk}, str(folder / file))
        weight_map.update({names[str(n)]: file for n in chunk})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.tiny OUT``: write a random-weight checkpoint, tiny or at a published shape."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.tiny", description=main.__doc__)
    parser.add_argument("out", type=Path, help="folder to write")
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="tiny",
        help="a published architecture (random weights at its real size) instead of --layers/--hidden",
    )
    parser.add_argument("--family", choices=sorted(FAMILY_TRAITS), default="dream", help="family of a tiny checkpoint")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512, help="tokenizer size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init-std", type=float, default=0.02, help="weight scale (0.02, like a real initialisation, quantises cleanly)"
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32",
        help="how the weights are stored (published 7-8B checkpoints: bfloat16; writing it needs torch)",
    )
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape] or dict(
        family=args.family, num_layers=args.layers, hidden_size=args.hidden, intermediate_size=2 * args.hidden
    )
    write_random_checkpoint(
        args.out, vocab_size=args.vocab, seed=args.seed, init_std=args.init_std, dtype=args.dtype, **shape
    )
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
