"""Every model family against an independent implementation, from its real on-disk format.

For each family a random-weight checkpoint is written in the family's own format
(config keys, tensor names, special tokens) and checked three ways:

* logits of our bidirectional transformer within 1e-4 of transformers' model of
  the same architecture (Qwen2 for dream, Llama for llada, Qwen3 for qwen3) run
  with a full attention mask;
* greedy one-token-per-step decoding, token for token, against a textbook loop
  over that transformers model, through our ONNX export (ONNX Runtime) and the
  PyTorch backend;
* the published ``config.json`` files kept in ``tests/fixtures/published``: the
  loader picks the right family and special ids, and the parameter count it
  computes is the published one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from engine import Engine, SamplingParams  # noqa: E402
from engine.checkpoint import Checkpoint  # noqa: E402
from engine.families import detect_family  # noqa: E402
from engine.modeling import load_transformer  # noqa: E402
from engine.tiny import write_random_checkpoint  # noqa: E402

from references import LOGIT_ATOL, hf_bidirectional_logits, textbook_decode  # noqa: E402

PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"

PUBLISHED = Path(__file__).resolve().parents[1] / "fixtures" / "published"

SHAPES = {
    "llada-mha-untied": dict(family="llada", num_heads=4, num_kv_heads=4, tie_word_embeddings=False),
    "llada-gqa-padded": dict(family="llada", num_heads=4, num_kv_heads=2, tie_word_embeddings=False, embedding_rows=600),
    "qwen3-gqa-headdim": dict(family="qwen3", num_heads=4, num_kv_heads=2, head_dim=24, tie_word_embeddings=False),
    "qwen3-tied-sharded": dict(family="qwen3", num_heads=2, num_kv_heads=1, tie_word_embeddings=True, shards=2),
    "dream-padded": dict(family="dream", num_heads=4, num_kv_heads=2, embedding_rows=640),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("family") / request.param
    return write_random_checkpoint(folder, seed=11, **SHAPES[request.param])


def test_written_in_the_family_format(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    ckpt = Checkpoint.open(checkpoint)
    assert detect_family(config).name == ckpt.family.name == checkpoint.name.split("-")[0]
    names = {name for name, _ in ckpt.iter_tensors("np")}
    if ckpt.family.name == "llada":
        assert "model.transformer.blocks.0.attn_out.weight" in names and "config" not in names
        assert not any(n.startswith("model.layers.") for n in names)
        assert ckpt.arch.shifted is False
    else:
        assert "model.layers.0.self_attn.o_proj.weight" in names
        assert ckpt.arch.shifted is True
    assert ("model.layers.0.self_attn.q_norm.weight" in names) == (ckpt.family.name == "qwen3")


def test_logits_match_transformers(checkpoint, hf_reference):
    ckpt = Checkpoint.open(checkpoint)
    ours = load_transformer(ckpt)
    ref = hf_reference(ckpt)
    ids = torch.randint(0, ckpt.tokenizer.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    expected = hf_bidirectional_logits(ref, ids)
    with torch.no_grad():
        got = ours(ids)
    assert got.shape == expected.shape == (2, 37, ckpt.arch.vocab_size)
    assert expected.abs().max() > 1.0  # distributions are not trivially flat
    assert torch.allclose(got, expected, atol=LOGIT_ATOL), (got - expected).abs().max()


@pytest.fixture(scope="module")
def engine_folder(checkpoint, tmp_path_factory):  # type: ignore[no-untyped-def]
    from engine.export import convert

    out = tmp_path_factory.mktemp("engine") / checkpoint.name
    convert(checkpoint, out, precision="fp32", progress=lambda _m: None)
    return out


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_greedy_decoding_is_the_textbook_loop(checkpoint, engine_folder, backend, hf_reference):
    model = engine_folder if backend == "cpu" else checkpoint
    engine = Engine.load(model, backend=backend)
    params = SamplingParams(lengths=(10,), threshold=1.0, exact=True, defer_end=False)
    completion = engine.complete(PREFIX, SUFFIX, params)
    ckpt = Checkpoint.open(checkpoint)
    bos = [ckpt.token_ids.bos] if ckpt.token_ids.bos is not None else []
    prefix_ids = [*bos, *ckpt.tokenizer.encode(PREFIX)]
    suffix_ids = ckpt.tokenizer.encode(SUFFIX)
    expected = textbook_decode(hf_reference, checkpoint, prefix_ids, suffix_ids, 10)
    assert completion.middle_ids == expected
    assert completion.stats["tokens_per_step"] == 1.0
    assert not set(completion.middle_ids) & set(ckpt.tokenizer.unassigned_ids(ckpt.arch.vocab_size))


def _published(name: str) -> dict:
    return json.loads((PUBLISHED / name / "config.json").read_text())


def _special_tokenizer(folder: Path, tokenizer_config: dict, size: int) -> None:
    """A real tokenizer.json holding the published special tokens at their published ids."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(8)}
    vocab.update({entry["content"]: int(i) for i, entry in tokenizer_config.get("added_tokens_decoder", {}).items()})
    vocab.setdefault(f"t{size - 1}", size - 1)
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize(
    "name, family, parameters, ids",
    [
        # LLaDA-8B: 8,015,581,184 = the safetensors index's total_size (16,031,162,368 bytes of bf16) / 2.
        ("llada-8b", "llada", 8_015_581_184, dict(mask=126336, eos=126081, pad=126081, bos=126080)),
        # CoDA-v0 (Qwen3-1.7B based): 1.7B as published; the head is untied in its modelling code.
        ("coda-1.7b", "qwen3", 1.7e9, dict(mask=151669, eos=151645, pad=151643, bos=151645)),
    ],
)
def test_published_configs(tmp_path, name, family, parameters, ids):
    """The loader reads each published config: family, architecture, special ids, size."""
    from engine.tokenizer import Tokenizer, resolve_token_ids

    config = _published(name)
    fam = detect_family(config)
    assert fam.name == family
    arch = fam.parse_config(config)
    tokenizer_config = json.loads((PUBLISHED / name / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    _special_tokenizer(tmp_path, tokenizer_config, arch.vocab_size)
    token_ids = resolve_token_ids(tmp_path, config, Tokenizer(tmp_path / "tokenizer.json"), fam)
    assert token_ids.to_dict() == ids
    if name == "coda-1.7b":  # the published 1.7B counts the embedding once (Qwen3-1.7B's tied count)
        tied = arch.__class__(**{**arch.to_dict(), "tie_word_embeddings": True})
        assert tied.parameters == 1_720_574_976 and abs(tied.parameters - parameters) / parameters < 0.015
        assert arch.qk_norm and arch.head_dim == 128 and arch.shifted
    else:
        assert arch.parameters == parameters
        assert arch.intermediate_size == 12288 and not arch.shifted  # mlp_hidden_size, not mlp_ratio x d_model


@pytest.mark.parametrize("name", ["llada-8b", "coda-1.7b"])
def test_catalog_entries_agree_with_the_published_configs(name):
    """The catalog's sizes (what list and the RAM/disk estimates use) are the published architecture's."""
    from engine.catalog import find

    config = _published(name)
    arch = detect_family(config).parse_config(config)
    entry = find(name)
    assert entry.family == detect_family(config).name
    assert (entry.parameters, entry.vocab_size, entry.hidden_size, entry.tied) == (
        arch.parameters, arch.vocab_size, arch.hidden_size, arch.tie_word_embeddings
    )
