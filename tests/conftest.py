"""Shared fixtures: tiny random dream-family checkpoints and the engine folders converted from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.tiny import write_random_checkpoint


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
