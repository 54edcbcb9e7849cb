"""Parity of a head artifact: every runtime against the first and against transformers' own head class.

The same prompts go through every runtime and through transformers (MixtralModel,
MixtralFor{Sequence,Token}Classification, MixtralForQuestionAnswering, fp32, eager attention) in
the same padded (B, T) batches, left-padded and right-padded, by the one scoring loop
(runtimes/heads.py); each output is compared at the prompts' own tokens with verify.py's comparator
and tolerances (fp32: max |diff| <= 1e-4; fp16/bf16: argmax agreement).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from mixtral_export.artifact.contract import HeadShapes
from mixtral_export.runtimes.heads import HeadBackend, HeadResult, score
from mixtral_export.runtimes.verify import DEMO_TEXTS, TOLERANCES, Comparison, compare

HF_CLASSES = {"model": "MixtralModel", "sequence-classification": "MixtralForSequenceClassification",
              "token-classification": "MixtralForTokenClassification",
              "question-answering": "MixtralForQuestionAnswering"}


@dataclass
class HeadComparison:
    output: str
    padding: str
    comparison: Comparison


@dataclass
class HeadVerifyReport:
    artifact: str
    head: str
    dtype: str
    prompts: list[list[int]]
    comparisons: list[HeadComparison]

    @property
    def passed(self) -> bool:
        return all(c.comparison.passed for c in self.comparisons)

    def to_json(self) -> dict:
        return {"artifact": self.artifact, "head": self.head, "dtype": self.dtype, "passed": self.passed,
                "prompts": self.prompts,
                "comparisons": [{"output": c.output, "padding": c.padding, **asdict(c.comparison),
                                 "passed": c.comparison.passed} for c in self.comparisons]}


class HFHeadReference:
    """transformers' own class for the head on the source checkpoint, as a HeadBackend of the artifact's shapes.

    Rows run one at a time: transformers' sequence classifier refuses a batch without a pad id.
    """

    name = "hf"

    def __init__(self, checkpoint: str | Path, shapes: HeadShapes):
        import torch
        import transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.torch = torch
        self.shapes = shapes
        self.model = getattr(transformers, HF_CLASSES[shapes.head]).from_pretrained(
            checkpoint, dtype=torch.float32, attn_implementation="eager").eval()

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        rows = []
        with self.torch.no_grad():
            for ids, mask in zip(input_ids, attention_mask):
                out = self.model(input_ids=self.torch.from_numpy(ids[None]), attention_mask=self.torch.from_numpy(mask[None]))
                rows.append([out[name].float().numpy() for name in self.shapes.output_names])
        return {name: np.concatenate([row[i] for row in rows]) for i, name in enumerate(self.shapes.output_names)}


def paddings(shapes: HeadShapes, pad_token_id: int | None) -> tuple[str, ...]:
    """Both sides, except where transformers' pooling makes right padding meaningless (no pad id)."""
    return ("left",) if shapes.head == "sequence-classification" and pad_token_id is None else ("left", "right")


def verify_heads(backends: dict[str, HeadBackend], prompts: list[list[int]], pad_token_id: int | None, dtype: str,
                 artifact: str = "", reference: HeadBackend | None = None) -> HeadVerifyReport:
    """Compare every backend with the first one, and (if given) every backend with the reference."""
    names = list(backends)
    shapes = backends[names[0]].shapes
    comparisons = []
    for side in paddings(shapes, pad_token_id):
        results = {name: score(backend, prompts, pad_token_id, side) for name, backend in backends.items()}
        pairs = [(name, names[0]) for name in names[1:]]
        if reference is not None:
            results["hf"] = score(reference, prompts, pad_token_id, side)
            pairs += [(name, "hf") for name in names]
        for output in shapes.output_names:
            tolerance = replace(TOLERANCES[dtype], same_greedy=False)
            if output == "last_hidden_state":  # no argmax to agree on
                tolerance = replace(tolerance, min_top1=0.0)
            for name, against in pairs:
                comparison = compare(name, against, rows(results[name], output), rows(results[against], output),
                                     [None] * len(prompts), tolerance)
                comparisons.append(HeadComparison(output, side, comparison))
    return HeadVerifyReport(artifact=artifact, head=shapes.head, dtype=dtype, prompts=prompts,
                            comparisons=comparisons)


def rows(results: list[HeadResult], output: str) -> list[np.ndarray]:
    """Per prompt a 2-D array whose last axis is what argmax picks from: labels, or tokens (QA)."""
    return [np.atleast_2d(r.outputs[output]) for r in results]


def default_head_prompts(tokenizer, shapes: HeadShapes, vocab_size: int) -> list[list[int]]:
    """Short, full-length and odd-length prompts, one more than a batch so batching is exercised too."""
    count = shapes.batch + 1
    if tokenizer is not None:
        texts = [DEMO_TEXTS[i % len(DEMO_TEXTS)][: 20 + 40 * i] for i in range(count)]
        return [tokenizer.encode(t, bos=True)[: shapes.seq_len] for t in texts]
    t = shapes.seq_len
    lengths = [min(5, t), t, max(1, t // 2 + 1)] + [max(1, t - 3)] * max(0, count - 3)
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab_size, size=n).tolist() for n in lengths[:count]]


def verify_head_artifact(artifact: str | Path, runtimes: list[str], reference: str | None = None,
                         checkpoint: str | Path | None = None) -> HeadVerifyReport:
    """Open the head artifact on each runtime and compare them (and transformers) on default prompts."""
    from mixtral_export.runtimes.load import RuntimeLoadError, load_head_manifest, open_head_backend, open_tokenizer

    if len(runtimes) < 1 or len(set(runtimes)) != len(runtimes):
        raise RuntimeLoadError(f"--runtimes needs distinct runtime names, got {','.join(runtimes)}")
    if len(runtimes) < 2 and reference is None:
        raise RuntimeLoadError("nothing to compare: give two runtimes or --reference hf")
    manifest = load_head_manifest(artifact)  # each backend checks the files as it opens
    backends = {name: open_head_backend(artifact, name, checkpoint=checkpoint)[0] for name in runtimes}
    tokenizer = open_tokenizer(manifest)
    prompts = default_head_prompts(tokenizer, manifest.shapes, manifest.config.vocab_size)
    ref = None
    if reference == "hf":
        source = Path(checkpoint) if checkpoint else Path(manifest.source or "")
        if not (source / "config.json").exists():
            raise RuntimeLoadError(f"{manifest.folder}: --reference hf needs the source checkpoint ({source})")
        ref = HFHeadReference(source, manifest.shapes)
    return verify_heads(backends, prompts, manifest.config.pad_token_id, manifest.dtype, artifact=str(artifact),
                        reference=ref)


def print_head_report(report: HeadVerifyReport, console) -> None:
    from rich.table import Table
    from rich.text import Text

    title = f"{report.artifact}: {report.head}, {len(report.prompts)} prompts, {report.dtype}"
    table = Table(title=Text(title))
    for column in ("runtime", "vs", "output", "padding", "max|d|", "mean|d|", "argmax agrees", "result"):
        table.add_column(column, no_wrap=True)
    for c in report.comparisons:
        r = c.comparison
        agrees = "-" if c.output == "last_hidden_state" else f"{r.top1_agreement:.0%}"
        table.add_row(r.runtime, r.against, c.output, c.padding, f"{r.max_abs:.1e}", f"{r.mean_abs:.1e}", agrees,
                      Text("pass", "green") if r.passed else Text("FAIL", "red"))
    console.print(table)
    t = TOLERANCES[report.dtype]
    console.print(f"tolerance ({report.dtype}): max|d| <= {t.max_abs if t.max_abs is not None else 'not judged'}, "
                  f"argmax agreement >= {t.min_top1:.0%}", highlight=False)
    console.print(Text("all within tolerance", "green") if report.passed else Text("outside tolerance", "red"))
