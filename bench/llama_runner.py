"""llama.cpp run through its C API (llama-cpp-python's ctypes binding): greedy tokens and logits, as ours are.

One model, read into memory once (llama.cpp's --no-mmap: a memory-mapped file's pages can be pushed
out of the page cache by other processes and read back from disk mid-decode; ORT's backend keeps its
weights resident too), and a fresh context for every sequence, so nothing of an earlier prompt is
reused. The prompt goes in as one batch with logits wanted for every row:
otherwise llama.cpp runs its last layer's attention output and MoE only for the rows whose logits
are wanted (the last one), work our graphs and transformers do, and a time to first token without
it would not compare (on a 1-layer model it skips nearly all of prefill). Then one token per
decode. The KV cache is float32, as ours is, and flash attention is off (on the CPU it rounds the
query to f16: the tiny model's f32 logits came 5e-3 from ours with it, 5e-6 without); prompt and
decode use the same threads.

The KV cache type follows ours (`kv`: float32, float16, int8 as llama.cpp's q8_0, its
`--cache-type-k/v`). llama.cpp stores a quantized V cache only with flash attention, so a q8_0
cache runs with it on (as llama.cpp's users must), the float ones with it off.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mixtral_export.bench.gguf import GgufError, import_llama_cpp

_QUIET = None  # the log callback; kept alive as long as llama.cpp may call it
KV_TYPES = {"float32": "GGML_TYPE_F32", "float16": "GGML_TYPE_F16", "int8": "GGML_TYPE_Q8_0"}  # ours -> ggml's


class LlamaCpp:
    def __init__(self, path: Path, threads: int, n_ctx: int, kv: str = "float32"):
        global _QUIET
        lc = self.lc = import_llama_cpp()
        lc.llama_backend_init()
        if _QUIET is None:
            _QUIET = lc.llama_log_callback(lambda level, text, data: None)
            lc.llama_log_set(_QUIET, None)
        model_params = lc.llama_model_default_params()
        model_params.use_mmap = False
        self.model = lc.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise GgufError(f"{path}: llama.cpp could not load it")
        self.vocab_size = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        params = self.params = lc.llama_context_default_params()
        params.n_ctx = params.n_batch = n_ctx  # the whole prompt is one batch
        params.n_ubatch = min(n_ctx, 512)
        params.n_threads = params.n_threads_batch = threads
        if kv not in KV_TYPES:
            raise GgufError(f"llama.cpp has no KV cache type for {kv!r} (one of {', '.join(KV_TYPES)})")
        params.type_k = params.type_v = getattr(lc, KV_TYPES[kv])
        quantized = kv == "int8"  # a quantized V cache needs flash attention in llama.cpp
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if quantized else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self.n_ctx = n_ctx
        self.batch = lc.llama_batch_init(n_ctx, 0, 1)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_model_free(self.model)

    @contextmanager
    def context(self) -> Iterator[object]:
        """A fresh llama_context: an empty KV cache."""
        ctx = self.lc.llama_init_from_model(self.model, self.params)
        if not ctx:
            raise GgufError("llama.cpp could not make a context")
        try:
            yield ctx
        finally:
            self.lc.llama_free(ctx)

    def decode(self, ctx, tokens: list[int], start: int, every_row: bool) -> np.ndarray:
        """Run `tokens` at positions start.. of sequence 0; the logits of every row, or of the last."""
        if start + len(tokens) > self.n_ctx:
            raise GgufError(f"{start + len(tokens)} positions do not fit the context of {self.n_ctx}")
        batch, last = self.batch, len(tokens) - 1
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = every_row or i == last
        if self.lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        rows = len(tokens) if every_row else 1
        return np.ctypeslib.as_array(self.lc.llama_get_logits(ctx), shape=(rows * self.vocab_size,)).reshape(
            rows, self.vocab_size)  # (rows, V), llama.cpp's buffer: copy what is kept

    def generate(self, ctx, prompt: list[int], new_tokens: int, on_token: Callable[[int], None] = lambda t: None
                 ) -> list[int]:
        """Greedy: prefill (every row's logits), then one decode per token; on_token as each comes out."""
        logits = self.decode(ctx, prompt, 0, every_row=True)
        out: list[int] = []
        for n in range(new_tokens):
            out.append(int(logits[-1].argmax()))
            on_token(out[-1])
            if n + 1 < new_tokens:
                logits = self.decode(ctx, out[-1:], len(prompt) + n, every_row=False)
        return out

    def greedy(self, prompts: list[list[int]], steps: int) -> list[list[int]]:
        out = []
        for prompt in prompts:
            with self.context() as ctx:
                out.append(self.generate(ctx, prompt, steps))
        return out

    def teacher_forced(self, prompts: list[list[int]], forced: list[list[int]]) -> list[np.ndarray]:
        """Per prompt (steps, V) logits, as runtimes/verify.py's: step 0 from prefill, step s from
        decoding forced[s - 1] (one token per decode, the path generation takes)."""
        out = []
        for prompt, tokens in zip(prompts, forced):
            with self.context() as ctx:
                rows = [self.decode(ctx, prompt, 0, every_row=True)[-1].copy()]
                for n, token in enumerate(tokens[:-1]):
                    rows.append(self.decode(ctx, [token], len(prompt) + n, every_row=False)[-1].copy())
            out.append(np.stack(rows))
        return out
