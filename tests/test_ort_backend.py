"""The ONNX Runtime backend computes what the eager backend computes, step for step, cache included.

Tolerance: fp32 max |logit difference| <= 1e-4 at every step; the ring caches agree to 1e-5.
The run wraps the 32-slot ring more than twice, with rows at different positions and padding.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mixtral_export.artifact.manifest import ManifestError, load_manifest, write_manifest
from mixtral_export.graphs.onnx_export import export_onnx
from mixtral_export.runtimes.eager import EagerBackend
from mixtral_export.runtimes.ort import OrtBackend, OrtBackendError, prepacked_sizes
from mixtral_export.runtimes.step_parity import lockstep

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


def eager_for(checkpoint, artifact) -> EagerBackend:
    s = load_manifest(artifact, verify_files=False).shapes
    return EagerBackend.from_checkpoint(checkpoint, dict(batch=s.batch, prefill_chunk=s.prefill_chunks,
                                                         cache_slots=s.cache_slots))


def test_fp32_matches_eager_through_ring_wraps(tiny_onnx, tiny_checkpoint):
    eager, ours = eager_for(tiny_checkpoint, tiny_onnx), OrtBackend(tiny_onnx)
    (parity,) = lockstep(eager, [ours])
    worst, steps = parity.max_abs, len(parity.per_step_max_abs)
    assert worst <= TOL, f"step {parity.worst_step}: max |logit diff| {worst:.2e} > {TOL}"
    assert parity.top1_agreement == 1.0
    assert steps == 2 + 64 and parity.last_position >= 2 * ours.shapes.cache_slots + 8  # the ring wrapped twice+
    np.testing.assert_array_equal(ours.cache_positions, eager.ring.cache_positions.numpy())
    np.testing.assert_allclose(ours.cache_k, eager.ring.cache_k.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.cache_v, eager.ring.cache_v.numpy(), rtol=0, atol=1e-5)
    print(f"\nORT fp32 vs eager: max |logit diff| {worst:.2e} over {steps} steps")


def test_lockstep_prefills_at_every_chunk_length_of_a_multi_chunk_graph(tiny_checkpoint, tmp_path, monkeypatch):
    artifact = export_onnx(tiny_checkpoint, tmp_path / "p4+8", dtype="float32", batch=2, prefill_chunk=(4, 8),
                           cache_slots=32)
    eager, ours = eager_for(tiny_checkpoint, artifact), OrtBackend(artifact)
    lengths = []
    step = ours.step
    monkeypatch.setattr(ours, "step", lambda ids, positions: (lengths.append(ids.shape[1]), step(ids, positions))[1])
    (parity,) = lockstep(eager, [ours], decode_steps=8)
    assert lengths == [8, *[1] * 8, 4, *[1] * 8]  # the longest chunk, then the other one mid-sequence
    assert parity.max_abs <= TOL and parity.top1_agreement == 1.0


def test_reset_empties_the_cache(tiny_onnx):
    backend = OrtBackend(tiny_onnx)
    ids, pos = np.full((2, 8), 5), np.tile(np.arange(8), (2, 1))
    first = backend.step(ids, pos)
    backend.step(ids[:, :1], pos[:, :1] + 8)
    backend.reset()
    assert (backend.cache_positions == -1).all() and not backend.cache_k.any()
    np.testing.assert_array_equal(backend.step(ids, pos), first)


def test_both_chunk_bindings_use_the_cache_in_place(tiny_onnx):
    backend = OrtBackend(tiny_onnx, verify_files=False)
    assert sorted(backend.bindings) == [1, 8]
    addresses = (backend.cache_k.ctypes.data, backend.cache_v.ctypes.data, backend.cache_positions.ctypes.data)
    for chunk in backend.bindings.values():  # a chunk binds the cache at its first step
        backend.step(np.zeros((2, chunk.first.shape[1]), np.int64), np.full((2, chunk.first.shape[1]), -1))
        bound = chunk.binding.get_outputs()  # outputs only; inputs are checked through their buffers below
        assert [v.data_ptr() for v in bound] == [chunk.output.ctypes.data, chunk.new_k.ctypes.data,
                                                 chunk.new_v.ctypes.data]
        assert tuple(chunk.values[name].data_ptr() for name in ("cache_k.0", "cache_v.0", "cache_positions")) == addresses
        assert chunk.values["cache_k.1"].data_ptr() == addresses[0] + backend.cache_k[0].nbytes  # layer 1's view
    backend.step(np.zeros((2, 8), np.int64), np.tile(np.arange(8), (2, 1)))
    backend.step(np.zeros((2, 1), np.int64), np.full((2, 1), 8))
    assert (backend.cache_k.ctypes.data, backend.cache_v.ctypes.data,
            backend.cache_positions.ctypes.data) == addresses
    assert (backend.cache_positions[:, :9] == np.arange(9)).all()


def test_rejects_a_chunk_length_the_graph_does_not_serve(tiny_onnx):
    backend = OrtBackend(tiny_onnx, verify_files=False)
    with pytest.raises(ValueError, match="T=8 or 1"):
        backend.step(np.zeros((2, 3), np.int64), np.zeros((2, 3), np.int64))


@pytest.fixture(scope="module")
def tiny_onnx_fp16(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny-fp16", dtype="float16",
                       batch=2, prefill_chunk=8, cache_slots=32)


def test_fp16_top1_agrees_with_eager_fp32(tiny_onnx_fp16, tiny_checkpoint):
    eager, ours = eager_for(tiny_checkpoint, tiny_onnx_fp16), OrtBackend(tiny_onnx_fp16)
    assert ours.cache_k.dtype == np.float16
    (parity,) = lockstep(eager, [ours])
    print(f"\nORT fp16 vs eager fp32: top-1 agrees on {parity.agree}/{parity.tokens} = "
          f"{parity.top1_agreement:.1%} of tokens")
    assert parity.top1_agreement >= 0.9


def test_bf16_export_runs_only_where_onnx_runtime_has_kernels(tiny_checkpoint, tmp_path):
    artifact = export_onnx(tiny_checkpoint, tmp_path / "tiny-bf16", dtype="bfloat16", batch=1, prefill_chunk=4,
                           cache_slots=32)
    manifest = load_manifest(artifact)
    assert manifest.dtype == "bfloat16"
    assert {e["name"]: e["dtype"] for e in manifest.io["outputs"]} == {
        "logits": "float32", "new_k": "bfloat16", "new_v": "bfloat16"}
    with pytest.raises(OrtBackendError, match="bfloat16") as info:
        OrtBackend(artifact, provider="cpu")
    assert "\n" not in str(info.value)


def test_refuses_a_tampered_artifact(tiny_onnx, tmp_path):
    artifact = shutil.copytree(tiny_onnx, tmp_path / "art")
    data = artifact / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="model.onnx.data"):
        OrtBackend(artifact)


def test_refuses_a_manifest_that_misdescribes_the_graph(tiny_onnx, tmp_path):
    artifact = shutil.copytree(tiny_onnx, tmp_path / "art")
    manifest = load_manifest(artifact)
    wrong = manifest.shapes.__class__(**{**manifest.shapes.to_dict(), "batch": 3})
    write_manifest(artifact, kind="onnx", config=manifest.config, shapes=wrong, graphs=manifest.graphs,
                   opset=manifest.opset, tokenizer=manifest.tokenizer)
    with pytest.raises(ManifestError, match=r"input_ids .*\[2, .T.\], the manifest says int64 \[3, 8\]"):
        OrtBackend(artifact)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_without_cuda_lists_the_providers(tiny_onnx):
    with pytest.raises(OrtBackendError, match="available: .*CPUExecutionProvider"):
        OrtBackend(tiny_onnx, provider="cuda", verify_files=False)


def test_serves_without_torch(tiny_onnx):
    script = (
        "import json, sys, numpy as np\n"
        "from mixtral_export.runtimes.ort import OrtBackend\n"
        f"backend = OrtBackend({str(tiny_onnx)!r})\n"
        "logits = backend.step(np.zeros((2, 8), np.int64), np.tile(np.arange(8), (2, 1)))\n"
        "backend.step(np.zeros((2, 1), np.int64), np.full((2, 1), 8))\n"
        "assert logits.shape == (2, 8, 1000), logits.shape\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mixtral_export'))\n"
        "print(json.dumps(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m.split(".")[0] == "torch"]
    assert "mixtral_export.model" not in loaded


def test_prepacked_sizes_name_the_float_matmul_weights_only(tiny_onnx):
    """The sizes the backend attributes new memory by (runtimes/resident_weights.py): the lm_head's
    and attention's float weights as the config shapes them; a quantized one is not among them."""
    from dataclasses import replace

    manifest = load_manifest(tiny_onnx, verify_files=False)
    c = manifest.config
    lm_head, q_proj = c.hidden_size * c.vocab_size * 4, c.hidden_size * c.num_attention_heads * c.head_dim * 4
    assert {lm_head, q_proj} <= prepacked_sizes(manifest)
    quantized = replace(manifest, quantization={"tensors": {"lm_head.weight": {}}})
    assert lm_head not in prepacked_sizes(quantized) and q_proj in prepacked_sizes(quantized)
