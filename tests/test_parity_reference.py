"""The eager static model reproduces transformers' MixtralForCausalLM on its own checkpoints.

Tolerance: fp32 max |logit difference| <= 1e-4 at every position; greedy continuations equal.
Prefill runs in chunks through the rolling cache, so prompts longer than the sliding window wrap
the ring several times.
"""
from __future__ import annotations

import numpy as np
import pytest

from mixtral_export.artifact.contract import StepShapes
from mixtral_export.artifact.config import MixtralConfig
from mixtral_export.runtimes.eager import EagerBackend
from tests.reference_models import hf_reference, random_prompts, reference_greedy, reference_logits

TOL = 1e-4


def eager_logits(folder, prompts, prefill_chunk=4, cache_slots=None, batch=None) -> list[np.ndarray]:
    """Run each prompt's tokens through the static model chunk by chunk (left-padded batch)."""
    backend = EagerBackend.from_checkpoint(folder, dict(batch=batch or len(prompts), prefill_chunk=prefill_chunk,
                                                        cache_slots=cache_slots))
    p = backend.shapes.prefill_chunk
    width = -(-max(len(x) for x in prompts) // p) * p
    ids = np.zeros((backend.shapes.batch, width), dtype=np.int64)  # (B, N) left padded
    pos = np.full((backend.shapes.batch, width), -1, dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        pos[row, width - len(prompt):] = np.arange(len(prompt))
    chunks = [backend.step(ids[:, s:s + p], pos[:, s:s + p]) for s in range(0, width, p)]
    logits = np.concatenate(chunks, axis=1)  # (B, N, V)
    return [logits[row, width - len(x):] for row, x in enumerate(prompts)]


def assert_logits_match(folder, model, prompts, **kwargs):
    ours = eager_logits(folder, prompts, **kwargs)
    ref = reference_logits(model, prompts)
    for row, (a, b) in enumerate(zip(ours, ref)):
        diff = np.abs(a - b).max()
        assert diff <= TOL, f"row {row}: max |logit diff| {diff:.2e} > {TOL}"
        assert (a.argmax(-1) == b.argmax(-1)).all()


CASES = {
    "gqa_window_wraps": dict(),
    "mqa": dict(num_key_value_heads=1),
    "mha": dict(num_key_value_heads=4),
    "head_dim_override": dict(head_dim=24),
    "tied_embeddings": dict(tie_word_embeddings=True),
    "top1": dict(num_experts_per_tok=1),
    "eight_experts": dict(num_local_experts=8),
    "eight_experts_top1": dict(num_local_experts=8, num_experts_per_tok=1),
    "gelu_tanh": dict(hidden_act="gelu_pytorch_tanh"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_logits_match_reference_across_ring_wraps(tmp_path, case):
    model = hf_reference(tmp_path, **CASES[case])
    prompts = random_prompts([37], model.config.vocab_size)  # window 8: the ring wraps 4 times
    assert_logits_match(tmp_path, model, prompts)


def test_left_padded_batch_matches_reference(tmp_path):
    model = hf_reference(tmp_path)
    prompts = random_prompts([29, 5, 17], model.config.vocab_size)
    assert_logits_match(tmp_path, model, prompts)


def test_no_sliding_window_attends_to_everything(tmp_path):
    model = hf_reference(tmp_path, sliding_window=None)
    prompts = random_prompts([45, 12], model.config.vocab_size)
    assert_logits_match(tmp_path, model, prompts, cache_slots=48)


def test_sharded_checkpoint_matches_reference(tmp_path):
    model = hf_reference(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_logits_match(tmp_path, model, random_prompts([20], model.config.vocab_size))


def test_ring_larger_than_window_matches_reference(tmp_path):
    model = hf_reference(tmp_path)
    assert_logits_match(tmp_path, model, random_prompts([33], model.config.vocab_size),
                        cache_slots=12, prefill_chunk=8)


@pytest.mark.parametrize("case", ["gqa_window_wraps", "mqa", "eight_experts"])
def test_greedy_continuation_equals_reference_generate(tmp_path, case):
    from mixtral_export.runtimes.generate import generate
    from mixtral_export.runtimes.requests import GenerationConfig
    from mixtral_export.runtimes.sampling import SamplingParams

    model = hf_reference(tmp_path, **CASES[case])
    prompts = random_prompts([11, 3, 7], model.config.vocab_size, seed=5)
    expected = reference_greedy(model, prompts, max_new_tokens=30)
    backend = EagerBackend.from_checkpoint(tmp_path, dict(batch=2, prefill_chunk=4))
    result = generate(backend, prompts, GenerationConfig(max_new_tokens=30, sampling=SamplingParams(),
                                                         eos_token_ids=()))
    assert [c.token_ids for c in result.completions] == expected


def test_bf16_checkpoint_loads_and_tracks_fp32_reference(tmp_path):
    import torch

    model = hf_reference(tmp_path, dtype=torch.bfloat16)
    config = MixtralConfig.from_json(tmp_path)
    assert config.dtype == "bfloat16"
    ours = eager_logits(tmp_path, random_prompts([16], model.config.vocab_size))[0]
    ref = reference_logits(model.float(), random_prompts([16], model.config.vocab_size))[0]
    # bf16 compute vs the same weights in fp32: agreement on the argmax at most positions
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_shapes_default_to_the_sliding_window(tmp_path):
    hf_reference(tmp_path)
    shapes = StepShapes.for_config(MixtralConfig.from_json(tmp_path))
    assert shapes.cache_slots == 8 and shapes.attention_window == 8
