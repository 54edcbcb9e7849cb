"""Reference checkpoints written by transformers' own save_pretrained, with decisive weights.

HF's default 0.02 init makes routers near uniform and logits flat, so a parity test on it would
barely exercise routing or argmax. These weights give router logits of a few units and peaked
next-token distributions.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=8, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)


def hf_reference(folder: Path, seed: int = 0, max_shard_size: str | None = None, dtype=torch.float32,
                 **overrides):
    """Save a random MixtralForCausalLM with save_pretrained into `folder`; return the model."""
    from transformers import MixtralConfig, MixtralForCausalLM

    values = {**BASE, **overrides}
    rope_theta = values.pop("rope_theta")
    config = MixtralConfig(**values, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = decisive(MixtralForCausalLM(config).eval()).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    model.generation_config.eos_token_id = None  # parity tests generate a fixed number of tokens
    model.generation_config.pad_token_id = 0
    return model


def decisive(model):
    """Give `model` weights whose routing and head outputs are peaked (see the module docstring)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            elif name.endswith("gate.weight"):
                p.normal_(0.0, 2.0 / math.sqrt(p.shape[-1]))
            elif "lm_head" in name or name.startswith(("score.", "qa_outputs.")):
                p.normal_(0.0, 3.0 / math.sqrt(p.shape[-1]))
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return model


HEAD_CLASSES = {"model": "MixtralModel", "sequence-classification": "MixtralForSequenceClassification",
                "token-classification": "MixtralForTokenClassification",
                "question-answering": "MixtralForQuestionAnswering"}


def hf_head_reference(folder: Path, head: str, seed: int = 0, num_labels: int = 3, pad_token_id: int | None = None,
                      **overrides):
    """Write a random `head` checkpoint with the tiny model's writer (mixtral_export/tiny.py), BASE's
    shapes, and load it into transformers' own class (fp32, eager attention); return that model.
    Loading checks the files are what the class saves: no tensor missing, none left over."""
    import transformers

    from mixtral_export.artifact.config import MixtralConfig as OurConfig
    from mixtral_export.tiny import write_head_checkpoint

    values = {**BASE, **overrides}
    values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
    config = OurConfig(**values, pad_token_id=pad_token_id, dtype="float32")
    write_head_checkpoint(folder, config, head, seed, labels=tuple(f"class-{i}" for i in range(num_labels)))
    model, info = getattr(transformers, HEAD_CLASSES[head]).from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info  # missing, unexpected, mismatched keys, errors
    return model.eval()


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and attention mask (B, N), each prompt right-aligned, as HF batches are for generation."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)  # (B, N)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64)  # (B, N)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def reference_logits(model, prompts: list[list[int]]) -> list[np.ndarray]:
    """Per-prompt (n, V) logits of the full forward pass, as one left-padded batch."""
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    return [logits[row, width - len(p):].numpy() for row, p in enumerate(prompts)]


def reference_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate, one left-padded batch; returns the new tokens per row."""
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False)
    return [row[width:].tolist() for row in out]


def random_prompts(lengths: list[int], vocab_size: int, seed: int = 1) -> list[list[int]]:
    gen = np.random.default_rng(seed)
    return [gen.integers(3, vocab_size, size=n).tolist() for n in lengths]
