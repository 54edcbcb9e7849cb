"""A staged ONNX export: the step split into pipeline stages, one folder (graph + weights + manifest) each.

Stage i runs a contiguous range of layers with its own ring cache (the contract in
artifact/contract.py, `StageShapes`); stage 0 also holds the embedding, the last the final norm and
the LM head. Only the hidden state (B, T, H) crosses from one stage to the next, so a stage folder is
all a machine needs to run its part. Each stage is traced and written exactly as a whole export is
(graphs/onnx_export.py's `write_step`: placeholder weights streamed from the checkpoint, either
routing, quantized weights, every prefill chunk), one stage at a time, so peak memory stays that of
one trace.

The top folder holds a manifest listing the stages (folder, layers, bytes) and the export's id,
which every stage manifest repeats: stages of two exports are never chained (artifact/manifest.py's
`load_stage`). The default split balances the stages' weight bytes.
"""
from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Callable

from mixtral_export.artifact.config import MixtralConfig
from mixtral_export.artifact.contract import StageShapes, StepShapes
from mixtral_export.artifact.manifest import write_manifest
from mixtral_export.graphs.artifact_folder import ExportError, finish

STAGE_FOLDER = "stage-{}"


def weight_bytes(config: MixtralConfig, scheme, block_size: int) -> tuple[int, int, int]:
    """Bytes of one layer's weights, of the embedding and of the final norm + LM head, as stored:
    the build's dtype, or `scheme`'s bits plus a float32 scale per block for the weights it quantizes."""
    item = {"float32": 4, "float16": 2, "bfloat16": 2}[config.dtype]
    quantized = (lambda n: n * scheme.bits // 8 + n // block_size * 4) if scheme else (lambda n: n * item)
    h, i, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    layer = quantized(h * q * 2 + h * kv * 2) + quantized(e * 3 * i * h) + (e * h + 2 * h) * item
    return layer, config.vocab_size * h * item, quantized(config.vocab_size * h) + h * item


def split_layers(config: MixtralConfig, out: Path, stages: int | None, stage_layers: tuple[int, ...] | None,
                 scheme=None, block_size: int = 32) -> list[tuple[int, int]]:
    """[first, stop) of each stage: `stage_layers` (each stage's layer count) as given, or `stages`
    stages whose largest weight bytes are as small as contiguous ranges allow."""
    total = config.num_hidden_layers
    if stage_layers is not None:
        if stages is not None and stages != len(stage_layers):
            raise ExportError(f"{out}: --stages {stages} and --stage-layers with {len(stage_layers)} stages disagree")
        if any(n < 1 for n in stage_layers) or sum(stage_layers) != total:
            raise ExportError(f"{out}: --stage-layers {','.join(map(str, stage_layers))} must be positive layer "
                              f"counts adding up to the model's {total} layers")
        bounds = [0, *(sum(stage_layers[:k + 1]) for k in range(len(stage_layers)))]
        return list(zip(bounds[:-1], bounds[1:]))
    if stages is None or stages < 1:
        raise ExportError(f"{out}: --stages must be at least 1, got {stages}")
    if stages > total:
        raise ExportError(f"{out}: --stages {stages} is more than the model's {total} layers (a stage runs at "
                          f"least one layer)")
    layer, embed, head = weight_bytes(config, scheme, block_size)
    if config.tie_word_embeddings and scheme is None and stages > 1:
        embed = 0  # the last stage's LM head is the table (write_stages)

    def cost(first: int, stop: int) -> int:
        return (stop - first) * layer + (embed if first == 0 else 0) + (head if stop == total else 0)

    # best[k][j]: the smallest largest-stage bytes of the first j layers in k stages, and its last cut
    best = [[(math.inf, 0)] * (total + 1) for _ in range(stages + 1)]
    best[0][0] = (0, 0)
    for k in range(1, stages + 1):
        for j in range(k, total + 1):
            best[k][j] = min((max(best[k - 1][c][0], cost(c, j)), c) for c in range(k - 1, j))
    cuts, j = [], total
    for k in range(stages, 0, -1):
        c = best[k][j][1]
        cuts.append((c, j))
        j = c
    return cuts[::-1]


def lm_head_table(graph: Path, config: MixtralConfig) -> dict:
    """Where the last stage's graph keeps its LM head, (H, V) as its MatMul reads it: {"file", "offset",
    "shape"} in its external data, so the ids' lookup reads the same bytes."""
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    found = [init for init in proto.graph.initializer
             if list(init.dims) == [config.hidden_size, config.vocab_size] and init.external_data]
    if len(found) != 1:
        raise ExportError(f"{graph}: {len(found)} (H, V) weights in the last stage, expected its LM head alone")
    where = {entry.key: entry.value for entry in found[0].external_data}
    return {"file": where["location"], "offset": int(where.get("offset", 0)),
            "shape": [config.hidden_size, config.vocab_size]}


def write_stages(tmp: Path, checkpoint: Path, config: MixtralConfig, shapes: StepShapes,
                 split: list[tuple[int, int]], routing: str, opset: int, graph_name: str,
                 write: Callable[[Path, StageShapes], tuple[dict | None, dict | None]],
                 say: Callable[[str], None], quantized: bool = False) -> None:
    """Write every stage folder into `tmp` (each with its manifest), then the top manifest.
    write(folder, stage) writes one stage's graph and weights (graphs/onnx_export.py's `write_step`)
    and returns the files it hashed while writing and its quantization record. A tied table stays in
    the last stage alone when the weights are float (quantized, the LM head is not the embedding's
    bytes: a whole export holds both too)."""
    export_id = secrets.token_hex(16)  # 128 random bits: two exports never share one
    entries, quantization = [], None
    # a tied table (the embedding is the LM head) stays in the last stage only, which does the lookup too
    shared = config.tie_word_embeddings and not quantized and len(split) > 1
    for index, (first, stop) in enumerate(split):
        stage = StageShapes(step=shapes, index=index, count=len(split), first_layer=first, stop_layer=stop,
                            hidden_size=config.hidden_size, embeds_ids=not (shared and index == 0))
        folder = tmp / STAGE_FOLDER.format(index)
        folder.mkdir()
        hashed, record = write(folder, stage)
        table = lm_head_table(folder / graph_name, config) if shared and stage.ends else None
        write_manifest(folder, kind="onnx", config=config, shapes=shapes, graphs={"step": graph_name}, opset=opset,
                       stage=stage, export_id=export_id, source=checkpoint.resolve(), routing=routing,
                       hashed=hashed, quantization=record, table=table)
        if record is not None:  # one record over every stage's tensors, for eager's dequantized weights
            quantization = record if quantization is None else {**quantization,
                                                                "tensors": {**quantization["tensors"],
                                                                            **record["tensors"]}}
        entries.append({"folder": folder.name, "layers": [first, stop],
                        "bytes": sum(f.stat().st_size for f in folder.iterdir())})
    say("writing the manifest")
    finish(tmp, checkpoint, config, kind="onnx", shapes=shapes, graphs={}, opset=opset, routing=routing,
           quantization=quantization, stages=entries, export_id=export_id)
