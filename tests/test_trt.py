"""TensorRT: the engine computes what eager computes, through ring wraps, in fp32 (1e-3) and measurably
close in fp16/bf16; plus the refusals that need neither TensorRT nor a GPU.

The engine tests need NVIDIA's TensorRT 10 and a CUDA GPU and are skipped without them (they have
never run in this project's CI, which has neither; see docs/runtimes.md, "TensorRT").
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from mixtral_export.artifact.engine_record import ENGINE_NAME, INSTALL_HINT, TrtUnavailable
from mixtral_export.graphs.trt_engine import build_engine
from mixtral_export.runtimes.step_parity import lockstep
from tests.test_ort_backend import eager_for

FP32_TOL = 1e-3
GREEDY_STEPS = 24


@pytest.fixture(scope="module")
def trt():
    """TensorRT and a GPU, or a skip that says which is missing."""
    module = pytest.importorskip("tensorrt", reason="NVIDIA's TensorRT 10 Python package is not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU; none is visible to torch")
    return module


@pytest.fixture(scope="module")
def engines(trt, tiny_onnx, tmp_path_factory) -> dict:
    """Private copies of the fp32 tiny artifact with an engine per precision: {precision: folder}."""
    built = {}
    for precision in ("fp32", "fp16", "bf16"):
        folder = shutil.copytree(tiny_onnx, tmp_path_factory.mktemp("trt") / f"tiny-{precision}")
        build_engine(folder, precision=precision, workspace_gib=1.0, progress=print)
        built[precision] = folder
    return built


@pytest.mark.gpu
def test_fp32_matches_eager_through_ring_wraps(engines, tiny_checkpoint):
    from mixtral_export.runtimes.trt import TrtBackend

    eager, ours = eager_for(tiny_checkpoint, engines["fp32"]), TrtBackend(engines["fp32"])
    addresses = [t.data_ptr() for t in (ours.ring.cache_k, ours.ring.cache_v, ours.ring.cache_positions)]
    (parity,) = lockstep(eager, [ours])
    worst, steps = parity.max_abs, len(parity.per_step_max_abs)
    assert worst <= FP32_TOL, f"step {parity.worst_step}: max |logit diff| {worst:.2e} > {FP32_TOL}"
    assert parity.last_position >= 2 * ours.shapes.cache_slots + 8  # the ring wrapped twice+
    assert [t.data_ptr() for t in (ours.ring.cache_k, ours.ring.cache_v, ours.ring.cache_positions)] == addresses
    np.testing.assert_array_equal(ours.ring.cache_positions.cpu().numpy(), eager.ring.cache_positions.numpy())
    np.testing.assert_allclose(ours.ring.cache_k.cpu().numpy(), eager.ring.cache_k.numpy(), rtol=0, atol=FP32_TOL)
    np.testing.assert_allclose(ours.ring.cache_v.cpu().numpy(), eager.ring.cache_v.numpy(), rtol=0, atol=FP32_TOL)
    print(f"\nTensorRT fp32 vs eager: max |logit diff| {worst:.2e} over {steps} steps")


def greedy(backend, prompt: np.ndarray, steps: int) -> np.ndarray:
    """(B, steps) tokens a backend generates greedily after the prompt (B, P) on its own."""
    backend.reset()
    positions = np.tile(np.arange(prompt.shape[1]), (prompt.shape[0], 1))
    logits, out = backend.step(prompt, positions), []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1)[:, None]  # (B, 1)
        out.append(token)
        positions = positions[:, -1:] + 1
        logits = backend.step(token, positions)
    return np.concatenate(out, axis=1)


@pytest.mark.gpu
@pytest.mark.parametrize("precision, floor", [("fp16", 0.9), ("bf16", 0.85)])
def test_half_precision_top1_and_greedy_agreement(engines, tiny_checkpoint, precision, floor):
    from mixtral_export.runtimes.trt import TrtBackend

    eager, ours = eager_for(tiny_checkpoint, engines[precision]), TrtBackend(engines[precision])
    (parity,) = lockstep(eager, [ours])
    agree, total = parity.agree, parity.tokens
    shapes = ours.shapes
    prompt = np.random.default_rng(1).integers(0, shapes.vocab_size, (shapes.batch, shapes.prefill_chunk))  # (B, P)
    ref_tokens, our_tokens = greedy(eager, prompt, GREEDY_STEPS), greedy(ours, prompt, GREEDY_STEPS)
    same = (ref_tokens == our_tokens).cumprod(axis=1).sum(axis=1)  # tokens equal before the first divergence
    print(f"\nTensorRT {precision} vs eager fp32: top-1 agrees on {agree}/{total} = {agree / total:.1%} of tokens; "
          f"greedy continuations identical for {same.tolist()} of {GREEDY_STEPS} tokens per row")
    assert agree / total >= floor


@pytest.mark.gpu
def test_an_engine_recorded_for_another_gpu_is_refused(engines, tmp_path):
    from mixtral_export.artifact.manifest import load_manifest, set_engine
    from mixtral_export.artifact.engine_record import EngineMismatch
    from mixtral_export.runtimes.trt import TrtBackend

    folder = shutil.copytree(engines["fp32"], tmp_path / "moved")
    record = {**load_manifest(folder).engines[ENGINE_NAME], "gpu": "NVIDIA Some Other GPU", "compute_capability": "1.0"}
    set_engine(folder, ENGINE_NAME, record)
    with pytest.raises(EngineMismatch, match="NVIDIA Some Other GPU with compute capability 1.0"):
        TrtBackend(folder)


def test_an_artifact_without_an_engine_says_how_to_build_one(tiny_onnx):
    from mixtral_export.runtimes.trt import TrtBackendError, TrtBackend

    with pytest.raises(TrtBackendError, match=f"{ENGINE_NAME}: no TensorRT engine .*mixtral-export build-engine"):
        TrtBackend(tiny_onnx, verify_files=False)


def test_building_without_tensorrt_says_how_to_install_it(tiny_onnx):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(TrtUnavailable) as info:
        build_engine(tiny_onnx)
    assert str(info.value) == INSTALL_HINT


def test_onnx_runtime_tensorrt_provider_is_named_when_missing(tiny_onnx):
    import onnxruntime as ort

    from mixtral_export.runtimes.ort import OrtBackend, OrtBackendError

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT execution provider")
    with pytest.raises(OrtBackendError, match="TensorrtExecutionProvider is not available .*CPUExecutionProvider"):
        OrtBackend(tiny_onnx, provider="trt", verify_files=False)


@pytest.mark.gpu
def test_an_engine_runs_each_span_on_its_profile_and_matches_eager(trt, tiny_checkpoint, tmp_path):
    """A 128-slot span-axis artifact (buckets 64, 128): one exact profile per (T, span); the steps switch
    profile as the span grows, and the logits stay eager's over the whole ring."""
    from mixtral_export.graphs.onnx_export import export_onnx
    from mixtral_export.runtimes.eager import EagerBackend
    from mixtral_export.runtimes.trt import TrtBackend
    from tests.reference_models import random_prompts
    from tests.test_spans import drive

    artifact = export_onnx(tiny_checkpoint, tmp_path / "onnx", batch=2, prefill_chunk=8, cache_slots=128)
    build_engine(artifact, precision="fp32", workspace_gib=1.0)
    ours = TrtBackend(artifact)
    assert {t: sorted(p) for t, p in ours.manifest.engines[ENGINE_NAME]["profiles"].items()} == \
        {"8": ["128", "64"], "1": ["128", "64"]}
    eager = eager_for(tiny_checkpoint, artifact)
    prompts = random_prompts([50, 9], ours.shapes.vocab_size, seed=4)
    got, spans = drive(ours, prompts, 40)  # row 0 reaches position 89
    want, _ = drive(EagerBackend(eager.model, eager.shapes, spans=False), prompts, 40)
    assert spans[0] == 64 and spans[-1] == 128 and ours.ring.relayouts == 1
    for step, (a, b) in enumerate(zip(got, want)):
        assert np.abs(a - b).max() <= FP32_TOL, f"step {step} (span {spans[step]})"
