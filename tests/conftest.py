"""Shared fixtures: tiny random dream-family checkpoints and the engine folders converted from them."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from engine.tiny import write_random_checkpoint


if "DLM_LSP_CACHE" not in os.environ:
    # The tests, and the servers and tools they start, use their own model cache, not the user's. Set at
    # import, before test modules are collected: some fix their servers' environment then.
    _CACHE = tempfile.mkdtemp(prefix="dlm-lsp-test-cache-")
    atexit.register(shutil.rmtree, _CACHE, True)
    os.environ["DLM_LSP_CACHE"] = _CACHE


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GQA checkpoint with tied embeddings and peaked (large-init) distributions."""
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp32 engine folder of :func:`tiny_checkpoint`."""
    pytest.importorskip("torch")
    from engine.export import convert

    return _converted(convert, tiny_checkpoint, tmp_path_factory.mktemp("eng") / "fp32", "fp32")


@pytest.fixture(scope="session")
def small_init_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint initialised like a real model (std 0.02), for int8 quantisation."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "small_init", init_std=0.02, hidden_size=128, intermediate_size=256,
        num_layers=3, seed=2,
    )


def _converted(convert, src: Path, dst: Path, precision: str) -> Path:  # type: ignore[no-untyped-def]
    convert(src, dst, precision=precision, progress=lambda _msg: None)
    return dst


@pytest.fixture(scope="session")
def hf_reference():  # type: ignore[no-untyped-def]
    """Build the independent transformers implementation of a Checkpoint's family (see :func:`_hf_reference`)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return _hf_reference


def _hf_reference(checkpoint):  # type: ignore[no-untyped-def]
    """transformers' model of the checkpoint's architecture with its weights, eager attention.

    dream -> Qwen2ForCausalLM, llada -> LlamaForCausalLM (LLaMA blocks without
    biases; the OLMo-style tensor names are mapped by the family), qwen3 ->
    Qwen3ForCausalLM. Parameter names are :mod:`engine.modeling`'s, which are the
    transformers names of all three.
    """
    import transformers

    a = checkpoint.arch
    common = dict(
        vocab_size=a.vocab_size,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_kv_heads,
        rms_norm_eps=a.rms_norm_eps,
        rope_theta=a.rope_theta,
        max_position_embeddings=a.max_positions,
        tie_word_embeddings=a.tie_word_embeddings,
    )
    family = checkpoint.family.name
    if family == "dream":
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif family == "llada":
        config = transformers.LlamaConfig(**common, head_dim=a.head_dim, attention_bias=False, mlp_bias=False)
        cls = transformers.LlamaForCausalLM
    elif family == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=a.head_dim, attention_bias=False)
        cls = transformers.Qwen3ForCausalLM
    else:  # pragma: no cover - a new family needs its reference here
        raise AssertionError(f"no transformers reference for family {family!r}")
    config._attn_implementation = "eager"
    model = cls(config).eval()
    result = model.load_state_dict({k: v.float() for k, v in checkpoint.load_state("pt").items()}, strict=False)
    # Only the tied head may be absent from the checkpoint.
    assert set(result.missing_keys) <= {"lm_head.weight"}
    assert not result.unexpected_keys
    if a.tie_word_embeddings:
        model.tie_weights()
    return model
