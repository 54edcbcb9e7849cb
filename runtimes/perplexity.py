"""Perplexity of an artifact over a user's tokens, and KL divergence against a reference run.

As llama.cpp's llama-perplexity measures it: the tokens are cut into consecutive windows of `ctx`
(the last partial window dropped, nothing added), each window runs from an empty cache, and only its
second half is scored, token i (ctx // 2 <= i < ctx) predicted from the window's tokens before it, so
every scored token sees at least half a window of context. Perplexity = exp(mean NLL) over all scored
tokens. Against a reference (transformers on the checkpoint, or a run saved with --save-logits):
KL(reference || ours) of each scored token's next-token distribution, top-1 agreement, both
perplexities and their change, each mean with its standard error as llama-perplexity gives it.
"""
from __future__ import annotations

import gc
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mixtral_export.artifact.contract import NO_POSITION, StepShapes
from mixtral_export.errors import UserError
from mixtral_export.runtimes.logit_reference import LogitReference, build, encode
from mixtral_export.runtimes.logprobs import log_softmax
from mixtral_export.runtimes.step import StepBackend
from mixtral_export.runtimes.verify import kl_divergence


class EvalInputError(UserError, ValueError):
    """Tokens or text that cannot be scored as asked; one line naming the file."""


@dataclass(frozen=True)
class EvalOptions:
    """What `eval` scores: the windows' length, and where a reference comes from."""

    ctx: int = 512
    reference: str | None = None  # "hf", or a file written by --save-logits
    save_logits: str | None = None  # write this run's distributions here, as a reference for later runs

    def __post_init__(self) -> None:
        if isinstance(self.ctx, bool) or not isinstance(self.ctx, int) or self.ctx < 2:
            raise EvalInputError(f"--ctx must be an integer >= 2 (half of each window is scored), got {self.ctx!r}")

    @property
    def first(self) -> int:
        """The first scored position of a window."""
        return self.ctx // 2

    def check_fits(self, shapes: StepShapes, max_position_embeddings: int, artifact: str) -> None:
        """A window runs from position 0 to ctx - 2 (the last token is only predicted)."""
        if self.ctx > max_position_embeddings:
            raise EvalInputError(f"--ctx {self.ctx} exceeds the model's max_position_embeddings "
                                 f"({max_position_embeddings})")
        if shapes.max_positions is not None and self.ctx - 1 > shapes.max_positions:
            raise EvalInputError(f"{artifact}: --ctx {self.ctx} does not fit the artifact's cache of "
                                 f"{shapes.max_positions} positions (it does not slide); give --ctx "
                                 f"{shapes.max_positions + 1} or less")


def read_token_ids(path: str | Path) -> list[int]:
    """Whitespace- or comma-separated token ids."""
    text = read_text(path)
    fields = [f for f in re.split(r"[\s,]+", text) if f]
    bad = next((f for f in fields if not re.fullmatch(r"[+-]?\d+", f)), None)
    if bad is not None:
        raise EvalInputError(f"{path}: {bad[:20]!r} is not a token id (whitespace- or comma-separated integers)")
    return [int(f) for f in fields]


def read_text(path: str | Path) -> str:
    """The file's text: UTF-8, not empty."""
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise EvalInputError(f"{path}: is a folder, not a text file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise EvalInputError(f"{path}: not UTF-8 text (byte {error.start})") from None
    if not text.strip():
        raise EvalInputError(f"{path}: is empty")
    return text


def cut_windows(tokens: list[int], ctx: int, vocab_size: int, source: str | Path) -> np.ndarray:
    """(W, ctx) consecutive windows of the tokens, the last partial one dropped."""
    if len(tokens) < ctx:
        raise EvalInputError(f"{source}: {len(tokens)} tokens, fewer than one window of --ctx {ctx}")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise EvalInputError(f"{source}: token id {bad[0]} is outside the vocabulary of {vocab_size}")
    count = len(tokens) // ctx
    return np.asarray(tokens[:count * ctx], dtype=np.int64).reshape(count, ctx)  # (W, ctx)


def window_logits(backend: StepBackend, windows: np.ndarray, first: int) -> Iterator[np.ndarray]:
    """Per window, the (ctx - first, V) logits predicting its tokens first..ctx-1, in order.

    Up to B windows run side by side, one per batch row, each from an empty cache, in the
    artifact's prefill chunks (the last chunk padded with "no token" positions)."""
    shapes = backend.shapes
    count, ctx = windows.shape
    fed = ctx - 1  # the last token is only predicted
    for start in range(0, count, shapes.batch):
        group = windows[start:start + shapes.batch]  # (b, ctx)
        backend.reset()
        kept = []
        done = 0
        while done < fed:
            chunk = shapes.prefill_length(fed - done) if fed - done > 1 else 1
            width = min(chunk, fed - done)
            ids = np.zeros((shapes.batch, chunk), dtype=np.int64)  # (B, T)
            positions = np.full((shapes.batch, chunk), NO_POSITION, dtype=np.int64)  # (B, T)
            ids[:len(group), :width] = group[:, done:done + width]
            positions[:len(group), :width] = np.arange(done, done + width)
            logits = backend.step(ids, positions)  # (B, T, V)
            lo = max(first - 1 - done, 0)
            if lo < width:
                kept.append(np.asarray(logits[:len(group), lo:width], dtype=np.float32))  # (b, t, V)
            done += width
        scored = np.concatenate(kept, axis=1)  # (b, ctx - first, V)
        yield from scored


def scored(logits: np.ndarray, targets: np.ndarray, nll: list, top1: list) -> np.ndarray:
    """(n, V) log-probabilities of a window's scored logits; appends its (n,) NLLs and argmaxes."""
    log_probs = log_softmax(logits)
    nll.append(-log_probs[np.arange(len(targets)), targets])
    top1.append(log_probs.argmax(-1))
    return log_probs


@dataclass(frozen=True)
class Estimate:
    """A mean and its standard error (the standard deviation over sqrt(n - 1), as llama.cpp reports)."""

    value: float
    uncertainty: float

    @classmethod
    def of_mean(cls, samples: np.ndarray) -> "Estimate":
        n = len(samples)
        return cls(float(samples.mean()), float(samples.std() / math.sqrt(n - 1)) if n > 1 else float("nan"))


@dataclass
class EvalReport:
    artifact: str
    runtime: str
    ctx: int
    windows: int
    tokens_scored: int
    nll: Estimate  # mean NLL per scored token, nats
    perplexity: Estimate
    reference: str | None = None
    reference_perplexity: Estimate | None = None
    perplexity_change: Estimate | None = None  # ours - reference
    log_perplexity_ratio: Estimate | None = None  # mean ln(PPL ours / PPL reference)
    kl_mean: Estimate | None = None
    kl_median: float | None = None
    kl_p99: float | None = None
    kl_max: float | None = None
    top1_agreement: Estimate | None = None

    def to_json(self) -> dict:
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, dict):  # an Estimate
                out[key], out[f"{key}_uncertainty"] = value["value"], value["uncertainty"]
            elif value is not None:
                out[key] = value
        return out


def evaluate(backend: StepBackend, windows: np.ndarray, options: EvalOptions, artifact: str = "",
             reference: LogitReference | None = None, reference_name: str | None = None,
             model: dict | None = None, progress: Callable[[int, int], None] | None = None
             ) -> tuple[EvalReport, LogitReference | None]:
    """Score the windows on the backend (and against the reference); with options.save_logits, also
    this run as a reference of `model`."""
    first, count = options.first, len(windows)
    nll, top1, kl, agree, keep = [], [], [], [], []
    for n, logits in enumerate(window_logits(backend, windows, first)):
        log_probs = scored(logits, windows[n, first:], nll, top1)  # (ctx - first, V)
        if reference is not None:
            kl.append(kl_divergence(reference.log_probs(n), log_probs))
            agree.append(top1[-1] == reference.top1[n * reference.per_window:(n + 1) * reference.per_window])
        if options.save_logits:
            keep.append(encode(log_probs))  # encoded window by window: 2 bytes per entry held, not 8
        if progress:
            progress(n + 1, count)
    ours = np.concatenate(nll)
    mean = Estimate.of_mean(ours)
    report = EvalReport(artifact=artifact, runtime=getattr(backend, "name", ""), ctx=options.ctx, windows=count,
                        tokens_scored=len(ours), nll=mean,
                        perplexity=Estimate(math.exp(mean.value), math.exp(mean.value) * mean.uncertainty))
    if reference is not None:
        report = compare(report, ours, reference, np.concatenate(kl), np.concatenate(agree), reference_name)
    saved = build(model or {}, windows, nll, top1, keep) if options.save_logits else None
    return report, saved


def compare(report: EvalReport, ours: np.ndarray, reference: LogitReference, kl: np.ndarray,
            agree: np.ndarray, name: str | None) -> EvalReport:
    """The report with the reference's measures: llama-perplexity's KL-divergence statistics."""
    theirs = Estimate.of_mean(reference.nll)
    ratio = Estimate.of_mean(ours - reference.nll)  # mean ln(PPL ours / PPL reference), paired
    ppl, ref_ppl = report.perplexity.value, math.exp(theirs.value)
    # the change's error from the paired NLL differences: d(ppl - ref) ~ ppl * d(mean nll difference)
    report.reference, report.reference_perplexity = name, Estimate(ref_ppl, ref_ppl * theirs.uncertainty)
    report.perplexity_change = Estimate(ppl - ref_ppl, ppl * ratio.uncertainty)
    report.log_perplexity_ratio = ratio
    report.kl_mean = Estimate.of_mean(kl)
    report.kl_median, report.kl_p99, report.kl_max = (float(np.median(kl)), float(np.percentile(kl, 99)),
                                                      float(kl.max()))
    p = float(agree.mean())
    report.top1_agreement = Estimate(p, math.sqrt(p * (1 - p) / (len(agree) - 1)) if len(agree) > 1 else float("nan"))
    return report


def reference_of(logits: Iterator[np.ndarray], windows: np.ndarray, first: int, model: dict) -> LogitReference:
    """A reference from per-window (ctx - first, V) logits predicting each window's tokens first..ctx-1."""
    nll, top1, parts = [], [], []
    for n, window in enumerate(logits):
        parts.append(encode(scored(window, windows[n, first:], nll, top1)))
    return build(model, windows, nll, top1, parts)


def hf_reference(checkpoint: str | Path, windows: np.ndarray, first: int, model: dict) -> LogitReference:
    """transformers on the checkpoint (fp32, eager attention), each window in one forward pass."""
    from mixtral_export.runtimes.verify import HFReference

    hf = HFReference(checkpoint)
    reference = reference_of((hf.logits(window.tolist())[first - 1:-1] for window in windows), windows, first, model)
    del hf
    gc.collect()
    return reference


def eval_artifact(artifact: str | Path, runtime: str, options: EvalOptions, tokens_file: str | Path | None = None,
                  text_file: str | Path | None = None, provider: str = "cpu", checkpoint: str | Path | None = None,
                  progress: Callable[[int, int], None] | None = None) -> EvalReport:
    """Open the artifact on `runtime` and score the tokens (ids, or text in the artifact's tokenizer, BOS
    first); every input is checked before the model opens, so bad input costs no load time."""
    from mixtral_export.destinations import check_file
    from mixtral_export.runtimes import logit_reference
    from mixtral_export.runtimes.load import (check_runtime, eager_source, load_step_manifest, open_step_backend,
                                              open_tokenizer)

    check_runtime(runtime)
    manifest = load_step_manifest(artifact)
    shapes, model = manifest.shapes, manifest.config.to_dict()
    if (tokens_file is None) == (text_file is None):
        raise EvalInputError("give --tokens FILE or --text FILE, not both" if tokens_file else
                             "give --tokens FILE (token ids) or --text FILE")
    if tokens_file is not None:
        tokens, source = read_token_ids(tokens_file), tokens_file
    else:
        tokenizer = open_tokenizer(manifest)
        if tokenizer is None:
            raise EvalInputError(f"{manifest.folder}: the artifact has no tokenizer to encode --text; give --tokens")
        tokens, source = tokenizer.encode(read_text(text_file), bos=True), text_file
    options.check_fits(shapes, manifest.config.max_position_embeddings, str(manifest.folder))
    windows = cut_windows(tokens, options.ctx, shapes.vocab_size, source)
    reference = None
    if options.reference not in (None, "hf"):
        reference = logit_reference.load(options.reference)
        logit_reference.check_matches(reference, options.reference, model, windows)
    if options.save_logits:
        check_file(options.save_logits, logit_reference.is_ours)  # before the scoring, not after
    if options.reference == "hf":
        reference = hf_reference(eager_source(manifest, checkpoint), windows, options.first, model)
    backend, _ = open_step_backend(artifact, runtime, provider=provider, checkpoint=checkpoint)
    report, saved = evaluate(backend, windows, options, artifact=str(artifact), reference=reference,
                             reference_name=options.reference, model=model, progress=progress)
    if saved is not None:
        logit_reference.save(options.save_logits, saved)
    report.runtime = runtime
    return report


def print_eval_report(report: EvalReport, console) -> None:
    """The report as llama-perplexity prints it: each measure with its uncertainty."""
    def line(label: str, text: str) -> None:
        console.print(f"{label:<24}{text}", highlight=False)

    console.print(f"{report.artifact} on {report.runtime}: {report.windows} windows of {report.ctx} tokens, "
                  f"{report.tokens_scored} scored (each window's second half)", highlight=False)
    line("perplexity", f"{report.perplexity.value:.6g} ± {report.perplexity.uncertainty:.2g}")
    if report.kl_mean is None:
        return
    line(f"reference ({report.reference})", f"{report.reference_perplexity.value:.6g} ± "
                                             f"{report.reference_perplexity.uncertainty:.2g}")
    line("perplexity change", f"{report.perplexity_change.value:+.4g} ± {report.perplexity_change.uncertainty:.2g}")
    line("mean ln(PPL/PPL ref)", f"{report.log_perplexity_ratio.value:+.4g} ± "
                                 f"{report.log_perplexity_ratio.uncertainty:.2g}")
    line("KL divergence mean", f"{report.kl_mean.value:.4g} ± {report.kl_mean.uncertainty:.2g} nats")
    line("KL median, p99, max", f"{report.kl_median:.4g}, {report.kl_p99:.4g}, {report.kl_max:.4g}")
    line("same top-1", f"{report.top1_agreement.value:.3%} ± {report.top1_agreement.uncertainty:.2%}")
