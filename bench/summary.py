"""Samples -> the report: pooled over rounds, summarised, set against transformers and the bandwidth bound."""
from __future__ import annotations

import os
import statistics

from mixtral_export.bench.models import BenchModel, folder_bytes
from mixtral_export.artifact.contract import StepShapes
from mixtral_export.bench.roofline import decode_bytes, kv_bytes


def spread(values: list[float]) -> dict:
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values)),
            "n": len(values)}


def pooled_bandwidth(probes: list[dict]) -> dict:
    """GB/s per thread count and probe kind, samples of every round pooled."""
    failed = [p["error"] for p in probes if "error" in p]
    if failed:
        return {"error": failed[0]}
    return {"threads": probes[0]["threads"],
            **{threads: {kind: spread([x for p in probes for x in p[threads][kind]]) for kind in ("copy", "read")}
               for threads in ("single_thread", "all_threads")}}


def merge(spec: dict, found: list[dict]) -> dict:
    """One run record from a job's rounds: its samples pooled and summarised, its peak memory the highest."""
    head = {k: spec[k] for k in ("runtime", "label", "routing", "cache_slots", "artifact", "artifact_bytes")}
    head.update(weights=spec.get("weights", "fp32"), block_size=spec.get("block_size", 32))
    head["prefill_chunk"] = spec.get("prefill_chunk")
    head["prefill_chunks"] = spec.get("prefill_chunks")
    head["span_axis"] = spec["runtime"].startswith("ort") and bool((spec.get("shapes") or {}).get("span_axis"))
    head["shapes"] = spec.get("shapes")
    head["kv_dtype"] = (spec.get("shapes") or {}).get("kv_dtype") or "build"
    if "decode_weight_bytes" in spec:  # llama.cpp: counted from its GGUF file; its KV cache type
        head["decode_weight_bytes"] = spec["decode_weight_bytes"]
        head["llama_kv"] = spec.get("llama_kv", "float32")
    failed = [r["error"] for r in found if "error" in r]
    if failed:
        return {**head, "error": failed[0]}
    out = {**head, "rounds": len(found), "load_seconds": spread([r["load_seconds"] for r in found]),
           **{key: max(r[key] for r in found)
              for key in ("peak_rss_bytes", "peak_rss_after_load_bytes", "peak_rss_at_start_bytes")},
           "load_average": [r["load_average"] for r in found]}
    if "compile_seconds" in found[0]:
        out["compile_seconds"] = spread([r["compile_seconds"] for r in found])
    if "attention" in found[0]:
        out["attention"] = found[0]["attention"]
    out["contexts"] = []
    for n, point in enumerate(found[0]["contexts"]):
        pool = {key: [x for r in found for x in r["contexts"][n][key]]
                for key in ("ttft_s", "decode_tokens_per_s", "decode_step_ms")}
        out["contexts"].append({"context": point["context"], "ttft_s": spread(pool["ttft_s"]),
                                "prefill_tokens_per_s": spread([point["context"] / t for t in pool["ttft_s"]]),
                                "decode_tokens_per_s": spread(pool["decode_tokens_per_s"]),
                                "decode_step_ms": spread(pool["decode_step_ms"])})
    return out


def summarise(settings: dict, model: BenchModel, bandwidth: dict, runs: list[dict]) -> dict:
    """The report: every measurement with its bytes per token, bandwidth bound and ratio to transformers."""
    limit = (max(bandwidth[threads][kind]["median"] for threads in ("single_thread", "all_threads")
                 for kind in ("copy", "read")) if "error" not in bandwidth else None)
    reference = next((r for r in runs if r["runtime"] == "transformers" and "contexts" in r), None)
    for run in runs:
        for point in run.get("contexts", []):
            kv = run["cache_slots"] if run["cache_slots"] is not None else point["context"]
            if run.get("span_axis"):  # the ONNX runtime reads the span its last decode step needs
                kv = StepShapes.from_dict(run["shapes"]).tight_span(point["context"] + settings["decode_steps"] + 1)
            weights = (run.get("weights", "fp32"), run.get("block_size", 32))
            if "decode_weight_bytes" in run:
                kv_read = kv_bytes(model.config, kv, run.get("llama_kv", "float32"))
                point["bytes_per_token"] = run["decode_weight_bytes"] + kv_read
            else:
                kv_dtype = (run.get("shapes") or {}).get("kv_dtype")
                point["bytes_per_token"] = decode_bytes(model.config, run["routing"], kv, *weights, kv_dtype=kv_dtype)
            decode = point["decode_tokens_per_s"]["median"]
            bound = limit * 1e9 / point["bytes_per_token"] if limit else None
            point["bound_tokens_per_s"], point["fraction_of_bound"] = bound, decode / bound if bound else None
            ref = next((p["decode_tokens_per_s"]["median"] for p in (reference or {}).get("contexts", [])
                        if p["context"] == point["context"]), None)
            point["vs_transformers"] = decode / ref if ref else None
    return {"model": {"name": model.name, "checkpoint": str(model.checkpoint), "config": model.config.to_dict(),
                      "weights_bytes": folder_bytes(model.checkpoint, (".safetensors",))},
            "settings": settings,
            "machine": {"cpus": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
                        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                        "bandwidth_gbps": bandwidth, "bound_bandwidth_gbps": limit},
            "runs": runs, "gather_over_dense": gather_over_dense(runs), "over_smallest_ring": over_smallest_ring(runs)}


def gather_over_dense(runs: list[dict]) -> list[dict]:
    """Decode speedup of gathered over dense routing, per runtime family, cache size and context."""
    pairs = (("ort-gather", "ort-dense"), ("eager-gather", "eager"))
    out = []
    for gather_name, dense_name in pairs:
        for g in (r for r in runs if r["runtime"] == gather_name and "contexts" in r
                  and r.get("weights", "fp32") == "fp32"):
            d = next((r for r in runs if r["runtime"] == dense_name and r["cache_slots"] == g["cache_slots"]
                      and r.get("prefill_chunks") == g.get("prefill_chunks") and r.get("kv_dtype") == g.get("kv_dtype")
                      and "contexts" in r), None)
            for gp, dp in zip(g["contexts"], d["contexts"] if d else []):
                out.append({"gather": gather_name, "dense": dense_name, "cache_slots": g["cache_slots"],
                            "context": gp["context"],
                            "speedup": gp["decode_tokens_per_s"]["median"] / dp["decode_tokens_per_s"]["median"]})
    return out


def over_smallest_ring(runs: list[dict]) -> list[dict]:
    """Decode tokens/s and TTFT of each ring size over the smallest ring in the run, per runtime
    (label without the ring), precision and context: what a larger --cache-slots costs a short context."""
    out = []
    for run in (r for r in runs if r["cache_slots"] is not None and "contexts" in r):
        same = [r for r in runs if r["cache_slots"] is not None and "contexts" in r and r["runtime"] == run["runtime"]
                and r.get("weights") == run.get("weights") and r.get("block_size") == run.get("block_size")
                and r.get("prefill_chunks") == run.get("prefill_chunks") and r.get("kv_dtype") == run.get("kv_dtype")]
        base = min(same, key=lambda r: r["cache_slots"])
        if base is run:
            continue
        for point, ref in zip(run["contexts"], base["contexts"]):
            out.append({"runtime": run["runtime"], "weights": run.get("weights", "fp32"), "kv_dtype": run.get("kv_dtype"),
                        "cache_slots": run["cache_slots"], "baseline_slots": base["cache_slots"],
                        "context": point["context"],
                        "decode_ratio": point["decode_tokens_per_s"]["median"] / ref["decode_tokens_per_s"]["median"],
                        "ttft_ratio": point["ttft_s"]["median"] / ref["ttft_s"]["median"]})
    return out
