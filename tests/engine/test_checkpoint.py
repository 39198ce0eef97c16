"""Reading checkpoint folders: family detection, token ids, and every kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.checkpoint import Checkpoint
from engine.errors import CheckpointError, TokenizerError, UnknownFamilyError, UnsupportedConfigError
from engine.tiny import write_random_checkpoint


@pytest.fixture
def ckpt(tmp_path, tiny_checkpoint):
    """A private copy of the tiny checkpoint that a test may damage."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "c")


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_reads_family_arch_and_token_ids(tiny_checkpoint):
    c = Checkpoint.open(tiny_checkpoint)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert c.family.name == "dream"
    assert c.arch.shifted and c.arch.qkv_bias and c.arch.num_kv_heads == 2
    assert c.token_ids.mask == config["mask_token_id"] == c.tokenizer.token_to_id("<|mask|>")
    assert c.token_ids.eos == config["eos_token_id"]
    assert c.token_ids.bos == config["bos_token_id"]


def test_token_ids_fall_back_to_tokenizer_config(ckpt):
    edit_config(ckpt, mask_token_id=None, pad_token_id=None, eos_token_id=None, bos_token_id=None)
    c = Checkpoint.open(ckpt)
    tok = c.tokenizer
    assert c.token_ids.mask == tok.token_to_id("<|mask|>")
    assert c.token_ids.eos == tok.token_to_id("<|endoftext|>")
    assert c.token_ids.pad == c.token_ids.eos  # pad falls back to EOS


def test_qwen2_config_with_mask_id_is_dream_family(ckpt):
    edit_config(ckpt, model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    assert Checkpoint.open(ckpt).family.name == "dream"


def test_unknown_family_names_the_override(ckpt):
    edit_config(ckpt, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(UnknownFamilyError, match="--family dream"):
        Checkpoint.open(ckpt)
    assert Checkpoint.open(ckpt, family="dream").family.name == "dream"
    with pytest.raises(UnknownFamilyError, match="supported families: dream"):
        Checkpoint.open(ckpt, family="gpt2")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling"),
        (dict(use_sliding_window=True), "sliding"),
        (dict(num_key_value_heads=3), "multiple"),
        (dict(hidden_size=None), "hidden_size"),
        (dict(mask_token_id=100000), "outside the model's vocabulary"),
    ],
)
def test_unsupported_config_values(ckpt, change, message):
    edit_config(ckpt, **change)
    with pytest.raises(UnsupportedConfigError, match=message):
        Checkpoint.open(ckpt)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        Checkpoint.open(tmp_path / "nope")


def test_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint.open(tmp_path)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Checkpoint.open(ckpt)


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Checkpoint.open(ckpt)


def test_corrupt_tokenizer(ckpt):
    (ckpt / "tokenizer.json").write_text('{"model": 12}')
    with pytest.raises(TokenizerError, match="not a readable tokenizer.json"):
        Checkpoint.open(ckpt)


def test_no_mask_token_anywhere(ckpt):
    edit_config(ckpt, mask_token_id=None)
    (ckpt / "tokenizer_config.json").unlink()
    text = (ckpt / "tokenizer.json").read_text()
    (ckpt / "tokenizer.json").write_text(text.replace("<|mask|>", "<|something_else|>"))
    with pytest.raises(TokenizerError, match="no mask token"):
        Checkpoint.open(ckpt)


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        Checkpoint.open(ckpt)


def test_corrupt_weights(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    c = Checkpoint.open(ckpt)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        c.load_state("np")


def test_missing_tensor_and_wrong_shape(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = write_random_checkpoint(tmp_path / "c", seed=3)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        Checkpoint.open(folder).load_state("np")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.gate_proj.weight"][:, :10].copy()
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="shapes disagree"):
        Checkpoint.open(folder).load_state("np")


def test_sharded_checkpoint_and_missing_shard(tmp_path):
    folder = write_random_checkpoint(tmp_path / "c", shards=3, seed=4)
    c = Checkpoint.open(folder)
    assert len(c.weight_files) == 3
    assert len(c.load_state("np")) == len(c.family.weight_names(c.arch))
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard\\(s\\) listed .* missing: model-00002-of-00003"):
        Checkpoint.open(folder)
