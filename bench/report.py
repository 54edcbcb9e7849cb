"""A benchmark report (bench/run.py's dict) as a rich table (or Markdown) and a decode-speed plot."""
from __future__ import annotations

import io
from pathlib import Path

from mixtral_export.destinations import WRITER, png_is_ours, write_file
from mixtral_export.errors import UserError

GIB = 1 << 30


class PlotError(UserError, RuntimeError):
    """The plot cannot be drawn here; one line."""


def rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (1 << 20):.0f} MiB"


def ratio(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if percent else f"{value:.2f}x"


def table(report: dict, markdown: bool = False):
    """One row per runtime and context length."""
    from rich import box
    from rich.table import Table

    settings, bandwidth = report["settings"], report["machine"]["bandwidth_gbps"]
    title = (f"{report['model']['name']}: batch 1, {settings['decode_steps']} decode steps x {settings['repeats']} "
             f"repeats, {settings['threads']} threads")
    if "error" not in bandwidth:
        every, bound = bandwidth["all_threads"], report["machine"]["bound_bandwidth_gbps"]
        title += (f", bound at {bound:.1f} GB/s (copy {every['copy']['median']:.1f}, "
                  f"read {every['read']['median']:.1f} GB/s on {bandwidth['threads']} threads)")
    grid = Table(title=title, box=box.MARKDOWN if markdown else box.SIMPLE_HEAD)
    for column in ("runtime", "S", "context", "TTFT ms", "prefill tok/s", "decode tok/s (min-max)",
                   "vs transformers", "read/token", "of bound", "peak RSS", "on disk"):
        grid.add_column(column, justify="left" if column == "runtime" else "right", no_wrap=True)
    for run in report["runs"]:
        if "error" in run:
            grid.add_row(run["label"], str(run["cache_slots"] or "-"), "-", "-", "-", f"error: {run['error']}",
                         "-", "-", "-", "-", "-")
            continue
        for point in run["contexts"]:
            decode = point["decode_tokens_per_s"]
            grid.add_row(run["label"], str(run["cache_slots"] or "-"), str(point["context"]),
                         f"{1e3 * point['ttft_s']['median']:,.1f}", rate(point["prefill_tokens_per_s"]["median"]),
                         f"{rate(decode['median'])} ({rate(decode['min'])}-{rate(decode['max'])})",
                         ratio(point["vs_transformers"]), size(point["bytes_per_token"]),
                         ratio(point["fraction_of_bound"], percent=True),
                         size(run["peak_rss_bytes"]), size(run["artifact_bytes"]))
    return grid


def speedups(report: dict, markdown: bool = False):
    from rich import box
    from rich.table import Table

    grid = Table(title="gathered over dense routing (decode tok/s)", box=box.MARKDOWN if markdown else box.SIMPLE_HEAD)
    for column in ("gather", "dense", "S", "context", "speedup"):
        grid.add_column(column, no_wrap=True)
    for row in report["gather_over_dense"]:
        grid.add_row(row["gather"], row["dense"], str(row["cache_slots"]), str(row["context"]), ratio(row["speedup"]))
    return grid


def ring_ratios(report: dict, markdown: bool = False):
    """Each ring size against the smallest one in the run: decode tok/s and TTFT ratios."""
    from rich import box
    from rich.table import Table

    grid = Table(title="larger rings over the smallest (same runtime, precision and context)",
                 box=box.MARKDOWN if markdown else box.SIMPLE_HEAD)
    for column in ("runtime", "weights", "KV", "S", "over S", "context", "decode", "TTFT"):
        grid.add_column(column, no_wrap=True)
    for row in report["over_smallest_ring"]:
        grid.add_row(row["runtime"], row["weights"], row.get("kv_dtype") or "build", str(row["cache_slots"]),
                     str(row["baseline_slots"]),
                     str(row["context"]), ratio(row["decode_ratio"]), ratio(row["ttft_ratio"]))
    return grid


def plot(report: dict, path: Path) -> Path:
    """Decode tokens/s against context length, one line per runtime (and cache size), bounds dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install 'mixtral-export[plot]'") from None
    figure, axes = plt.subplots(figsize=(8, 5))
    bounds = {}
    for run in report["runs"]:
        if "error" in run:
            continue
        x = [p["context"] for p in run["contexts"]]
        y = [p["decode_tokens_per_s"]["median"] for p in run["contexts"]]
        low = [m - p["decode_tokens_per_s"]["min"] for m, p in zip(y, run["contexts"])]
        high = [p["decode_tokens_per_s"]["max"] - m for m, p in zip(y, run["contexts"])]
        axes.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=run["label"])
        if run["cache_slots"] is not None and run["contexts"][0]["bound_tokens_per_s"]:
            bounds[(run["routing"], run["cache_slots"])] = run["contexts"][0]["bound_tokens_per_s"]
    for (routing, slots), bound in sorted(bounds.items()):
        axes.axhline(bound, linestyle="--", linewidth=1, color="gray")
        axes.text(0.01, bound, f"bandwidth bound, {routing} S={slots}", transform=axes.get_yaxis_transform(),
                  fontsize=8, color="gray", va="bottom")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("context length (prompt tokens)")
    axes.set_ylabel("decode tokens/s (median, min-max)")
    bandwidth = report["machine"]["bound_bandwidth_gbps"]
    axes.set_title(f"{report['model']['name']}: decode speed, batch 1"
                   + (f", bound at {bandwidth:.1f} GB/s" if bandwidth else ""))
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, metadata={"Software": f"{WRITER} bench"})
    plt.close(figure)
    return write_file(path, buffer.getvalue(), png_is_ours)
