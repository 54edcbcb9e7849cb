"""GPU parity checks and a decode benchmark on the tiny model, in one run; writes a JSON summary.

    python3 scripts/gpu_check.py out/gpu_check.json

Checks, each against eager PyTorch fp32 on the CPU over a prefill + decode run that wraps the
ring twice: eager CUDA fp32 (max |logit diff| <= 1e-4), eager CUDA bf16 (top-1 agreement),
torch.compile with mode="reduce-overhead" (CUDA-graph decode; no recompiles, no cudagraph
skips), AOTInductor compiled for CUDA, ONNX Runtime's CUDA provider (when onnxruntime-gpu and
the ONNX exporter import), transformers on CUDA (when it imports), and `pytest -m gpu` (when
tests carry that mark). Then tokens/s of greedy decode, eager vs compiled vs AOTI, on the GPU.

Needs only what the project itself needs (torch with CUDA, numpy, safetensors, sentencepiece);
nothing is downloaded. On a machine without a CUDA GPU it says so and exits 0. Exit status 1
when any check that ran failed.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from mixtral_export.destinations import write_report  # noqa: E402

TOL = 1e-4
MIN_BF16_AGREEMENT = 0.9
PREFILL, SLOTS, DECODE_STEPS = 16, 32, 35  # decode steps per prefill chunk: positions reach 102


class Skip(Exception):
    """A check this machine cannot run (a missing optional package); not a failure."""


def parity(reference, other) -> dict:
    """The shared lock-step comparator (runtimes/step_parity.py): worst |logit diff|, top-1 agreement."""
    from mixtral_export.runtimes.step_parity import lockstep

    (result,) = lockstep(reference, [other], decode_steps=DECODE_STEPS)
    return {"max_abs_diff": result.max_abs, "top1_agreement": result.top1_agreement,
            "last_position": result.last_position}


def run_checks(folder: Path, scratch: Path, device: str) -> tuple[dict, dict]:
    import numpy as np
    import torch

    from mixtral_export.artifact.contract import StepShapes
    from mixtral_export.checkpoint import load_model
    from mixtral_export.artifact.config import MixtralConfig
    from mixtral_export.runtimes.eager import EagerBackend

    config = MixtralConfig.from_json(folder)
    shapes = StepShapes.for_config(config, batch=2, prefill_chunk=PREFILL, cache_slots=SLOTS)

    def eager(on: str, dtype: str = "float32") -> EagerBackend:
        model = load_model(folder, dtype=dtype, attention_window=shapes.attention_window)
        return EagerBackend(model, StepShapes.from_dict({**shapes.to_dict(), "dtype": dtype}), on)

    cpu = eager("cpu")
    backends: dict = {}

    def fp32_vs_cpu(backend) -> dict:
        result = parity(cpu, backend)
        result["ok"] = result["max_abs_diff"] <= TOL and result["top1_agreement"] == 1.0
        return result

    def eager_fp32() -> dict:
        backends["eager"] = eager(device)
        return fp32_vs_cpu(backends["eager"])

    def eager_bf16() -> dict:
        result = parity(cpu, eager(device, "bfloat16"))
        return {**result, "ok": result["top1_agreement"] >= MIN_BF16_AGREEMENT}

    def compiled() -> dict:
        from torch._dynamo.utils import counters

        from mixtral_export.runtimes.compiled import CompiledBackend

        skips_before = counters["inductor"]["cudagraph_skips"]
        backend = CompiledBackend(load_model(folder, attention_window=shapes.attention_window), shapes, device)
        backend.warmup()
        result = fp32_vs_cpu(backend)
        skips = counters["inductor"]["cudagraph_skips"] - skips_before
        result.update(mode=backend.mode, compile_count=backend.compile_count, cudagraph_skips=skips,
                      compile_seconds=backend.compile_seconds)
        result["ok"] = result["ok"] and backend.compile_count == 2 and skips == 0
        backends["compiled"] = backend
        return result

    def aoti() -> dict:
        from mixtral_export.graphs.aoti_export import export_aoti
        from mixtral_export.runtimes.aoti import AotiBackend

        start = time.perf_counter()
        artifact = export_aoti(folder, scratch / "aoti", batch=2, prefill_chunk=PREFILL, cache_slots=SLOTS,
                               device=device)
        backends["aoti"] = AotiBackend(artifact, device)
        return {**fp32_vs_cpu(backends["aoti"]), "build_seconds": time.perf_counter() - start}

    def ort_cuda() -> dict:
        try:
            import onnxruntime
            from mixtral_export.graphs.onnx_export import export_onnx
            from mixtral_export.runtimes.ort import OrtBackend
        except ImportError as err:
            raise Skip(f"not importable: {err.name}")
        if device == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise Skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        artifact = export_onnx(folder, scratch / "onnx", batch=2, prefill_chunk=PREFILL, cache_slots=SLOTS)
        return fp32_vs_cpu(OrtBackend(artifact, provider=device))

    def hf_cuda() -> dict:
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise Skip("transformers is not importable")
        ref = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").to(device).eval()
        ids = torch.randint(3, config.vocab_size, (1, 3 * PREFILL), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = ref(input_ids=ids.to(device)).logits.float().cpu().numpy()[0]  # (N, V)
        ours = eager(device)  # batch 2 by the shapes: both rows get the prompt
        got = np.concatenate([ours.step(np.repeat(ids[:, s:s + PREFILL].numpy(), 2, 0),
                                        np.tile(np.arange(s, s + PREFILL), (2, 1)))[0]
                              for s in range(0, ids.shape[1], PREFILL)])
        worst = float(np.abs(got - want).max())
        return {"max_abs_diff": worst, "ok": worst <= TOL}

    def pytest_gpu() -> dict:
        marked = [p.name for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text()]
        if not marked:
            raise Skip("no tests are marked gpu")
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests"], cwd=REPO,
                              capture_output=True, text=True)
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        passed, failed = (re.search(rf"(\d+) {word}", summary) for word in ("passed", "failed"))
        if done.returncode == 5 or (done.returncode == 0 and not passed):  # nothing ran, or every test skipped
            skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
            raise Skip(f"no gpu test ran ({summary or 'pytest exit 5'}): {'; '.join(skips)[:400]}")
        return {"files": marked, "returncode": done.returncode, "summary": summary, "tail": done.stdout[-1500:],
                "passed": int(passed.group(1)) if passed else 0, "failed": int(failed.group(1)) if failed else 0,
                "ok": done.returncode == 0}

    checks = {}
    for name, check in (("eager_cuda_fp32", eager_fp32), ("eager_cuda_bf16", eager_bf16),
                        ("compiled_reduce_overhead", compiled), ("aoti_cuda", aoti), ("ort_cuda", ort_cuda),
                        ("hf_cuda", hf_cuda), ("pytest_gpu", pytest_gpu)):
        print(f"... {name}", flush=True)
        try:
            checks[name] = check()
        except Skip as why:
            checks[name] = {"skipped": str(why)}
        except Exception as err:  # one broken check must not hide the others
            checks[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500],
                            "traceback": traceback.format_exc()[-2000:]}
        print(f"    {json.dumps(checks[name], default=str)[:300]}", flush=True)
    return checks, backends


def benchmark(backends: dict, steps: int = 200) -> dict:
    from mixtral_export.bench.compiled_vs_eager import decode_rate

    rates = {f"{name}_tokens_per_s": decode_rate(backend, steps) for name, backend in backends.items()}
    if "eager_tokens_per_s" in rates and "compiled_tokens_per_s" in rates:
        rates["compiled_over_eager"] = rates["compiled_tokens_per_s"] / rates["eager_tokens_per_s"]
    return {"batch": 2, "steps": steps, **rates}


def main() -> int:
    args = sys.argv[1:]
    dry_run = "--dry-run-on-cpu" in args  # the same checks on the CPU, to develop this script without a GPU
    paths = [a for a in args if a != "--dry-run-on-cpu"]
    if len(paths) != 1:
        print("usage: python3 scripts/gpu_check.py [--dry-run-on-cpu] SUMMARY.json", file=sys.stderr)
        return 2
    out = Path(paths[0])
    import torch

    if not dry_run and not torch.cuda.is_available():
        print("no CUDA GPU; nothing run")
        return 0
    device = "cpu" if dry_run else "cuda"
    from mixtral_export.tiny import TINY_CONFIG, random_weights, write_checkpoint

    summary = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "none (dry run on CPU)",
               "torch": torch.__version__, "cuda": torch.version.cuda}
    with tempfile.TemporaryDirectory() as scratch:
        folder = write_checkpoint(Path(scratch) / "tiny", TINY_CONFIG, random_weights(TINY_CONFIG, 0))
        summary["checks"], backends = run_checks(folder, Path(scratch), device)
        summary["benchmark"] = benchmark(backends)
    failed = [name for name, check in summary["checks"].items() if check.get("ok") is False]
    summary["failed"] = failed
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, json.loads(json.dumps(summary, default=str)), "gpu_check")
    print(f"wrote {out}: {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
