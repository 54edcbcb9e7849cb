"""Loading safetensors checkpoints: layouts, dtypes, and one clear error per bad input."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral_export.checkpoint import load_model
from mixtral_export.safetensors_file import CheckpointError
from tests.reference_models import hf_reference


@pytest.fixture
def checkpoint(tmp_path):
    model = hf_reference(tmp_path / "ck")
    return tmp_path / "ck", model


def tensors_of(folder):
    return load_file(str(folder / "model.safetensors"))


def rewrite(folder, tensors):
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_per_expert_weights_land_in_stacked_experts(checkpoint):
    folder, model = checkpoint
    ours = load_model(folder)
    hf = model.model.layers[1].mlp.experts
    assert torch.equal(ours.layers[1].moe.w13, hf.gate_up_proj)
    assert torch.equal(ours.layers[1].moe.w2, hf.down_proj)


def test_fused_v5_layout_loads_the_same_model(checkpoint, tmp_path):
    folder, model = checkpoint
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"))
    assert any(".mlp.experts.gate_up_proj" in k for k in load_file(str(fused / "model.safetensors")))
    a, b = load_model(folder).state_dict(), load_model(fused).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_conversion_on_load(checkpoint):
    folder, _ = checkpoint
    assert load_model(folder, dtype="bfloat16").layers[0].moe.w13.dtype == torch.bfloat16


def test_tied_checkpoint_shares_the_embedding(tmp_path):
    hf_reference(tmp_path, tie_word_embeddings=True)
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_missing_tensor_is_named(checkpoint):
    folder, _ = checkpoint
    tensors = tensors_of(folder)
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    rewrite(folder, tensors)
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.block_sparse_moe\.experts\.2\.w3"):
        load_model(folder)


def test_wrong_shape_names_tensor_and_file(checkpoint):
    folder, _ = checkpoint
    tensors = tensors_of(folder)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    rewrite(folder, tensors)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape \[3, 64\]"):
        load_model(folder)


def test_unexpected_tensor_is_named(checkpoint):
    folder, _ = checkpoint
    tensors = tensors_of(folder)
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    rewrite(folder, tensors)
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.extra\.weight"):
        load_model(folder)


def test_truncated_file_is_named(checkpoint):
    folder, _ = checkpoint
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_model(folder)


def test_non_safetensors_file_is_named(checkpoint):
    folder, _ = checkpoint
    (folder / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip, maybe a pickle" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a safetensors file"):
        load_model(folder)


def test_pickle_checkpoint_is_refused_not_loaded(tmp_path):
    hf_reference(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle, which is never loaded"):
        load_model(tmp_path)


def test_shard_missing_from_index_is_named(tmp_path):
    hf_reference(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match=f"{victim}: listed in model.safetensors.index.json but missing"):
        load_model(tmp_path)


def test_unsupported_tensor_dtype_is_named(checkpoint):
    folder, _ = checkpoint
    tensors = tensors_of(folder)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    rewrite(folder, tensors)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has dtype I32"):
        load_model(folder)
