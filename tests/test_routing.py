"""Gathered-expert routing: the same numbers as dense routing, on eager torch, ONNX Runtime and torch.compile."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mixtral_export.artifact.contract import StepShapes
from mixtral_export.checkpoint import load_model
from mixtral_export.artifact.config import MixtralConfig
from mixtral_export.model import MoE
from mixtral_export.runtimes.eager import EagerBackend
from mixtral_export.runtimes.verify import verify_backends

REPO = Path(__file__).resolve().parents[1]


def eager(folder: Path, routing: str, batch: int = 1) -> EagerBackend:
    shapes = StepShapes.for_config(MixtralConfig.from_json(folder), batch=batch, prefill_chunk=8, cache_slots=32)
    return EagerBackend(load_model(folder, attention_window=shapes.attention_window, routing=routing), shapes)


def prompts(vocab: int, lengths=(21, 45)) -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def tiny_gather_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model exported with --routing gather through the CLI: batch 1, chunk 8, 32-slot ring."""
    out = tmp_path_factory.mktemp("gather") / "tiny-gather"
    run = subprocess.run([sys.executable, "-m", "mixtral_export", "export", str(tiny_checkpoint), "-o", str(out),
                          "--routing", "gather", "--batch", "1", "--prefill-chunk", "8", "--cache-slots", "32"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return out


def test_gathered_equals_dense_for_any_token_count(tiny_checkpoint):
    moe = load_model(tiny_checkpoint, routing="gather").layers[0].moe
    for n in (1, 2, 5, 16):
        x = torch.randn(n, moe.w13.shape[-1], generator=torch.Generator().manual_seed(n))  # (N, H)
        torch.testing.assert_close(moe.gathered(x), moe.dense(x), rtol=0, atol=1e-5)


def test_eager_gather_matches_dense_over_prefill_and_decode(tiny_checkpoint, monkeypatch):
    gathered_tokens = []
    original = MoE.gathered
    monkeypatch.setattr(MoE, "gathered", lambda self, x: gathered_tokens.append(x.shape[0]) or original(self, x))
    backends = {"dense": eager(tiny_checkpoint, "dense"), "gather": eager(tiny_checkpoint, "gather")}
    report = verify_backends(backends, prompts(1000), steps=40, dtype="float32")
    assert report.comparisons[0].max_abs <= 1e-5 and report.passed
    assert gathered_tokens and set(gathered_tokens) == {1}  # decode steps gathered; prefill chunks ran dense


def test_ort_gather_artifact_matches_eager_across_ring_wraps(tiny_gather_onnx):
    import onnx

    from mixtral_export.runtimes.load import open_backend

    ort_backend, manifest = open_backend(tiny_gather_onnx, "ort")
    eager_backend, _ = open_backend(tiny_gather_onnx, "eager")
    assert manifest.routing == "gather" and eager_backend.model.routing == "gather"
    graph = onnx.load(str(tiny_gather_onnx / "model.onnx"), load_external_data=False).graph
    moe_nodes = [n for n in graph.node if n.domain == "com.microsoft" and n.op_type == "MoE"]
    assert len(moe_nodes) == manifest.config.num_hidden_layers
    report = verify_backends({"eager": eager_backend, "ort": ort_backend}, prompts(1000), steps=48,
                             dtype="float32")  # 45 + 48 positions through a 32-slot ring
    assert report.passed and report.comparisons[0].max_abs <= 1e-4


def test_expert_slices_add_up_to_each_expert():
    """The sliced, interleaved layout of the ONNX MoE node: an expert's P slices sum to the expert."""
    from mixtral_export.graphs.onnx_moe import fc1_slices, fc2_slices

    gen = torch.Generator().manual_seed(0)
    e, h, i, parts = 3, 8, 12, 4
    w13, w2 = torch.randn(e, 2 * i, h, generator=gen), torch.randn(e, h, i, generator=gen)  # (E, 2I, H), (E, H, I)
    fc1, fc2 = fc1_slices(w13, parts), fc2_slices(w2, parts)  # (P*E, 2I/P, H), (P*E, H, I/P)
    x = torch.randn(h, generator=gen)
    for expert in range(e):
        want = w2[expert] @ (torch.nn.functional.silu(w13[expert, :i] @ x) * (w13[expert, i:] @ x))
        got = 0
        for p in range(parts):
            rows = fc1[p * e + expert] @ x  # gate_0, up_0, gate_1, up_1, ... (swiglu_fusion=1)
            got = got + fc2[p * e + expert] @ (torch.nn.functional.silu(rows[0::2]) * rows[1::2])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("intermediate, parts", [(14336, 8), (128, 8), (12, 4), (6, 2), (7, 1)])
def test_experts_are_cut_into_the_most_power_of_two_slices_that_divide_them(intermediate, parts):
    from mixtral_export.graphs.onnx_moe import expert_parts

    assert expert_parts(intermediate) == parts


def test_quantized_experts_stay_whole():
    """QMoE deals whole experts to its threads; slicing them only shortens its GEMVs (graphs/onnx_moe.py)."""
    from mixtral_export.graphs.onnx_moe import QUANTIZED_EXPERT_PARTS, expert_parts

    assert QUANTIZED_EXPERT_PARTS == 1 and [expert_parts(14336, b) for b in (32, 64, 128)] == [1, 1, 1]


def test_gather_graph_runs_sliced_experts(tiny_gather_onnx):
    """Every MoE node sees P*E virtual experts and P*k routes, so its threads share every token's experts."""
    import onnx

    from mixtral_export.graphs.onnx_moe import expert_parts
    from mixtral_export.tiny import TINY_CONFIG as c

    parts = expert_parts(c.intermediate_size)
    model = onnx.load(str(tiny_gather_onnx / "model.onnx"), load_external_data=False)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MoE"]
    assert parts > 1 and len(nodes) == c.num_hidden_layers
    for node in nodes:
        assert next(a.i for a in node.attribute if a.name == "k") == parts * c.num_experts_per_tok
        e, i, h = parts * c.num_local_experts, c.intermediate_size // parts, c.hidden_size
        assert dims[node.input[2]] == [e, 2 * i, h] and dims[node.input[4]] == [e, h, i]


def test_gather_export_of_a_gelu_model_is_refused(tmp_path):
    from mixtral_export.graphs.onnx_export import ExportError, export_onnx
    from mixtral_export.tiny import TINY_CONFIG, random_weights, write_checkpoint

    config = TINY_CONFIG.replace(hidden_act="gelu", num_hidden_layers=1)
    folder = write_checkpoint(tmp_path / "gelu", config, random_weights(config))
    with pytest.raises(ExportError, match="silu"):
        export_onnx(folder, tmp_path / "out", routing="gather")
    with pytest.raises(ExportError, match="routing 'sparse'"):
        export_onnx(folder, tmp_path / "out", routing="sparse")
    assert not (tmp_path / "out").exists()


def test_gather_traces_as_one_graph_under_torch_compile(tiny_checkpoint):
    """fullgraph capture (Dynamo + AOTAutograd) of a decode step: no graph break on the gathered MoE."""
    backend = eager(tiny_checkpoint, "gather")
    args = decode_args(backend.shapes)
    compiled = torch.compile(backend.model, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args)[0], backend.model(*args)[0], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_gather_compiles_with_inductor(tiny_checkpoint):
    backend = eager(tiny_checkpoint, "gather")
    dense = eager(tiny_checkpoint, "dense")
    args = decode_args(backend.shapes)
    compiled = torch.compile(backend.model, fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args)[0], dense.model(*args)[0], rtol=0, atol=1e-5)


def decode_args(shapes: StepShapes) -> tuple[torch.Tensor, ...]:
    """One decode step at position 5 over a cache holding positions 0..4."""
    gen = torch.Generator().manual_seed(0)
    cache_positions = torch.full((shapes.batch, shapes.cache_slots), -1)
    cache_positions[:, :5] = torch.arange(5)
    return (torch.full((shapes.batch, 1), 7), torch.full((shapes.batch, 1), 5),
            torch.randn(shapes.cache_shape(), generator=gen), torch.randn(shapes.cache_shape(), generator=gen),
            cache_positions)


def test_padding_tokens_route_to_experts_a_live_token_reads_anyway(tiny_checkpoint, monkeypatch):
    """A step with idle rows and padding columns (position -1, other ids): every token's top-k experts
    are among the live tokens' (an idle row costs no expert reads), and live logits are unchanged."""
    model = load_model(tiny_checkpoint, routing="gather")
    config = model.config
    routed = []
    original = MoE.forward
    monkeypatch.setattr(MoE, "forward", lambda self, x: routed.append(x.reshape(-1, x.shape[-1])) or original(self, x))
    rng = np.random.default_rng(5)
    ids = torch.tensor(rng.integers(3, config.vocab_size, size=(4, 3)))  # (B, T)
    positions = torch.tensor([[0, -1, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]])  # (B, T): one live token
    cache = torch.zeros(config.num_hidden_layers, 4, config.num_key_value_heads, 8, config.head_dim)  # (L, B, Hkv, S, D)
    empty = torch.full((4, 8), -1)  # (B, S)
    with torch.no_grad():
        logits = model(ids, positions, cache, cache, empty)[0]  # (B, T, V)
        live = (positions >= 0).reshape(-1)
        for x, moe in zip(routed, (layer.moe for layer in model.layers)):
            experts = moe.top_k_routing(x)[1]  # (N, k)
            assert set(experts.flatten().tolist()) == set(experts[live].flatten().tolist())
        alone = model(ids[:1, :1], positions[:1, :1], cache[:, :1], cache[:, :1], empty[:1])[0]  # that token alone
    torch.testing.assert_close(logits[0, :1], alone[0], rtol=0, atol=1e-5)
