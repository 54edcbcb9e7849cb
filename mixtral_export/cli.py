"""The `mixtral-export` command line: build, run, check and inspect artifacts.

Every bad input ends as one line on stderr and a non-zero exit; heavy modules (torch, onnx) are
imported by the commands that need them, so `generate --runtime ort` starts without torch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a Mixtral checkpoint into static-shape graphs and prove they match it.")
out = Console()
err = Console(stderr=True)


class UsageError(ValueError):
    """A flag combination that makes no sense."""


def main() -> None:
    from mixtral_export.errors import user_errors

    try:
        app()
    except (UsageError, *user_errors()) as error:
        err.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as error:  # unwritable folders, missing files named by the user
        where = f"{error.filename}: " if error.filename else ""
        err.print(f"[red]error:[/] {where}{error.strerror or error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=err, transient=True)


@app.command()
def tiny(out_dir: Path = typer.Argument(..., help="Folder to write the checkpoint into"),
         seed: int = typer.Option(0, help="Seed of the random weights"),
         shard_bytes: Optional[int] = typer.Option(None, help="Split safetensors into shards of this size")):
    """Write the embedded tiny Mixtral as a Hugging Face checkpoint (config, safetensors, tokenizer)."""
    from mixtral_export.tiny import TINY_CONFIG, write_tiny

    folder = write_tiny(out_dir, seed=seed, max_shard_bytes=shard_bytes)
    files = ", ".join(sorted(p.name for p in folder.iterdir()))
    c = TINY_CONFIG
    out.print(f"wrote tiny Mixtral to {folder}: {c.num_hidden_layers} layers, {c.num_local_experts} experts "
              f"(top-{c.num_experts_per_tok}), hidden {c.hidden_size}, vocab {c.vocab_size}, "
              f"sliding window {c.sliding_window} [{files}]", highlight=False)


@app.command()
def export(checkpoint: Path = typer.Argument(..., help="Hugging Face Mixtral folder"),
           output: Path = typer.Option(..., "-o", "--output", help="Artifact folder to create"),
           dtype: Optional[str] = typer.Option(None, help="float32 | float16 | bfloat16 (default: the checkpoint's)"),
           batch: int = typer.Option(1, help="Rows per step"),
           prefill_chunk: int = typer.Option(16, help="Tokens per prefill step"),
           cache_slots: Optional[int] = typer.Option(None, help="Ring slots per layer (default: the sliding window)"),
           slide: bool = typer.Option(False, help="Let a ring smaller than the window (or no window) slide"),
           opset: int = typer.Option(18, help="ONNX opset (>= 18)"),
           routing: str = typer.Option("dense", help="dense: every expert on every token")):
    """Export the prefill/decode step graph to ONNX with a manifest."""
    from graphs.onnx_export import export_onnx

    if routing != "dense":
        raise UsageError(f"--routing {routing!r} is not available (dense)")
    with err.status("exporting ONNX (loading weights, tracing, checking)...") as status:
        artifact = export_onnx(checkpoint, output, dtype=dtype, batch=batch, prefill_chunk=prefill_chunk,
                               cache_slots=cache_slots, slide=slide, opset=opset,
                               progress=lambda stage: status.update(f"exporting ONNX: {stage}..."))
    _describe(artifact)


@app.command()
def inspect(artifact: Path = typer.Argument(..., help="Artifact folder written by export")):
    """Show an artifact's config, shapes, files and I/O contract (and check its files)."""
    _describe(artifact)


def _describe(artifact: Path) -> None:
    from graphs.manifest import load_manifest

    manifest = load_manifest(artifact)
    c, s = manifest.config, manifest.shapes
    out.print(f"[bold]{artifact}[/]  ({manifest.kind}, {s.dtype}, opset {manifest.opset})", highlight=False)
    out.print(f"  model   {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads / "
              f"{c.num_key_value_heads} kv heads x {c.head_dim}, {c.num_local_experts} experts top-"
              f"{c.num_experts_per_tok}, vocab {c.vocab_size}, sliding window {c.sliding_window}", highlight=False)
    window = s.attention_window if s.attention_window is not None else f"none (at most {s.cache_slots} positions)"
    out.print(f"  shapes  batch {s.batch}, prefill chunk {s.prefill_chunk}, decode chunk 1, cache slots "
              f"{s.cache_slots}, attention window {window}", highlight=False)
    for name, info in sorted(manifest.files.items()):
        out.print(f"  file    {name}  {info.size:,} bytes  sha256 {info.sha256[:16]}...", highlight=False)


def _token_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--input-ids must be comma-separated integers, got {text!r}") from None


@app.command()
def generate(artifact: Path = typer.Argument(..., help="Artifact folder written by export"),
             runtime: str = typer.Option("ort", help="eager | ort"),
             provider: str = typer.Option("cpu", help="ORT execution provider: cpu | cuda"),
             prompt: list[str] = typer.Option([], help="Prompt text (repeat for a batch)"),
             input_ids: Optional[str] = typer.Option(None, help="Prompt as token ids: 1,2,3"),
             chat: bool = typer.Option(False, help="Wrap each prompt as a Mixtral-Instruct user turn"),
             max_new_tokens: int = typer.Option(32, min=1),
             temperature: float = typer.Option(0.0, help="0 = greedy"),
             top_k: int = typer.Option(0, help="0 = off"),
             top_p: float = typer.Option(1.0, help="1 = off"),
             repetition_penalty: float = typer.Option(1.0, help="1 = off"),
             seed: Optional[int] = typer.Option(None),
             stop: list[str] = typer.Option([], help="Stop string (repeatable)"),
             checkpoint: Optional[Path] = typer.Option(None, help="Source checkpoint for --runtime eager "
                                                        "(default: the one recorded at export)"),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text")):
    """Generate text from an artifact on a runtime, streaming tokens as they come."""
    from runtimes.session import Session

    if bool(prompt) == bool(input_ids):
        raise UsageError("give --prompt TEXT (repeatable) or --input-ids 1,2,3")
    session = Session.open(artifact, runtime=runtime, provider=provider, checkpoint=checkpoint)
    if input_ids:
        if chat:
            raise UsageError("--chat needs --prompt text, not --input-ids")
        prompts = [_token_ids(input_ids)]
    else:
        prompts = [session.encode_chat([{"role": "user", "content": p}]) if chat else session.encode(p)
                   for p in prompt]
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, seed=seed, stop_strings=tuple(stop))
    if as_json or len(prompts) > 1:
        result = session.generate_ids(prompts, **options)
        if as_json:
            print(json.dumps(result.to_json(runtime=runtime), indent=2))
        else:
            for n, completion in enumerate(result.completions):
                out.print(f"[bold]#{n}[/] {completion.text}", highlight=False)
        return
    for delta in session.stream_ids(prompts[0], **options):
        out.print(delta, end="", highlight=False, soft_wrap=True)
    out.print()
    stats = session.last_result
    err.print(f"{runtime}: prefill {stats.prefill_tokens} tokens in {stats.prefill_seconds * 1e3:.1f} ms, "
              f"{len(stats.completions[0].token_ids)} new tokens at {stats.decode_tokens_per_second:.1f} tok/s "
              f"({stats.completions[0].finish_reason})", highlight=False)


@app.command()
def verify(artifact: Path = typer.Argument(..., help="Artifact folder written by export"),
           runtimes: str = typer.Option("eager,ort", help="Comma-separated runtimes; the first is the baseline"),
           reference: Optional[str] = typer.Option(None, help="hf: also compare with transformers"),
           steps: int = typer.Option(48, min=1, help="Greedy decode steps per prompt"),
           checkpoint: Optional[Path] = typer.Option(None, help="Source checkpoint for eager/hf "
                                                      "(default: the one recorded at export)"),
           as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
           report: Optional[Path] = typer.Option(None, help="Also write the JSON report to this file")):
    """Compare runtimes (and the reference) on the same prompts; the exit code says pass or fail."""
    from runtimes.verify import print_report, verify_artifact

    names = [n.strip() for n in runtimes.split(",") if n.strip()]
    if reference not in (None, "hf"):
        raise UsageError(f"--reference {reference!r}: only 'hf' is known")
    with err.status("verifying..."):
        result = verify_artifact(artifact, names, reference=reference, steps=steps, checkpoint=checkpoint)
    if report:
        report.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_report(result, out)
    raise typer.Exit(0 if result.passed else 1)


@app.command()
def demo(out_dir: Path = typer.Argument(Path("out/demo"), help="Folder for the checkpoint and artifact")):
    """The main job on the tiny model: build it, export ONNX, generate on ORT, verify vs eager and HF."""
    checkpoint, artifact = out_dir / "tiny-checkpoint", out_dir / "tiny-onnx"
    out.rule("1. tiny checkpoint")
    tiny(checkpoint, seed=0, shard_bytes=None)
    out.rule("2. export ONNX (fp32, batch 2, prefill chunk 8, 32-slot ring)")
    export(checkpoint, artifact, dtype=None, batch=2, prefill_chunk=8, cache_slots=None, slide=False, opset=18,
           routing="dense")
    out.rule("3. generate on ONNX Runtime (greedy, 48 tokens: the ring wraps)")
    generate(artifact, runtime="ort", provider="cpu", prompt=["The quick brown fox"], input_ids=None, chat=False,
             max_new_tokens=48, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None, stop=[],
             checkpoint=None, as_json=False)
    out.rule("4. verify ORT against eager PyTorch and transformers")
    verify(artifact, runtimes="eager,ort", reference="hf", steps=48, checkpoint=None, as_json=False,
           report=out_dir / "verify.json")
