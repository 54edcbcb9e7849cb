"""A KV cache stored narrower than the weights (`export --kv-dtype float16 | int8`, artifact/contract.py).

Each artifact is held against the float32-cache artifact of the same checkpoint on the same
continuation (teacher-forced, 80 steps, rows at different positions, spans growing 64 -> 128):
- float16: max |logit difference| <= 1e-2 (half precision keeps 11 bits: ~5e-4 relative on keys and
  values, on logits of magnitude ~10; measured 2.5e-3) and every argmax equal;
- int8 (codes, a float32 scale per slot and kv head; the query rounded to int8 per row too, as
  llama.cpp's q8_0 cache does, so the products are integer ones): 99% of positions' max |logit
  difference| <= 0.15 (1/254 of each vector's largest element per code, on keys, values and the
  query; measured: median 0.022, 99th percentile 0.084) and >= 95% of argmaxes equal (measured
  99.4%). The largest difference is left unbounded: where two experts' router logits nearly tie, a
  rounding flips the choice and that position's logits move by whole units (measured once in 160:
  2.5).
The int8 graph computes what model.py's torch code computes (its MatMulInteger nodes against the
exact integer products in float64): within 1e-5.
The control: the int8 cache really is read through its scales (zeroing them changes the logits).
"""
from __future__ import annotations

import numpy as np
import pytest

from mixtral_export.graphs.onnx_export import export_onnx
from mixtral_export.runtimes.ort import OrtBackend
from mixtral_export.runtimes.verify import teacher_forced
from tests.reference_models import hf_reference, random_prompts

STEPS = 80
BOUNDS = {"float16": (1e-2, 1.0), "int8": (0.15, 0.95)}  # max |dlogit|, least top-1 agreement


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv")
    model = hf_reference(folder / "ck", sliding_window=None, max_position_embeddings=1024)
    built = {kv: export_onnx(folder / "ck", folder / kv, batch=2, prefill_chunk=(4, 16), cache_slots=128, kv_dtype=kv)
             for kv in ("float32", "float16", "int8")}
    prompts = random_prompts([40, 11], model.config.vocab_size, seed=3)
    continuation = [random_prompts([STEPS], model.config.vocab_size, seed=9 + n)[0] for n in range(2)]
    return built, prompts, continuation


@pytest.mark.parametrize("kv", ["float16", "int8"])
def test_a_narrow_cache_stays_within_its_tolerance_of_float32(artifacts, kv):
    built, prompts, continuation = artifacts
    full = OrtBackend(built["float32"])
    narrow = OrtBackend(built[kv])
    assert narrow.shapes.cache_dtype == kv and full.shapes.kv_dtype is None  # float32 is the build's: the default
    assert narrow.ring.flat_k.nbytes * {"float16": 2, "int8": 4}[kv] == full.ring.flat_k.nbytes
    ref = teacher_forced(full, prompts, continuation)
    got = teacher_forced(narrow, prompts, continuation)
    diffs = np.concatenate([np.abs(a - b).max(-1).ravel() for a, b in zip(got, ref)])  # per position
    diff = float(diffs.max() if kv == "float16" else np.percentile(diffs, 99))
    top1 = float(np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(got, ref)])))
    max_abs, least_top1 = BOUNDS[kv]
    assert 0 < diff <= max_abs and top1 >= least_top1, (diff, top1)
    assert narrow.span == 128  # 51 + 80 positions in the longer row


def test_the_int8_graph_computes_what_the_torch_model_computes(artifacts):
    """One decode step over a prefilled int8 cache: the ONNX graph (MatMulInteger nodes) against
    MixtralStatic's own forward on the same cache (exact integer products in float64)."""
    import torch

    from mixtral_export.checkpoint import load_model

    built, prompts, _ = artifacts
    backend = OrtBackend(built["int8"])
    vocab = backend.shapes.vocab_size
    rng = np.random.default_rng(2)
    backend.step(rng.integers(3, vocab, (2, 16)), np.tile(np.arange(16), (2, 1)))
    inputs = {name: torch.from_numpy(value.copy()) for name, value in backend.ring.inputs().items()}
    ids, positions = rng.integers(3, vocab, (2, 1)), np.full((2, 1), 16)
    got = backend.step(ids, positions)
    model = load_model(built["int8"].parent / "ck", dtype="float32", routing="gather")
    model.kv_dtype = "int8"
    layers = range(backend.shapes.num_layers)
    with torch.no_grad():
        want = model(torch.from_numpy(ids), torch.from_numpy(positions),
                     *[torch.stack([inputs[f"{side}.{n}"] for n in layers]) for side in ("cache_k", "cache_v")],
                     inputs["cache_positions"],
                     *[torch.stack([inputs[f"{side}.{n}"] for n in layers]) for side in ("cache_k_scale",
                                                                                         "cache_v_scale")])[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
    assert np.abs(got).max() > 1  # logits, not zeros


def test_control_the_int8_scales_are_read(artifacts):
    built, prompts, continuation = artifacts
    backend = OrtBackend(built["int8"])
    ref = teacher_forced(OrtBackend(built["int8"]), prompts, continuation)

    write = backend.ring.write

    def scales_lost(new_k, new_v, positions, new_scales=None):
        write(new_k, new_v, positions, tuple(np.zeros_like(s) for s in new_scales))

    backend.ring.write = scales_lost
    got = teacher_forced(backend, prompts, continuation)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, ref)) > 1.0


def test_manifest_records_the_cache_type_and_other_runtimes_refuse_it(artifacts):
    from mixtral_export.artifact.manifest import load_manifest
    from mixtral_export.runtimes.load import RuntimeLoadError, open_step_backend

    built, _, _ = artifacts
    manifest = load_manifest(built["int8"])
    assert manifest.shapes.kv_dtype == "int8" and manifest.dtype == "float32"
    inputs = {e["name"]: e["dtype"] for e in manifest.io["inputs"]}
    assert inputs["cache_k.0"] == "int8" and inputs["cache_k_scale.0"] == "float32"
    assert [e["name"] for e in manifest.io["outputs"]] == ["logits", "new_k", "new_v", "new_k_scale", "new_v_scale"]
    with pytest.raises(RuntimeLoadError, match="int8 \\(--kv-dtype\\); run it on ort"):
        open_step_backend(built["int8"], "eager")


@pytest.mark.parametrize("flags,words", [(("--kv-dtype", "int4"), ("--kv-dtype", "int4", "int8")),
                                         (("--kv-dtype", "int8", "--format", "aoti"), ("--kv-dtype", "onnx"))])
def test_export_refuses_a_cache_type_it_cannot_build_in_one_line(tiny_checkpoint, tmp_path, flags, words):
    from tests.test_cli import assert_one_line_error, cli

    assert_one_line_error(cli("export", tiny_checkpoint, "-o", tmp_path / "out", *flags, ok=False), *words)
    assert not (tmp_path / "out").exists()


def test_inspect_shows_the_cache_type_and_bytes_per_row(artifacts):
    from tests.test_cli import cli

    built, _, _ = artifacts
    lines = {kv: next(line for line in cli("inspect", built[kv]).stdout.splitlines() if line.strip().startswith("cache"))
             for kv in ("float32", "int8")}
    # 2 layers x 2 sides x 2 kv heads x 128 slots x 16 dims: 4 bytes each, or 1 byte plus a 4-byte scale per 16
    assert "float32, 0.06 MiB per batch row" in lines["float32"]
    assert "int8 + a float32 scale per slot and kv head, 0.02 MiB per batch row" in lines["int8"]


def test_an_int8_cache_past_65536_slots_is_refused():
    """Its value products sum 255 * 127 per slot in int32: 65536 slots is the most that cannot overflow."""
    from mixtral_export.artifact.contract import ContractError, StepShapes

    def shapes(slots):
        return StepShapes(batch=1, prefill_chunk=8, cache_slots=slots, num_layers=1, num_kv_heads=1, head_dim=4,
                          vocab_size=10, dtype="float32", attention_window=None, span_axis=True, kv_dtype="int8")

    assert shapes(65536).cache_slots == 65536 and 255 * 127 * 65536 < 2**31
    with pytest.raises(ContractError, match="at most 65536 slots"):
        shapes(65537)
