"""Parity verification: any runtime against a baseline runtime and the transformers reference.

The baseline (the first runtime, usually eager) generates a greedy continuation of each prompt.
Every runtime is then teacher-forced through that same token sequence (chunked prefill, then one
decode step per token), so its per-step logits compare position for position; each runtime's own
greedy run gives the first step where its continuation diverges. Tolerances depend on dtype.

A quantized artifact (int8/int4 weights) is judged twice over. Its baseline, eager, runs on the
artifact's own dequantized weights and rounds each quantized GEMM's input to int8 as the kernels
do, so the comparison checks ONNX Runtime's quantized kernels at the fp32 tolerance, judged on
the median step: that rounding is discontinuous, and a 1e-6 difference upstream now and then
moves one input by a code (measured: 1 step in 80 at 8e-2 on the tiny int8 model, which the
cache then carries), so the largest step is reported, not judged. What quantization costs is reported apart, against eager on the
float weights (and transformers, with --reference hf): top-1 agreement, mean and p99 KL
divergence of the next-token distribution over the same teacher-forced steps, and the first step
where each runtime's greedy continuation leaves the float model's.
"""
from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mixtral_export.runtimes.engine import Engine
from mixtral_export.runtimes.generate import generate
from mixtral_export.runtimes.logprobs import log_softmax
from mixtral_export.runtimes.requests import GenerationConfig
from mixtral_export.runtimes.sampling import SamplingParams
from mixtral_export.runtimes.step import StepBackend

DEMO_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. "
    "Complex is better than complicated. Flat is better than nested. Sparse is better than dense.",
)


@dataclass(frozen=True)
class Tolerance:
    max_abs: float | None  # bound on every step's max |logit difference|, or None: not judged
    min_top1: float  # fraction of steps whose argmax must agree
    same_greedy: bool  # the greedy continuation must equal the baseline's token for token
    median_step_abs: float | None = None  # bound on the median over steps of each step's max |difference|


TOLERANCES = {
    "float32": Tolerance(max_abs=1e-4, min_top1=1.0, same_greedy=True),
    "float16": Tolerance(max_abs=None, min_top1=0.9, same_greedy=False),
    "bfloat16": Tolerance(max_abs=None, min_top1=0.85, same_greedy=False),
    "int8": Tolerance(max_abs=None, min_top1=0.9, same_greedy=False),  # an int8 KV cache (--kv-dtype int8)
}
QUANTIZED_TOLERANCE = Tolerance(max_abs=None, min_top1=1.0, same_greedy=True, median_step_abs=1e-4)


@dataclass
class Comparison:
    runtime: str
    against: str
    max_abs: float
    mean_abs: float
    top1_agreement: float
    first_divergence: list[int | None]  # per prompt: first generated step that differs, None if none
    per_step_max_abs: list[list[float]]  # per prompt, per step
    tolerance: Tolerance
    passed: bool = field(init=False)
    median_step_abs: float = field(init=False)

    def __post_init__(self) -> None:
        t = self.tolerance
        self.median_step_abs = float(np.median([x for steps in self.per_step_max_abs for x in steps]))
        self.passed = ((t.max_abs is None or self.max_abs <= t.max_abs) and self.top1_agreement >= t.min_top1
                       and (t.median_step_abs is None or self.median_step_abs <= t.median_step_abs)
                       and (not t.same_greedy or all(d is None for d in self.first_divergence)))


@dataclass
class QuantizationCost:
    """One runtime on quantized weights against a float model; reported, not judged."""

    runtime: str
    against: str  # "float" (eager on the checkpoint's weights) or "hf"
    top1_agreement: float
    kl_mean: float  # KL(float || quantized) of the next-token distribution, nats, over every step
    kl_p99: float
    first_divergence: list[int | None]  # per prompt: first greedy step that differs from the float model's


@dataclass
class VerifyReport:
    artifact: str
    dtype: str
    steps: int
    prompts: list[list[int]]
    continuation: list[list[int]]  # the baseline's greedy tokens
    comparisons: list[Comparison]
    quantization: dict | None = None  # the manifest's record, tensors left out
    quantization_cost: list[QuantizationCost] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def to_json(self) -> dict:
        return {"artifact": self.artifact, "dtype": self.dtype, "steps": self.steps, "passed": self.passed,
                "prompts": self.prompts, "continuation": self.continuation,
                "comparisons": [asdict(c) | {"passed": c.passed} for c in self.comparisons],
                **({"quantization": self.quantization,
                    "quantization_cost": [asdict(c) for c in self.quantization_cost]} if self.quantization else {})}


def greedy(backend: StepBackend, prompts: list[list[int]], steps: int) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=steps, sampling=SamplingParams(), eos_token_ids=())
    return [c.token_ids for c in generate(backend, prompts, config).completions]


def teacher_forced(backend: StepBackend, prompts: list[list[int]], forced: list[list[int]]) -> list[np.ndarray]:
    """Per prompt (steps, V) logits: step 0 from prefill, step s from decoding forced[row][s - 1]."""
    engine = Engine(backend, ride_along=False)
    feeds = [Forced(tokens) for tokens in forced]
    requests = [engine.submit(prompt, GenerationConfig(max_new_tokens=len(feed.tokens)), index=n, sampler=feed)
                for n, (prompt, feed) in enumerate(zip(prompts, feeds))]
    for _ in engine.drive(requests):
        pass
    return [np.stack(feed.logits) for feed in feeds]


class Forced:
    """Stands in for a request's Sampler: feeds a fixed continuation, keeps the logits of each step."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.logits = list(tokens), []

    def next_tokens(self, logits: np.ndarray, history: list[list[int]]) -> np.ndarray:
        self.logits.append(np.array(logits[0]))  # (V,)
        return np.array([self.tokens[len(self.logits) - 1]], dtype=np.int64)


def compare(runtime: str, against: str, ours: list[np.ndarray], theirs: list[np.ndarray],
            divergence: list[int | None], tolerance: Tolerance) -> Comparison:
    diffs = [np.abs(a - b).astype(np.float64) for a, b in zip(ours, theirs)]  # (steps, V) each
    agree = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ours, theirs)])
    return Comparison(runtime=runtime, against=against, max_abs=float(max(d.max() for d in diffs)),
                      mean_abs=float(np.mean([d.mean() for d in diffs])), top1_agreement=float(agree.mean()),
                      first_divergence=divergence,
                      per_step_max_abs=[[float(x) for x in d.max(-1)] for d in diffs], tolerance=tolerance)


def kl_divergence(reference: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(ours)) per row of (steps, V) logits, in float64."""
    log_p, log_q = log_softmax(reference), log_softmax(ours)
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def quantization_cost(runtime: str, against: str, ours: list[np.ndarray], theirs: list[np.ndarray],
                      divergence: list[int | None]) -> QuantizationCost:
    kl = np.concatenate([kl_divergence(b, a) for a, b in zip(ours, theirs)])
    agree = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ours, theirs)])
    return QuantizationCost(runtime=runtime, against=against, top1_agreement=float(agree.mean()),
                            kl_mean=float(kl.mean()), kl_p99=float(np.percentile(kl, 99)), first_divergence=divergence)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def verify_backends(backends: dict, prompts: list[list[int]], steps: int, dtype: str,
                    artifact: str = "", reference=None, float_backend=None,
                    quantization: dict | None = None) -> VerifyReport:
    """Compare every backend with the first one, and (if given) every backend with the reference.

    A backend (or the reference, or float_backend) may be given as a zero-argument function that
    opens it: it is then opened for its own turn only and dropped before the next opens, so a big
    artifact's weights are in memory once at a time (the eager model and the transformers
    reference each hold the whole checkpoint). With `quantization` (the backends run quantized
    weights), the reference and `float_backend` (the same model on float weights) are not held to
    the tolerance but measure the cost.
    """
    names = list(backends)
    baseline = names[0]
    tolerance = QUANTIZED_TOLERANCE if quantization else TOLERANCES[dtype]
    continuation, forced, own = None, {}, {}
    for name in names:
        backend = opened(backends[name])
        if continuation is None:
            continuation = greedy(backend, prompts, steps)
        forced[name] = teacher_forced(backend, prompts, continuation)
        own[name] = continuation if name == baseline else greedy(backend, prompts, steps)
        backend = None
        gc.collect()
    comparisons = []
    for name in names[1:]:
        divergence = [first_divergence(a, b) for a, b in zip(own[name], continuation)]
        comparisons.append(compare(name, baseline, forced[name], forced[baseline], divergence, tolerance))
    floats = {}
    if float_backend is not None:
        float_backend = opened(float_backend)
        floats["float"] = (teacher_forced(float_backend, prompts, continuation), greedy(float_backend, prompts, steps))
        float_backend = None
        gc.collect()
    if reference is not None:
        reference = opened(reference)
        floats["hf"] = (reference.teacher_forced(prompts, continuation), reference.greedy(prompts, steps))
        reference = None
    costs = []
    for against, (ref_logits, ref_greedy) in floats.items():
        for name in names:
            divergence = [first_divergence(a, b) for a, b in zip(own[name], ref_greedy)]
            if quantization:
                costs.append(quantization_cost(name, against, forced[name], ref_logits, divergence))
            else:
                comparisons.append(compare(name, against, forced[name], ref_logits, divergence, tolerance))
    summary = quantization and {key: value for key, value in quantization.items() if key != "tensors"}
    return VerifyReport(artifact=artifact, dtype=dtype, steps=steps, prompts=prompts, continuation=continuation,
                        comparisons=comparisons, quantization=summary or None, quantization_cost=costs)


def opened(backend_or_opener):
    """The backend itself, or what its opener returns (a runtime or the reference, opened now)."""
    is_open = not isinstance(backend_or_opener, type) and (hasattr(backend_or_opener, "step")
                                                          or hasattr(backend_or_opener, "teacher_forced"))
    return backend_or_opener if is_open else backend_or_opener()


class HFReference:
    """transformers' MixtralForCausalLM on the source checkpoint, fp32, eager attention."""

    def __init__(self, checkpoint: str | Path):
        import torch
        from transformers import MixtralForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.torch = torch
        self.model = MixtralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                        attn_implementation="eager").eval()

    def logits(self, ids: list[int]) -> np.ndarray:
        """(n, V) float32 logits of one sequence in one forward pass: row i predicts ids[i + 1]."""
        with self.torch.no_grad():
            return self.model(input_ids=self.torch.tensor([ids])).logits[0].float().numpy()  # (n, V)

    def teacher_forced(self, prompts: list[list[int]], forced: list[list[int]]) -> list[np.ndarray]:
        return [self.logits(prompt + tokens[:-1])[len(prompt) - 1:] for prompt, tokens in zip(prompts, forced)]

    def greedy(self, prompts: list[list[int]], steps: int) -> list[list[int]]:
        out = []
        with self.torch.no_grad():
            for prompt in prompts:
                ids = self.torch.tensor([prompt])
                gen = self.model.generate(input_ids=ids, attention_mask=self.torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=steps, min_new_tokens=steps, eos_token_id=None,
                                          pad_token_id=0)
                out.append(gen[0, len(prompt):].tolist())
        return out


def default_prompts(session_tokenizer, vocab_size: int, window: int | None, count: int) -> list[list[int]]:
    """Short and long prompts (longer than the window, so prefill wraps the ring)."""
    if session_tokenizer is not None:
        texts = [DEMO_TEXTS[i % len(DEMO_TEXTS)] for i in range(count)]
        return [session_tokenizer.encode(t) for t in texts]
    rng = np.random.default_rng(0)
    lengths = [5, (window or 16) * 2 + 3][:count] + [9] * max(0, count - 2)
    return [rng.integers(3, vocab_size, size=n).tolist() for n in lengths]


def verify_artifact(artifact: str | Path, runtimes: list[str], reference: str | None = None,
                    steps: int = 48, checkpoint: str | Path | None = None) -> VerifyReport:
    """Open the artifact on each runtime and compare them (and the reference) on default prompts."""
    from mixtral_export.runtimes.load import RuntimeLoadError, load_step_manifest, open_step_backend, open_tokenizer

    if len(runtimes) < 1 or len(set(runtimes)) != len(runtimes):
        raise RuntimeLoadError(f"--runtimes needs distinct runtime names, got {','.join(runtimes)}")
    if len(runtimes) < 2 and reference is None:
        raise RuntimeLoadError("nothing to compare: give two runtimes or --reference hf")
    manifest = load_step_manifest(artifact)  # each backend checks the files as it opens
    backends = {name: (lambda name=name: open_step_backend(artifact, name, checkpoint=checkpoint)[0])
                for name in runtimes}
    float_backend = None
    if manifest.quantization:
        from mixtral_export.runtimes.load import eager_backend

        float_backend = lambda: eager_backend(manifest, checkpoint, float_weights=True)  # noqa: E731
    tokenizer = open_tokenizer(manifest)
    shapes = manifest.shapes
    prompts = default_prompts(tokenizer, shapes.vocab_size, shapes.attention_window, max(2, shapes.batch))
    if shapes.max_positions is not None:
        steps = min(steps, shapes.max_positions - max(map(len, prompts)))
    ref = None
    if reference == "hf":
        source = Path(checkpoint) if checkpoint else Path(manifest.source or "")
        if not (source / "config.json").exists():
            raise RuntimeLoadError(f"{manifest.folder}: --reference hf needs the source checkpoint ({source})")
        ref = lambda: HFReference(source)  # noqa: E731  opened once every runtime is done and dropped
    # a cache stored narrower than the weights is judged at the cache's precision
    precision = shapes.dtype if shapes.kv_dtype is None or shapes.kv_dtype == "float32" else shapes.kv_dtype
    return verify_backends(backends, prompts, steps, precision, artifact=str(artifact), reference=ref,
                           float_backend=float_backend, quantization=manifest.quantization)


def print_report(report: VerifyReport, console) -> None:
    from rich.table import Table
    from rich.text import Text

    title = f"{report.artifact}: {len(report.prompts)} prompts x {report.steps} greedy steps, {report.dtype}"
    table = Table(title=Text(title))
    for column in ("runtime", "vs", "max|dlogit|", "mean|dlogit|", "top-1", "diverges at", "result"):
        table.add_column(column, no_wrap=True)
    for c in report.comparisons:
        diverged = ",".join("-" if d is None else str(d) for d in c.first_divergence)
        table.add_row(c.runtime, c.against, f"{c.max_abs:.1e}", f"{c.mean_abs:.1e}",
                      f"{c.top1_agreement:.0%}", diverged,
                      Text("pass", "green") if c.passed else Text("FAIL", "red"))
    console.print(table)
    t = QUANTIZED_TOLERANCE if report.quantization else TOLERANCES[report.dtype]
    if t.median_step_abs is not None:
        console.print(f"median step's max|dlogit| <= {t.median_step_abs} (int8-rounded GEMM inputs: see runtimes/verify.py): "
                      + ", ".join(f"{c.runtime} {c.median_step_abs:.1e}" for c in report.comparisons), highlight=False)
    console.print(f"tolerance ({report.dtype}): max|dlogit| <= {t.max_abs if t.max_abs is not None else 'not judged'}, "
                  f"top-1 agreement >= {t.min_top1:.0%}, same greedy tokens: {'required' if t.same_greedy else 'reported'}",
                  highlight=False)
    if report.quantization_cost:
        q = report.quantization
        cost = Table(title=Text(f"what {q['scheme']} weights (block {q['block_size']}) cost against float weights"))
        for column in ("runtime", "vs", "top-1", "KL mean", "KL p99", "diverges at"):
            cost.add_column(column, no_wrap=True)
        for c in report.quantization_cost:
            cost.add_row(c.runtime, c.against, f"{c.top1_agreement:.1%}", f"{c.kl_mean:.2e}", f"{c.kl_p99:.2e}",
                         ",".join("-" if d is None else str(d) for d in c.first_divergence))
        console.print(cost)
        console.print("the quantized runtimes are judged against eager on the same dequantized weights; "
                      "the cost is reported, not judged", highlight=False)
    console.print(Text("all within tolerance", "green") if report.passed else Text("outside tolerance", "red"))
