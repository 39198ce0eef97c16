"""Read a Hugging Face-format checkpoint folder.

A checkpoint is a folder with ``config.json``, weights in ``*.safetensors``
(one file, or shards listed by ``model.safetensors.index.json``) and
``tokenizer.json`` (+ optional ``tokenizer_config.json`` /
``special_tokens_map.json``). :class:`Checkpoint` checks all of it up front and
turns every problem into a :class:`~engine.errors.CheckpointError` that says
what is missing and what to do.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

from engine.errors import CheckpointError, UnsupportedConfigError
from engine.families import ArchConfig, Family, TokenIds, detect_family
from engine.tokenizer import Tokenizer, resolve_token_ids

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint folder: family, architecture, token ids and weight files."""

    path: Path
    config: dict[str, Any]
    family: Family
    arch: ArchConfig
    token_ids: TokenIds
    weight_files: tuple[Path, ...]
    tokenizer: Tokenizer

    @classmethod
    def open(cls, path: str | Path, family: str | None = None) -> "Checkpoint":
        """Open and validate ``path``; ``family`` overrides detection from config.json."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is not a folder; point to a downloaded checkpoint folder")
        config_path = folder / "config.json"
        if not config_path.is_file():
            hint = " (it looks like an engine folder: load it with the engine, not dlm-convert)" if (
                folder / "manifest.json"
            ).is_file() else ""
            raise CheckpointError(f"{folder} has no config.json: not a Hugging Face checkpoint folder{hint}")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{config_path} is not valid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path} must hold a JSON object")
        fam = detect_family(config, family)
        arch = fam.parse_config(config)
        tokenizer = Tokenizer(folder / "tokenizer.json")
        token_ids = resolve_token_ids(folder, config, tokenizer, fam)
        for name, value in token_ids.to_dict().items():
            if value is not None and not 0 <= value < arch.vocab_size:
                raise UnsupportedConfigError(
                    f"{name} token id {value} is outside the model's vocabulary (vocab_size={arch.vocab_size})"
                )
        return cls(
            path=folder,
            config=config,
            family=fam,
            arch=arch,
            token_ids=token_ids,
            weight_files=_weight_files(folder),
            tokenizer=tokenizer,
        )

    def iter_tensors(self, framework: str = "pt") -> Iterator[tuple[str, Any]]:
        """Yield ``(name, tensor)`` for every tensor in the weight files (``framework``: "pt" or "np")."""
        for file in self.weight_files:
            with _safetensors(file, framework) as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)

    @cached_property
    def weight_index(self) -> dict[str, tuple[Path, str]]:
        """Where each tensor our model needs is: :mod:`engine.modeling` name -> (file, the checkpoint's name).

        Read from the safetensors headers alone (no tensor is loaded), so a real-size
        checkpoint is checked in a moment. Raises ``CheckpointError`` naming every
        missing tensor and every shape that disagrees with ``config.json``.
        """
        wanted = self.family.weight_names(self.arch)
        by_source = {src: ours for ours, src in wanted.items()}
        index: dict[str, tuple[Path, str]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for file in self.weight_files:
            with _safetensors(file, "np") as handle:  # headers only: no torch needed
                for name in handle.keys():
                    if name in by_source:
                        index[by_source[name]] = (file, name)
                        shapes[by_source[name]] = tuple(handle.get_slice(name).get_shape())
        missing = sorted(src for ours, src in wanted.items() if ours not in index)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CheckpointError(
                f"{self.path}: {len(missing)} weight tensor(s) missing from the safetensors files: {shown}. "
                "The download is incomplete or the folder belongs to another family (see --family)."
            )
        problems = [
            f"{wanted[ours]}: {shapes[ours]}, config.json implies {expected}"
            for ours, expected in expected_shapes(self.arch).items()
            if shapes[ours] != expected
        ]
        if problems:
            raise CheckpointError(f"{self.path}: weight shapes disagree with config.json: " + "; ".join(problems[:5]))
        return index

    def read_tensor(self, name: str) -> Any:
        """One tensor our model needs, by :mod:`engine.modeling` name, as a float32 torch tensor.

        Reads that tensor alone (bfloat16 checkpoints are widened here): conversion of a
        model larger than memory goes one tensor at a time.
        """
        file, source = self.weight_index[name]
        with _safetensors(file, "pt") as handle:
            return handle.get_tensor(source).float()

    def load_state(self, framework: str = "pt") -> dict[str, Any]:
        """The tensors our model needs, keyed by :mod:`engine.modeling` parameter names.

        Raises ``CheckpointError`` naming every missing tensor and every shape mismatch
        (:attr:`weight_index`) before any tensor is loaded.
        """
        by_file: dict[Path, dict[str, str]] = {}
        for ours, (file, source) in self.weight_index.items():
            by_file.setdefault(file, {})[source] = ours
        state: dict[str, Any] = {}
        for file, names in by_file.items():
            with _safetensors(file, framework) as handle:
                for source, ours in names.items():
                    state[ours] = handle.get_tensor(source)
        return state


def expected_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of :mod:`engine.modeling`, by name."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv, ffn = arch.num_heads * d, arch.num_kv_heads * d, arch.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
    }
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if arch.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        if arch.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        shapes[p + "mlp.gate_proj.weight"] = (ffn, h)
        shapes[p + "mlp.up_proj.weight"] = (ffn, h)
        shapes[p + "mlp.down_proj.weight"] = (h, ffn)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    return shapes


@contextmanager
def _safetensors(file: Path, framework: str) -> Iterator[Any]:
    """``file`` opened with safetensors (lazily: tensors are read when asked for); any failure a CheckpointError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework=framework) as handle:
            yield handle
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc}); re-download it") from exc


def _indexed_shards(folder: Path) -> list[str] | None:
    """The shard names ``model.safetensors.index.json`` lists, or None when the folder has no index."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return None
    try:
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from exc


def missing_files(folder: Path) -> list[str]:
    """What ``folder`` lacks of the files a conversion reads: config, tokenizer, every weight shard."""
    missing = [name for name in ("config.json", "tokenizer.json") if not (folder / name).is_file()]
    try:
        shards = _indexed_shards(folder)
    except CheckpointError:
        return [*missing, INDEX_FILE + " (unreadable)"]
    if shards is not None:
        return missing + [name for name in shards if not (folder / name).is_file()]
    if not any(f.is_file() for f in folder.glob("*.safetensors")):
        missing.append("model.safetensors")
    return missing


def _weight_files(folder: Path) -> tuple[Path, ...]:
    shards = _indexed_shards(folder)
    if shards is not None:
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder}: shard(s) listed in {INDEX_FILE} are missing: {', '.join(missing)}; finish the download"
            )
        return tuple(folder / name for name in shards)
    files = tuple(sorted(folder.glob("*.safetensors")))
    if not files:
        extra = " (PyTorch .bin weights are not supported: convert them to safetensors)" if any(
            folder.glob("*.bin")
        ) else ""
        raise CheckpointError(f"{folder} has no *.safetensors weight files{extra}")
    return files
