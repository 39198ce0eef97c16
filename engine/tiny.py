"""Tiny dream-family checkpoints with random weights, written in the real on-disk format.

Tests, benchmarks of engine overheads and the docs' examples need a checkpoint
that exists without a download. These are the same kind of folder a real
Dream/DiffuCoder download is (``config.json`` with ``model_type: "Dream"``,
safetensors weights, optionally sharded with an index, and a byte-level BPE
``tokenizer.json``), only small and random. No torch needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

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


def write_tokenizer_config(folder: Path) -> None:
    """``tokenizer_config.json`` naming the special tokens of our tokenizers."""
    config = {"mask_token": MASK_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "bos_token": BOS_TOKEN}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def default_texts() -> list[str]:
    """Some Python source to train a throwaway tokenizer on: this package's own files."""
    root = Path(__file__).resolve().parent
    return [p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.py"))]


def write_random_checkpoint(
    folder: str | Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = True,
    max_positions: int = 1024,
    rope_theta: float = 10000.0,
    init_std: float = 0.2,
    shards: int = 1,
    seed: int = 0,
    texts: Iterable[str] | None = None,
) -> Path:
    """Write a random-weight dream-family checkpoint to ``folder`` and return its path.

    ``init_std`` is large on purpose: with tiny random weights the output
    distributions are then far from uniform, which makes parity tests meaningful.
    ``shards > 1`` splits the weights and writes ``model.safetensors.index.json``.
    """
    from safetensors.numpy import save_file

    from engine.checkpoint import expected_shapes
    from engine.families import ArchConfig, TokenIds
    from engine.families.dream import to_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe_tokenizer(
        texts if texts is not None else default_texts(), vocab_size, [EOS_TOKEN, MASK_TOKEN, BOS_TOKEN]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    real_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {name: tokenizer.token_to_id(tok) for name, tok in (("eos", EOS_TOKEN), ("mask", MASK_TOKEN), ("bos", BOS_TOKEN))}
    arch = ArchConfig(
        vocab_size=real_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        rms_norm_eps=1e-6,
        rope_theta=rope_theta,
        max_positions=max_positions,
        qkv_bias=True,
        tie_word_embeddings=tie_word_embeddings,
        shifted=True,
    )
    mask, eos = ids["mask"], ids["eos"]
    assert mask is not None and eos is not None, "special tokens are added by train_bpe_tokenizer"
    token_ids = TokenIds(mask=mask, eos=eos, pad=eos, bos=ids["bos"])
    (folder / "config.json").write_text(json.dumps(to_config(arch, token_ids), indent=2) + "\n", encoding="utf-8")
    write_tokenizer_config(folder)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(arch).items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (init_std * rng.standard_normal(shape)).astype(np.float32)
    names = sorted(tensors)
    if shards <= 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for i, chunk in enumerate(np.array_split(np.array(names, dtype=object), shards)):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({str(n): tensors[str(n)] for n in chunk}, str(folder / file))
            weight_map.update({str(n): file for n in chunk})
        index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.tiny OUT``: write a tiny random dream-family checkpoint (for demos and tests)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.tiny", description=main.__doc__)
    parser.add_argument("out", type=Path, help="folder to write")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init-std", type=float, default=0.02, help="weight scale (0.02, like a real initialisation, quantises cleanly)"
    )
    args = parser.parse_args(argv)
    write_random_checkpoint(
        args.out, num_layers=args.layers, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        vocab_size=args.vocab, seed=args.seed, init_std=args.init_std,
    )
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
