"""config.json as Hugging Face writes it -> MixtralConfig, validated once with one-line errors."""
from __future__ import annotations

import json

import pytest

from mixtral_export.artifact.config import ConfigError, MixtralConfig
from tests.reference_models import BASE


def write(tmp_path, **fields):
    raw = {"model_type": "mixtral", **{k: v for k, v in BASE.items() if k != "rope_theta"}, **fields}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


def test_reads_every_field_of_a_save_pretrained_config(tmp_path):
    from transformers import MixtralConfig as HFConfig

    HFConfig(**{**BASE, "head_dim": 24, "pad_token_id": 0, "tie_word_embeddings": True}).save_pretrained(tmp_path)
    config = MixtralConfig.from_json(tmp_path)
    assert (config.head_dim, config.pad_token_id, config.tie_word_embeddings) == (24, 0, True)
    assert config.rope_theta == BASE["rope_theta"]
    assert (config.sliding_window, config.num_local_experts, config.eos_token_id) == (8, 4, (2,))


def test_old_rope_theta_key_is_read(tmp_path):
    assert MixtralConfig.from_json(write(tmp_path, rope_theta=5e5)).rope_theta == 5e5


def test_new_rope_parameters_dict_is_read(tmp_path):
    path = write(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 1234.0})
    assert MixtralConfig.from_json(path).rope_theta == 1234.0


def test_head_dim_null_falls_back_to_hidden_over_heads(tmp_path):
    assert MixtralConfig.from_json(write(tmp_path, head_dim=None)).head_dim == 16


def test_missing_kv_heads_means_multi_head_attention(tmp_path):
    raw = json.loads(write(tmp_path).read_text())
    del raw["num_key_value_heads"]
    assert MixtralConfig.from_dict(raw).num_key_value_heads == raw["num_attention_heads"]


def test_torch_dtype_key_and_eos_list(tmp_path):
    config = MixtralConfig.from_json(write(tmp_path, torch_dtype="bfloat16", eos_token_id=[2, 5]))
    assert config.dtype == "bfloat16" and config.eos_token_id == (2, 5)


def test_round_trip_through_to_dict(tmp_path):
    config = MixtralConfig.from_json(write(tmp_path, head_dim=24, sliding_window=None))
    assert MixtralConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("fields, words", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(hidden_act="tanh"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type 'yarn'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "rope_parameters.rope_type"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(vocab_size=-3), "vocab_size"),
    (dict(model_type="llama"), "model_type"),
    (dict(bos_token_id=999), "bos_token_id"),
    (dict(hidden_size="64"), "hidden_size"),
])
def test_impossible_config_is_one_line_naming_field_and_file(tmp_path, fields, words):
    path = write(tmp_path, **fields)
    with pytest.raises(ConfigError) as err:
        MixtralConfig.from_json(path)
    message = str(err.value)
    assert words in message and str(path) in message and "\n" not in message


def test_missing_required_field_is_named(tmp_path):
    raw = json.loads(write(tmp_path).read_text())
    del raw["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="intermediate_size is missing"):
        MixtralConfig.from_json(tmp_path)


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MixtralConfig.from_json(tmp_path)


def test_a_config_without_rope_theta_is_transformers_default_and_the_model_uses_it(tmp_path):
    """config.json with no rope key at all (older Mixtral configs): rope_theta is transformers'
    MixtralConfig default, 1e6, and the static model's rotary embedding uses it: its fp32 logits
    match transformers loading the same folder within 1e-4 at every position."""
    import transformers

    from tests.reference_models import hf_reference, random_prompts
    from tests.test_parity_reference import assert_logits_match

    hf_reference(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_theta", "rope_parameters", "rope_scaling"):
        raw.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    reference = transformers.MixtralForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    theirs = (reference.config.rope_parameters or {}).get("rope_theta", getattr(reference.config, "rope_theta", None))
    assert MixtralConfig.from_json(tmp_path).rope_theta == theirs == 1e6
    assert MixtralConfig().rope_theta == transformers.MixtralConfig().rope_parameters["rope_theta"]  # built in Python
    # window 8: relative distances up to 7, where a theta of 1e4 or 1e5 turns the keys by radians
    assert_logits_match(tmp_path, reference, random_prompts([21], raw["vocab_size"]))
