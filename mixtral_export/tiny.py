"""The embedded tiny model: a real Hugging Face-layout Mixtral checkpoint, deterministic from a seed.

Random weights, scaled so routing and argmax are decisive (HF's 0.02 init makes routers near
uniform), written in the per-expert layout save_pretrained writes, with a sentencepiece
tokenizer trained from the corpus the repo ships. Any of transformers' five Mixtral classes
(mixtral_export/head.py): the causal LM, or a head checkpoint as that class's save_pretrained
writes it (its architectures entry, the trunk bare under MixtralModel, the head's own tensors,
id2label for a classifier).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from mixtral_export.artifact.config import ConfigError, MixtralConfig
from mixtral_export.artifact.contract import CLASSIFIER_KINDS
from mixtral_export.destinations import WRITER, json_mark, refuse, replace_folder
from mixtral_export.head import ARCHITECTURES, CAUSAL_LM, HEADS
from mixtral_export.model import TORCH_DTYPES
from mixtral_export.tokenizer_training import load_tiny_corpus, train_tokenizer

TINY_CONFIG = MixtralConfig(
    vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
    rope_theta=1e6, sliding_window=32, num_local_experts=4, num_experts_per_tok=2,
    bos_token_id=1, eos_token_id=(2,), tie_word_embeddings=False, dtype="float32",
)
TINY_LABELS = ("class-0", "class-1", "class-2")  # a tiny classifier's id2label
HEAD_STD = 3.0  # / sqrt(hidden): a head's Linear, as lm_head's, gives peaked outputs


def random_weights(config: MixtralConfig, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Per-expert-layout tensors (as save_pretrained names them) with decisive scales, each cast to
    `dtype` as it is drawn (bench/bf16_checkpoint.py: never the whole model in float32)."""
    gen = torch.Generator().manual_seed(seed)
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d, nh, nkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    def norm_weight() -> torch.Tensor:
        return 1.0 + normal(h, std=0.1)

    out = {"model.embed_tokens.weight": normal(v, h, std=1.0), "model.norm.weight": norm_weight()}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = normal(v, h, std=3.0 / math.sqrt(h))
    for n in range(config.num_hidden_layers):
        pre = f"model.layers.{n}"
        out[f"{pre}.input_layernorm.weight"] = norm_weight()
        out[f"{pre}.post_attention_layernorm.weight"] = norm_weight()
        out[f"{pre}.self_attn.q_proj.weight"] = normal(nh * d, h, std=1.5 / math.sqrt(h))
        out[f"{pre}.self_attn.k_proj.weight"] = normal(nkv * d, h, std=1.5 / math.sqrt(h))
        out[f"{pre}.self_attn.v_proj.weight"] = normal(nkv * d, h, std=1.0 / math.sqrt(h))
        out[f"{pre}.self_attn.o_proj.weight"] = normal(h, nh * d, std=0.5 / math.sqrt(nh * d))
        out[f"{pre}.block_sparse_moe.gate.weight"] = normal(config.num_local_experts, h, std=2.0 / math.sqrt(h))
        for e in range(config.num_local_experts):
            out[f"{pre}.block_sparse_moe.experts.{e}.w1.weight"] = normal(i, h, std=1.0 / math.sqrt(h))
            out[f"{pre}.block_sparse_moe.experts.{e}.w3.weight"] = normal(i, h, std=1.0 / math.sqrt(h))
            out[f"{pre}.block_sparse_moe.experts.{e}.w2.weight"] = normal(h, i, std=0.5 / math.sqrt(i))
    return out


CHECKPOINT_FILES = re.compile(r"config\.json|generation_config\.json|tokenizer\.model|model\.safetensors"
                              r"|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors")


def check_replaceable(folder: Path) -> None:
    """Refuse a destination that is not missing, empty, or a checkpoint this module wrote."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise refuse(folder, "exists and is not a folder")
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        if not CHECKPOINT_FILES.fullmatch(entry.name) or not entry.is_file():
            raise refuse(folder, f"holds {entry.name}, which {WRITER} did not write")
    if json_mark(folder / "config.json") != WRITER:
        raise refuse(folder, f"holds a checkpoint that {WRITER} did not write")


def write_checkpoint(folder: str | Path, config: MixtralConfig, tensors: dict[str, torch.Tensor],
                     max_shard_bytes: int | None = None, tokenizer_model: Path | None = None,
                     config_json: dict | None = None) -> Path:
    """Write config.json, generation_config.json, safetensors (sharded past max_shard_bytes) and
    the tokenizer into `folder` atomically: everything goes to a temp folder that is renamed.
    `config_json` adds to (or overrides) config.json's keys: a head's architectures, say.

    An existing `folder` is replaced only when it is one this function wrote (check_replaceable)."""
    folder = Path(folder)
    check_replaceable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tensors = {k: t.to(TORCH_DTYPES[config.dtype]).contiguous() for k, t in tensors.items()}
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = t
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for n, shard in enumerate(shards, start=1):
                name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({key: name for key in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        raw = {**config.to_dict(), **(config_json or {}), "written_by": WRITER}  # the mark check_replaceable looks for
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_id)[0]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer_model is not None:
            shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def check_head(head: str) -> None:
    if head not in HEADS:
        raise ConfigError(f"--head {head!r} is not one of {', '.join(HEADS)}")


def head_weights(config: MixtralConfig, head: str, seed: int = 0,
                 labels: tuple[str, ...] = TINY_LABELS) -> dict[str, torch.Tensor]:
    """The tensors transformers' Mixtral class of `head` saves: `random_weights`' trunk (the same for
    every head of a seed), bare under MixtralModel, and the head's own Linear drawn after it."""
    trunk = random_weights(config, seed)
    if head == CAUSAL_LM:
        return trunk
    trunk.pop("lm_head.weight", None)
    if head == "model":
        return {key.removeprefix("model."): value for key, value in trunk.items()}
    gen = torch.Generator().manual_seed(seed + 1)
    h = config.hidden_size
    rows = 2 if head == "question-answering" else len(labels)  # start and end, or one per label
    name = "qa_outputs" if head == "question-answering" else "score"
    trunk[f"{name}.weight"] = torch.randn(rows, h, generator=gen) * (HEAD_STD / math.sqrt(h))  # (N, H)
    if head != "sequence-classification":  # transformers' token classifier and QA Linear have a bias
        trunk[f"{name}.bias"] = torch.randn(rows, generator=gen) * 0.1  # (N,)
    return trunk


def head_config_json(head: str, labels: tuple[str, ...] = TINY_LABELS) -> dict:
    """config.json's keys that name `head`: its transformers class, and a classifier's id2label."""
    architecture = next(name for name, kind in ARCHITECTURES.items() if kind == head)
    out: dict = {"architectures": [architecture]}
    if head in CLASSIFIER_KINDS:
        out.update(id2label={str(i): name for i, name in enumerate(labels)},
                   label2id={name: i for i, name in enumerate(labels)})
    return out


def write_head_checkpoint(folder: str | Path, config: MixtralConfig, head: str = CAUSAL_LM, seed: int = 0,
                          labels: tuple[str, ...] = TINY_LABELS, max_shard_bytes: int | None = None,
                          tokenizer_model: Path | None = None) -> Path:
    """A random checkpoint of `head` (one of head.HEADS) as transformers' class saves it; a classifier
    gets one class per label."""
    check_head(head)
    return write_checkpoint(folder, config, head_weights(config, head, seed, labels), max_shard_bytes,
                            tokenizer_model, head_config_json(head, labels))


def write_tiny(folder: str | Path, seed: int = 0, config: MixtralConfig = TINY_CONFIG,
               max_shard_bytes: int | None = None, head: str = CAUSAL_LM) -> Path:
    """The tiny checkpoint of `head`, tokenizer included; the same seed writes the same files."""
    check_head(head)  # before a tokenizer is trained
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = train_tokenizer(load_tiny_corpus(), Path(scratch) / "tokenizer.model",
                                    vocab_size=config.vocab_size)
        return write_head_checkpoint(folder, config, head, seed, max_shard_bytes=max_shard_bytes,
                                     tokenizer_model=tokenizer)
