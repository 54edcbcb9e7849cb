"""The small public API for services: open an artifact, then generate or stream text.

    from mixtral_export.runtimes.session import Session
    session = Session.open("out/tiny-onnx", runtime="ort")
    print(session.generate("Once upon a time", max_new_tokens=20))
    for piece in session.stream("Hi", chat=True, temperature=0.7, seed=1):
        print(piece, end="")
    session.generate("A person:", json_schema={"type": "object", "properties": {"name": {"type": "string"}}})

Structured output: `json_schema=` (a JSON schema dict; `{"type": "object"}` for any object) or
`grammar=` (llguidance's Lark dialect) constrain every prompt's output (runtimes/constraint.py).

A head artifact (graphs/onnx_heads.py: bare model, sequence / token classification, question
answering) does not generate: `Session.open` refuses it, naming HeadSession
(runtimes/head_session.py), which scores and classifies.

Thread safety: a Session owns one backend and one Engine (runtimes/engine.py) stepping it on a
background thread; every call submits its prompts to the engine, which lends each a batch row.
Calls from several threads run concurrently, each prompt in its own row as soon as one is
free, and give the same greedy tokens as run alone. A `stream` iterator closed early cancels its
request. `last_result` is the last call's result (from whichever thread finished last).
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Iterator

from mixtral_export.runtimes.engine import Engine
from mixtral_export.runtimes.engine_client import InprocessClient, RequestHandle, result_of
from mixtral_export.runtimes.json_grammar import json_grammar
from mixtral_export.runtimes.requests import GenerationConfig, GenerationResult, check_prompts, generation_config
from mixtral_export.runtimes.step import RequestError


class Session:
    def __init__(self, backend, manifest, tokenizer=None, max_queue: int | None = None,
                 max_rows: int | None = None):
        self.backend = backend
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.last_result: GenerationResult | None = None
        self._client = InprocessClient(
            Engine(backend, max_queue=max_queue, max_rows=max_rows,
                   max_positions=manifest.config.max_position_embeddings, tokenizer=tokenizer),
            tokenizer.stream_decoder if tokenizer else None)
        weakref.finalize(self, self._client.stop_and_wait)  # dropped unclosed, or at exit: its thread ends

    @property
    def client(self) -> InprocessClient:
        """The engine client generation goes through (what a server holds)."""
        return self._client

    def close(self, grace: float = 0.0) -> None:
        """Stop admitting; running requests get `grace` seconds to finish, then are cancelled; the
        engine's thread ends (it holds the backend until then); a pipeline's stage actors go."""
        self._client.close(grace)
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    @classmethod
    def open(cls, artifact: str | Path, runtime: str = "ort", provider: str = "cpu",
             threads: int | None = None, checkpoint: str | Path | None = None,
             max_queue: int | None = None, max_rows: int | None = None, ray: bool = False,
             stage_options=None, row_groups: int = 1) -> "Session":
        """`ray`: a staged artifact's stages as Ray actors (runtimes/ray_stages.py), `stage_options`
        their Ray options; without it they run in this process. `row_groups`: a staged artifact's
        batch rows G times over, in G groups in flight through the stages (docs/pipeline.md)."""
        from mixtral_export.runtimes.load import open_step_backend, open_tokenizer

        backend, manifest = open_step_backend(artifact, runtime, provider=provider, threads=threads,
                                              checkpoint=checkpoint, ray=ray, stage_options=stage_options,
                                              row_groups=row_groups)
        return cls(backend, manifest, open_tokenizer(manifest), max_queue=max_queue, max_rows=max_rows)

    # ---- text <-> ids ----

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise RequestError(f"{self.manifest.folder}: the artifact has no tokenizer.model (its checkpoint had none); "
                               f"give token ids (--input-ids)")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._need_tokenizer().encode(text, bos=True)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Ids of user/assistant/system messages in the model's Instruct format (as mistral-common)."""
        return self._need_tokenizer().encode_chat(messages)

    def decode(self, ids: list[int]) -> str:
        return self._need_tokenizer().decode(ids)

    def _config(self, json_schema: dict | None = None, **options) -> GenerationConfig:
        if json_schema is not None:
            if options.get("grammar") is not None:
                raise RequestError("give json_schema or grammar, not both")
            options["grammar"] = json_grammar(json_schema)
        return generation_config(self.manifest.eos_token_id, **options)

    def _prompt_ids(self, prompt: str, chat: bool, system: str | None = None) -> list[int]:
        """A system prompt implies chat."""
        if system is not None:
            return self.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": prompt}])
        return self.encode_chat([{"role": "user", "content": prompt}]) if chat else self.encode(prompt)

    # ---- generation ----

    def submit(self, prompt_ids: list[int], index: int = 0, timeout: float | None = None,
               **options) -> RequestHandle:
        """Queue one prompt on the engine; iterate the handle (or `async for`) for its tokens."""
        return self.client.submit(prompt_ids, self._config(**options), index=index, timeout=timeout)

    def generate_ids(self, prompts: list[list[int]], **options) -> GenerationResult:
        check_prompts([[int(t) for t in p] for p in prompts], self.backend.shapes.vocab_size,
                      self.client.admission.limit)
        requests: list[RequestHandle] = []
        try:
            for index, prompt in enumerate(prompts):
                requests.append(self.submit(prompt, index=index, **options))
            for request in requests:
                request.result()
        finally:
            for request in requests:
                request.cancel()  # no-op for the finished; frees rows if the caller gave up
        self.last_result = result_of(requests)
        return self.last_result

    def stream_ids(self, prompt_ids: list[int], **options) -> Iterator[str]:
        """Text pieces of one prompt's continuation as they are produced."""
        request = self.submit(prompt_ids, **options)
        try:
            for event in request:
                yield event.text_delta if self.tokenizer else f"{event.token_id} "
        finally:
            request.cancel()
        self.last_result = result_of([request])

    def generate(self, prompt: str | list[str], chat: bool = False, system: str | None = None,
                 **options) -> str | list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        result = self.generate_ids([self._prompt_ids(p, chat, system) for p in prompts], **options)
        texts = [c.text for c in result.completions]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, chat: bool = False, system: str | None = None, **options) -> Iterator[str]:
        return self.stream_ids(self._prompt_ids(prompt, chat, system), **options)
