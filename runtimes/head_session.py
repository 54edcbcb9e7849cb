"""The Python API of a head artifact: open it, then score or classify text.

    from mixtral_export.runtimes.head_session import HeadSession
    with HeadSession.open("out/classifier-onnx", runtime="ort") as session:
        print(session.classify(["great film", "dull film"]))   # label names (config.json's id2label)
        result = session.score("great film")                   # every output, cut to the prompt's tokens

A head artifact (graphs/onnx_heads.py: bare model, sequence / token classification, question
answering) runs one static (B, T) batch with no cache; prompts are padded into such batches B at
a time by the one scoring loop (runtimes/heads.py). A causal-LM artifact generates instead
(runtimes/session.py, Session). Calls from several threads are served one batch at a time.
"""
from __future__ import annotations

import threading
from pathlib import Path

from mixtral_export.artifact.contract import CLASSIFIER_KINDS
from mixtral_export.artifact.manifest import HeadManifest
from mixtral_export.runtimes.heads import HeadBackend, HeadResult, score
from mixtral_export.runtimes.step import RequestError

class HeadSession:
    def __init__(self, backend: HeadBackend, manifest: HeadManifest, tokenizer=None):
        self.backend = backend
        self.manifest = manifest
        self.tokenizer = tokenizer
        self._lock = threading.Lock()  # the backend runs one batch at a time

    @classmethod
    def open(cls, artifact: str | Path, runtime: str = "ort", provider: str = "cpu",
             threads: int | None = None, checkpoint: str | Path | None = None) -> "HeadSession":
        """Open a head artifact on `runtime` (ort, or eager on its source checkpoint); a causal-LM
        artifact is refused (ArtifactKindError: open it with Session)."""
        from mixtral_export.runtimes.load import open_head_backend, open_tokenizer

        backend, manifest = open_head_backend(artifact, runtime, provider=provider, threads=threads,
                                              checkpoint=checkpoint)
        return cls(backend, manifest, open_tokenizer(manifest))

    def close(self) -> None:
        """Nothing runs between calls; kept so a HeadSession closes as a Session does."""

    def __enter__(self) -> "HeadSession":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    @property
    def head(self) -> str:
        """What the artifact computes: one of contract.HEAD_KINDS."""
        return self.manifest.head

    @property
    def labels(self) -> tuple[str, ...]:
        """A classifier's label names by class id; () for the other heads."""
        return self.manifest.labels

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError(f"{self.manifest.folder}: the artifact has no tokenizer.model (its checkpoint had none); "
                               f"give token ids (--input-ids)")
        return self.tokenizer.encode(text, bos=True)

    def score_ids(self, prompts: list[list[int]], padding: str = "left") -> list[HeadResult]:
        """Each prompt's head outputs, cut to its own tokens; batched `shapes.batch` rows at a time."""
        with self._lock:
            return score(self.backend, prompts, self.manifest.config.pad_token_id, padding)

    def score(self, prompt: str | list[str], padding: str = "left") -> HeadResult | list[HeadResult]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        results = self.score_ids([self.encode(p) for p in prompts], padding)
        return results[0] if isinstance(prompt, str) else results

    def classify(self, prompt: str | list[str], padding: str = "left"):
        """A sequence classifier's label per prompt, a token classifier's label per token."""
        if self.head not in CLASSIFIER_KINDS:
            raise RequestError(f"{self.manifest.folder}: a {self.head} artifact has no labels; use score")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        found = [r.to_json(self.head, self.labels) for r in self.score(prompts, padding)]
        names = [r["label"] if self.head == "sequence-classification" else r["labels"] for r in found]
        return names[0] if isinstance(prompt, str) else names
