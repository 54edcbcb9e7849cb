"""The non-generative Mixtral heads as one static, prefill-only module (see graphs/contract.py).

(input_ids, attention_mask) (B, T) -> the head's outputs, computed as transformers' MixtralModel,
MixtralFor{Sequence,Token}Classification and MixtralForQuestionAnswering compute them. The trunk is
MixtralStatic's own (embedding, blocks, norm) run as one chunk over a one-slot cache that holds
no position, so nothing in it is ever visible: the no-cache forward, with no second transformer.
"""
from __future__ import annotations

import torch
from torch import nn

from mixtral_export.artifact.contract import CLASSIFIER_KINDS, NO_POSITION

from mixtral_export.artifact.config import MixtralConfig
from mixtral_export.head import Head
from mixtral_export.model import MixtralStatic


class HeadModel(nn.Module):
    def __init__(self, config: MixtralConfig, head: Head, routing: str = "dense"):
        super().__init__()
        if head.generates:
            raise ValueError("the causal LM is the step graph (mixtral_export/model.py), not a head graph")
        self.head = head
        self.body = MixtralStatic(config, config.sliding_window, routing, lm_head=False)
        hidden = config.hidden_size
        if head.kind in CLASSIFIER_KINDS:
            self.score = nn.Linear(hidden, head.num_labels, bias=head.bias)
        elif head.kind == "question-answering":
            self.qa_outputs = nn.Linear(hidden, 2, bias=True)

    @property
    def dtype(self) -> torch.dtype:
        return self.body.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """input_ids, attention_mask (B, T) int64 -> the head's outputs in contract order, float32."""
        config = self.body.config
        b, t = input_ids.shape
        columns = torch.arange(t, dtype=torch.int64, device=input_ids.device).expand(b, t)  # (B, T)
        positions = torch.where(attention_mask != 0, columns, NO_POSITION)  # (B, T): a token sits at its column
        empty = torch.zeros(config.num_hidden_layers, b, config.num_key_value_heads, 1, config.head_dim,
                            dtype=self.dtype, device=input_ids.device)  # (L, B, Hkv, 1, D)
        slots = torch.full((b, 1), NO_POSITION, dtype=torch.int64, device=input_ids.device)  # (B, 1): empty
        x, _, _ = self.body.hidden_states(input_ids, positions, empty, empty, slots)  # (B, T, H)
        kind = self.head.kind
        if kind == "model":
            return (x.float(),)
        if kind == "token-classification":
            return (self.score(x).float(),)  # (B, T, N)
        if kind == "question-answering":
            start, end = self.qa_outputs(x).float().unbind(-1)  # (B, T) each
            return start, end
        logits = self.score(x).float()  # (B, T, N)
        last = self.pooled_column(input_ids)  # (B,)
        index = last[:, None, None].expand(b, 1, logits.shape[-1])  # (B, 1, N)
        return (logits.gather(1, index)[:, 0],)  # (B, N)

    def pooled_column(self, input_ids: torch.Tensor) -> torch.Tensor:
        """transformers' pooling column (B,): the rightmost id that is not pad_token_id (0 when every
        id is), or the last column when the config has no pad_token_id."""
        b, t = input_ids.shape
        pad = self.body.config.pad_token_id
        if pad is None:
            return torch.full((b,), t - 1, dtype=torch.int64, device=input_ids.device)
        columns = torch.arange(t, dtype=torch.int32, device=input_ids.device)  # (T,)
        return (columns * (input_ids != pad).to(torch.int32)).argmax(-1)  # (B,)
