"""A Hugging Face Mixtral folder -> a MixtralStatic with its weights, streamed shard by shard.

Accepts a single model.safetensors or shards listed by model.safetensors.index.json, the
per-expert layout (block_sparse_moe.experts.E.w1/w2/w3) that real checkpoints and
save_pretrained write, and the fused layout transformers v5 holds in memory
(mlp.experts.gate_up_proj / down_proj). Each tensor is read straight into its place in the model,
so peak memory stays near one copy of the weights.
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from mixtral_export.artifact.config import MixtralConfig
from mixtral_export.model import TORCH_DTYPES, MixtralStatic
from mixtral_export.safetensors_file import CheckpointError, TensorEntry, read_header, read_into

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FILE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor lands: a parameter, or a slice of a stacked expert parameter."""

    param: str
    shape: tuple[int, ...]
    select: Callable[[torch.Tensor], torch.Tensor] = lambda p: p


def checkpoint_tensors(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint with its file, from the index or the single file."""
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise CheckpointError(f"{index}: not a safetensors index (no weight_map)") from None
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE_NAME).exists():
        weight_map, files = None, [SINGLE_NAME]
    else:
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        if not found:
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            hint = f" ({pickles[0]} is a pickle, which is never loaded; convert it to safetensors)" if pickles else ""
            raise CheckpointError(f"{folder}: no model.safetensors or {INDEX_NAME}{hint}")
        weight_map, files = None, found
    tensors: dict[str, TensorEntry] = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"{path}: listed in {INDEX_NAME} but missing")
        for key, entry in read_header(path).items():
            if weight_map is not None and weight_map.get(key) != name:
                raise CheckpointError(f"{path}: tensor {key} is not listed for this file in {INDEX_NAME}")
            tensors[key] = entry
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in tensors:
                raise CheckpointError(f"{folder / name}: tensor {key} listed in {INDEX_NAME} is missing")
    return tensors


def weight_targets(config: MixtralConfig, fused: bool, prefix: str = "model.", lm_head: bool = True) -> dict[str, Target]:
    """Checkpoint tensor name -> where it goes in MixtralStatic; the trunk's names start with `prefix`
    ("" in a bare MixtralModel's checkpoint)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d, nh, nkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    out = {f"{prefix}embed_tokens.weight": Target("embed_tokens.weight", (v, h)),
           f"{prefix}norm.weight": Target("norm.weight", (h,))}
    if lm_head and not config.tie_word_embeddings:
        out["lm_head.weight"] = Target("lm_head.weight", (v, h))
    for n in range(config.num_hidden_layers):
        src, dst = f"{prefix}layers.{n}", f"layers.{n}"
        out[f"{src}.input_layernorm.weight"] = Target(f"{dst}.input_layernorm.weight", (h,))
        out[f"{src}.post_attention_layernorm.weight"] = Target(f"{dst}.post_attention_layernorm.weight", (h,))
        for proj, rows in (("q_proj", nh * d), ("k_proj", nkv * d), ("v_proj", nkv * d)):
            out[f"{src}.self_attn.{proj}.weight"] = Target(f"{dst}.self_attn.{proj}.weight", (rows, h))
        out[f"{src}.self_attn.o_proj.weight"] = Target(f"{dst}.self_attn.o_proj.weight", (h, nh * d))
        w13, w2 = f"{dst}.moe.w13", f"{dst}.moe.w2"
        if fused:
            e = config.num_local_experts
            out[f"{src}.mlp.gate.weight"] = Target(f"{dst}.moe.gate.weight", (e, h))
            out[f"{src}.mlp.experts.gate_up_proj"] = Target(w13, (e, 2 * i, h))
            out[f"{src}.mlp.experts.down_proj"] = Target(w2, (e, h, i))
            continue
        out[f"{src}.block_sparse_moe.gate.weight"] = Target(f"{dst}.moe.gate.weight", (config.num_local_experts, h))
        for e in range(config.num_local_experts):
            pre = f"{src}.block_sparse_moe.experts.{e}"
            out[f"{pre}.w1.weight"] = Target(w13, (i, h), lambda p, e=e: p[e, :i])
            out[f"{pre}.w3.weight"] = Target(w13, (i, h), lambda p, e=e: p[e, i:])
            out[f"{pre}.w2.weight"] = Target(w2, (h, i), lambda p, e=e: p[e])
    return out


def load_model(folder: str | Path, dtype: str | None = None, attention_window: int | None = None,
               progress: Callable[[int, int], None] | None = None, routing: str = "dense") -> MixtralStatic:
    """Build MixtralStatic from a checkpoint folder; `dtype` defaults to the config's."""
    folder = Path(folder)
    config = checkpoint_config(folder, dtype)
    tensors, targets = checked_tensors(folder, config)

    with torch.device("meta"):  # no memory until to_empty, which allocates the one copy
        model = MixtralStatic(config, attention_window, routing).to(TORCH_DTYPES[config.dtype])
    model = model.to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    _read_tensors(tensors, targets, dict(model.named_parameters()), progress)
    return model.eval()


def load_head_model(folder: str | Path, head: str | None = None, dtype: str | None = None, routing: str = "dense",
                    progress: Callable[[int, int], None] | None = None):
    """Build the HeadModel of a checkpoint's non-generative head (`head` overrides config.json's)."""
    from mixtral_export.head_model import HeadModel

    folder = Path(folder)
    config = checkpoint_config(folder, dtype)
    chosen, tensors, targets = checked_head_tensors(folder, config, head)

    with torch.device("meta"):
        model = HeadModel(config, chosen, routing).to(TORCH_DTYPES[config.dtype])
    model = model.to_empty(device="cpu")
    _read_tensors(tensors, targets, dict(model.named_parameters()), progress)
    return model.eval()


def checked_head_tensors(folder: Path, config: MixtralConfig, head: str | None = None):
    """The checkpoint's non-generative head (`head` overrides config.json's), its tensors and where
    each goes in a HeadModel, every name, shape and dtype checked (headers only)."""
    from mixtral_export.head import ALL_HEAD_TENSORS, read_head

    tensors = checkpoint_tensors(folder)
    chosen = read_head(folder, {key: entry.shape for key, entry in tensors.items()}, head)
    if chosen.generates:
        raise CheckpointError(f"{folder}: its head is the causal LM; export it as a step graph (or pass --head)")
    prefix = "" if chosen.kind == "model" and "embed_tokens.weight" in tensors else "model."
    targets = {key: Target(f"body.{t.param}", t.shape, t.select)
               for key, t in weight_targets(config, _fused(folder, tensors), prefix, lm_head=False).items()}
    h, n = config.hidden_size, chosen.num_labels
    owned = {"sequence-classification": {"score.weight": (n, h)},
             "token-classification": {"score.weight": (n, h), **({"score.bias": (n,)} if chosen.bias else {})},
             "question-answering": {"qa_outputs.weight": (2, h), "qa_outputs.bias": (2,)}}.get(chosen.kind, {})
    targets.update({key: Target(key, shape) for key, shape in owned.items()})
    _check_tensors(folder, tensors, targets, ignored=ALL_HEAD_TENSORS - set(owned))  # another head's: unused
    return chosen, tensors, targets


def checkpoint_config(folder: Path, dtype: str | None = None) -> MixtralConfig:
    """The folder's config.json, as `dtype` when one is given."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    config = MixtralConfig.from_json(folder / "config.json")
    return config if dtype is None else config.replace(dtype=dtype)


def checked_tensors(folder: Path, config: MixtralConfig) -> tuple[dict[str, TensorEntry], dict[str, Target]]:
    """The checkpoint's tensors and where each goes, every name, shape and dtype checked (headers only)."""
    tensors = checkpoint_tensors(folder)
    targets = weight_targets(config, _fused(folder, tensors))
    # tied: the embedding is the head; a saved copy is redundant
    _check_tensors(folder, tensors, targets, ignored={"lm_head.weight"} if config.tie_word_embeddings else set())
    return tensors, targets


class ParameterReader:
    """Reads one MixtralStatic parameter at a time straight from the checkpoint's files.

    For building graphs without the model in memory (graphs/placeholder_weights.py): a parameter
    is assembled from its checkpoint tensors (a stacked expert parameter from 2E or 3E of them)
    exactly as `load_model` fills it, cast the same way, and nothing else is held.
    """

    def __init__(self, folder: str | Path, config: MixtralConfig,
                 checked: tuple[dict[str, TensorEntry], dict[str, Target]] | None = None):
        """checked: the checkpoint's tensors and targets when the model is not a MixtralStatic
        (a HeadModel's, from `checked_head_tensors`); by default `checked_tensors`'."""
        tensors, targets = checked or checked_tensors(Path(folder), config)
        self.parts: dict[str, list[tuple[TensorEntry, Target]]] = defaultdict(list)
        for key, target in targets.items():
            self.parts[target.param].append((tensors[key], target))
        if config.tie_word_embeddings and checked is None:
            self.parts["lm_head.weight"] = self.parts["embed_tokens.weight"]  # one tensor under two names
        self.dtype = TORCH_DTYPES[config.dtype]
        self._regions: dict[tuple[str, tuple[int, ...]], list[tuple[int, int, TensorEntry]]] = {}

    def read(self, param: str, shape: tuple[int, ...], rows: tuple[int, int] | None = None,
             elements: tuple[int, int] | None = None, stored: bool = False, out: torch.Tensor | None = None):
        """The parameter `param` (of shape `shape`) in the config's dtype, or only its rows
        [start, stop) along the first axis (one expert of a stacked expert parameter, say), or
        only elements [first, last) of its flat order, as a 1-D tensor (a slice of one expert's rows).

        stored=True: those elements as byte ranges of the checkpoint's files (TensorEntry, in
        order) when the files hold them exactly as the parameter does (same dtype), else None;
        a writer can then copy them file to file without reading them through Python.
        out: with `elements`, a uint8 tensor of exactly their bytes to read them into (a writer's
        reused buffer: no allocation); returned viewed as the config's dtype.
        """
        if param not in self.parts:
            raise CheckpointError(f"no checkpoint tensor fills parameter {param}")
        if stored:
            return self._stored(param, shape, *(elements or (0, math.prod(shape))))
        row = math.prod(shape[1:])
        if elements is not None:
            lo, hi = elements
            out = torch.empty(hi - lo, dtype=self.dtype) if out is None else out.view(self.dtype)  # (hi - lo,)
            if out.numel() != hi - lo:
                raise ValueError(f"{param}: out holds {out.numel()} values, elements [{lo}, {hi}) are {hi - lo}")
        else:
            start, stop = rows if rows is not None else (0, shape[0] if shape else 1)
            lo, hi = start * row, stop * row  # the elements wanted, in the parameter's flat order
            out = torch.empty((stop - start, *shape[1:]) if shape else shape, dtype=self.dtype)
        flat = out.view(-1)
        filled = 0
        with torch.no_grad():
            for start, count, entry in self.regions(param, shape):
                first, last = max(start, lo), min(start + count, hi)
                if first < last:
                    _read_tensor(elements_of(entry, first - start, last - start), flat[first - lo:last - lo], None)
                    filled += last - first
        if filled != out.numel():
            raise CheckpointError(f"the checkpoint fills {filled} of the {out.numel()} values of {param}")
        return out

    def regions(self, param: str, shape: tuple[int, ...]) -> list[tuple[int, int, TensorEntry]]:
        """(first element, element count, checkpoint tensor) of each part of `param`, in file order;
        worked out once per parameter (a writer reads a stacked one in many small spans)."""
        key = (param, tuple(shape))
        if key not in self._regions:
            whole = torch.empty(shape, device="meta")
            regions = []
            for entry, target in sorted(self.parts[param], key=lambda part: (str(part[0].path), part[0].start)):
                region = target.select(whole)  # where this checkpoint tensor lands: a contiguous range
                if not region.is_contiguous():
                    raise CheckpointError(f"{entry.path}: tensor {entry.name} does not fill a contiguous part of {param}")
                regions.append((region.storage_offset(), region.numel(), entry))
            self._regions[key] = regions
        return self._regions[key]

    def _stored(self, param: str, shape: tuple[int, ...], lo: int, hi: int) -> list[TensorEntry] | None:
        runs = []
        whole = torch.empty(shape, device="meta")
        for entry, target in self.parts[param]:
            region = target.select(whole)
            if FILE_DTYPES[entry.dtype] != self.dtype or not region.is_contiguous():
                return None
            first, last = max(region.storage_offset(), lo), min(region.storage_offset() + region.numel(), hi)
            if first < last:
                runs.append((first, elements_of(entry, first - region.storage_offset(), last - region.storage_offset())))
        runs.sort(key=lambda run: run[0])
        covered = lo
        for first, entry in runs:  # each run starts where the last ended, and they end at hi
            if first != covered:
                return None
            covered += entry.shape[0]
        return [entry for _, entry in runs] if covered == hi else None


def elements_of(entry: TensorEntry, first: int, last: int) -> TensorEntry:
    """Elements [first, last) of a tensor in its flat order, as an entry of its own (a byte range)."""
    size = entry.nbytes // max(math.prod(entry.shape), 1)
    return replace(entry, shape=(last - first,), start=entry.start + first * size, nbytes=(last - first) * size)


def _fused(folder: Path, tensors: dict[str, TensorEntry]) -> bool:
    fused = any(".mlp.experts." in key for key in tensors)
    if fused and any(".block_sparse_moe." in key for key in tensors):
        raise CheckpointError(f"{folder}: mixes the per-expert (block_sparse_moe) and fused (mlp.experts) layouts")
    return fused


def _check_tensors(folder: Path, tensors: dict[str, TensorEntry], targets: dict[str, Target],
                   ignored: set[str]) -> None:
    """Every tensor is a target (or ignored) and every target is there with its shape and a float dtype."""
    for key, entry in tensors.items():
        if key in targets or key in ignored or IGNORED.fullmatch(key):
            continue
        raise CheckpointError(f"{entry.path}: unexpected tensor {key} for this config")
    for key, target in targets.items():
        if key not in tensors:
            raise CheckpointError(f"{folder}: missing tensor {key}")
        entry = tensors[key]
        if entry.shape != target.shape:
            raise CheckpointError(f"{entry.path}: tensor {key} has shape {list(entry.shape)}, "
                                  f"expected {list(target.shape)}")
        if entry.dtype not in FILE_DTYPES:
            raise CheckpointError(f"{entry.path}: tensor {key} has dtype {entry.dtype}; "
                                  f"expected F32, F16 or BF16")


def _read_tensors(tensors: dict[str, TensorEntry], targets: dict[str, Target], params: dict,
                  progress: Callable[[int, int], None] | None) -> None:
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key in targets:
        by_file[tensors[key].path].append(key)
    done, total = 0, len(targets)
    with torch.no_grad():
        for path, keys in by_file.items():  # one shard open at a time
            with open(path, "rb") as handle:
                for key in sorted(keys, key=lambda k: tensors[k].start):
                    _read_tensor(tensors[key], targets[key].select(params[targets[key].param]), handle)
                    done += 1
                    if progress is not None:
                        progress(done, total)


def _read_tensor(entry: TensorEntry, dest: torch.Tensor, handle) -> None:
    """Read one tensor into `dest`: straight into it when dtypes match, else via one temp buffer."""
    file_dtype = FILE_DTYPES[entry.dtype]
    dest = dest.detach()
    if file_dtype == dest.dtype and dest.is_contiguous():
        read_into(entry, memoryview(dest.view(torch.uint8).numpy()).cast("B"), handle)
        return
    tmp = torch.empty(entry.shape, dtype=file_dtype)
    read_into(entry, memoryview(tmp.view(torch.uint8).numpy()).cast("B"), handle)
    dest.copy_(tmp)
