"""ONNX Runtime against transformers on checkpoints written by save_pretrained.

fp32: greedy generation equals the reference's `generate` token for token while the ring wraps
several times, and the teacher-forced per-step logits agree within 1e-4.
"""
from __future__ import annotations

import pytest

from mixtral_export.graphs.onnx_export import export_onnx
from mixtral_export.runtimes.ort import OrtBackend
from mixtral_export.runtimes.verify import HFReference, teacher_forced, verify_backends
from tests.reference_models import hf_reference, random_prompts, reference_greedy

STEPS = 40  # window 8, prompts up to 19 tokens: decode wraps the 8-slot ring 5+ times


@pytest.mark.parametrize("case", [dict(), dict(num_key_value_heads=1, num_experts_per_tok=1),
                                  dict(tie_word_embeddings=True, head_dim=24, num_local_experts=8)])
def test_ort_greedy_generation_equals_reference_generate(tmp_path, case):
    from mixtral_export.runtimes.generate import generate
    from mixtral_export.runtimes.requests import GenerationConfig
    from mixtral_export.runtimes.sampling import SamplingParams

    model = hf_reference(tmp_path / "ck", **case)
    artifact = export_onnx(tmp_path / "ck", tmp_path / "onnx", batch=2, prefill_chunk=4)
    prompts = random_prompts([19, 6, 11], model.config.vocab_size, seed=3)
    expected = reference_greedy(model, prompts, STEPS)
    config = GenerationConfig(max_new_tokens=STEPS, sampling=SamplingParams(), eos_token_ids=())
    result = generate(OrtBackend(artifact), prompts, config)
    assert [c.token_ids for c in result.completions] == expected


def test_ort_step_logits_match_reference_within_1e4(tmp_path):
    model = hf_reference(tmp_path / "ck")
    artifact = export_onnx(tmp_path / "ck", tmp_path / "onnx", batch=2, prefill_chunk=4)
    prompts = random_prompts([13, 5], model.config.vocab_size)
    continuation = reference_greedy(model, prompts, STEPS)
    ref = HFReference(tmp_path / "ck").teacher_forced(prompts, continuation)
    ours = teacher_forced(OrtBackend(artifact), prompts, continuation)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape == (STEPS, model.config.vocab_size)
        assert abs(a - b).max() <= 1e-4


def test_verify_fails_a_runtime_whose_logits_drift(tmp_path):
    """The verifier is not a rubber stamp: a backend off by 1e-3 on one step fails fp32."""
    hf_reference(tmp_path / "ck")
    artifact = export_onnx(tmp_path / "ck", tmp_path / "onnx", batch=2, prefill_chunk=4)

    class Drifting(OrtBackend):
        calls = 0

        def step(self, input_ids, positions):
            logits = super().step(input_ids, positions)
            Drifting.calls += 1
            if Drifting.calls == 10:  # inside the teacher-forced pass
                logits = logits + 1e-3
            return logits

    prompts = random_prompts([9, 4], 128)
    good = verify_backends({"ort": OrtBackend(artifact), "ort2": OrtBackend(artifact)}, prompts, 24, "float32")
    bad = verify_backends({"ort": OrtBackend(artifact), "drift": Drifting(artifact)}, prompts, 24, "float32")
    assert good.passed and not bad.passed
    assert 9e-4 < bad.comparisons[0].max_abs < 1.1e-3


def test_verify_holds_one_runtime_at_a_time(tiny_onnx):
    """Runtimes given as openers are opened in turn, each dropped before the next (and the reference
    after them all): verifying a big artifact holds its weights once, not once per runtime."""
    import weakref

    opened = []

    def opener():
        assert all(ref() is None for ref in opened), "the previous runtime is still alive"
        backend = OrtBackend(tiny_onnx)
        opened.append(weakref.ref(backend))
        return backend

    class Reference:
        def __init__(self):
            assert all(ref() is None for ref in opened), "a runtime is alive when the reference opens"
            self.backend = OrtBackend(tiny_onnx)

        def teacher_forced(self, prompts, forced):
            return teacher_forced(self.backend, prompts, forced)

        def greedy(self, prompts, steps):
            from mixtral_export.runtimes.verify import greedy

            return greedy(self.backend, prompts, steps)

    prompts = random_prompts([9, 4], 1000)
    report = verify_backends({"a": opener, "b": opener}, prompts, 8, "float32", reference=Reference)
    assert report.passed and len(opened) == 2 and len(report.comparisons) == 3
