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
from rich.text import Text

from mixtral_export.destinations import check_file, png_is_ours, report_is_ours, write_report
from mixtral_export.interruption import Interrupted, interrupted
from mixtral_export.errors import UsageError, UserError, missing_extra

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Turn a Mixtral checkpoint into static-shape graphs and prove they match it.")


def _stdout() -> Console:
    """stdout, with no markup: paths, errors and generated text print as they are ("[/]" included).
    A pipe or a file (a CI log) gets whole rows, not tables cut at 80 columns (`paddi…`)."""
    console = Console(markup=False)
    if not console.is_terminal:
        console.width = 10_000
    return console


out = _stdout()
err = Console(stderr=True, markup=False)


def _error_line(message: str) -> Text:
    return Text.assemble(("error:", "red"), " ", message)


def run() -> None:
    """Run the command line; every error a user can cause ends as one line and exit code 2.

    Called by mixtral_export/entry.py, which turns Ctrl-C into one line and exit code 130.
    """
    # typer raises the errors of the click it runs on: click's own, or the copy newer typers carry
    clicks = sys.modules[typer.BadParameter.__module__]
    try:
        code = app(prog_name="mixtral-export", standalone_mode=False)  # click's errors come here unprinted
    except getattr(clicks, "NoArgsIsHelpError", ()) as error:  # a bare `mixtral-export`: its help
        error.show()
        sys.exit(error.exit_code)
    except clicks.UsageError as error:  # not the "Usage:, Try ..., Error:" block: one line
        fail(_usage_line(error))
    except UserError as error:
        fail(str(error))
    except ModuleNotFoundError as error:  # an optional extra that is not installed
        command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), "this command")
        if (line := missing_extra(error, f"mixtral-export {command}")) is None:
            raise
        fail(line)
    except OSError as error:  # unwritable folders, a full disk, missing files named by the user
        where = f"{error.filename}: " if error.filename else ""
        fail(f"{where}{error.strerror or error}")
    sys.exit(code or 0)  # a command's typer.Exit(n) comes back as n


def _usage_line(error) -> str:
    """click's message ("No such option: --frobnicate") as our line, with where help is."""
    message = error.format_message().rstrip(".")
    where = f" ({error.ctx.command_path} --help)" if error.ctx is not None else ""
    return f"{message[:1].lower()}{message[1:]}{where}"


def fail(message: str) -> None:
    if interrupted():  # an import cut short by Ctrl-C fails in odd ways: report the interruption
        raise Interrupted()
    err.print(_error_line(" ".join(message.split("\n"))), highlight=False, soft_wrap=True)
    sys.exit(2)


def _progress(eta: bool = False):
    """A progress bar on stderr, gone when done; with eta, the time left estimated from the rate so far."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    remaining = (TextColumn("left"), TimeRemainingColumn()) if eta else ()
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), *remaining, console=err, transient=True)


@app.command()
def tiny(out_dir: Path = typer.Argument(..., help="Folder to write the checkpoint into", metavar="OUT_DIR"),
         seed: int = typer.Option(0, help="Seed of the random weights", metavar="N"),
         shard_bytes: Optional[int] = typer.Option(None, help="Split safetensors into shards of this size", metavar="N"),
         head: str = typer.Option("causal-lm", help="causal-lm | model | sequence-classification | "
                                  "token-classification | question-answering: the transformers class it is saved as",
                                  metavar="KIND")):
    """Write the embedded tiny Mixtral as a Hugging Face checkpoint (config, safetensors, tokenizer)."""
    from mixtral_export.tiny import TINY_CONFIG, write_tiny

    folder = write_tiny(out_dir, seed=seed, max_shard_bytes=shard_bytes, head=head)
    files = ", ".join(sorted(p.name for p in folder.iterdir()))
    c = TINY_CONFIG
    out.print(f"wrote tiny Mixtral ({head}) to {folder}: "
              f"{c.num_hidden_layers} layers, {c.num_local_experts} experts "
              f"(top-{c.num_experts_per_tok}), hidden {c.hidden_size}, vocab {c.vocab_size}, "
              f"sliding window {c.sliding_window} [{files}]", highlight=False)


@app.command()
def export(checkpoint: Path = typer.Argument(..., help="Hugging Face Mixtral folder", metavar="CHECKPOINT"),
           output: Path = typer.Option(..., "-o", "--output", help="Artifact folder to create", metavar="PATH"),
           dtype: Optional[str] = typer.Option(None, help="float32 | float16 | bfloat16 (default: the checkpoint's)", metavar="TEXT"),
           batch: int = typer.Option(1, min=1, help="Rows per step", metavar="N"),
           prefill_chunk: str = typer.Option("16", help="Tokens per prefill step; a comma list (16,128) serves "
                                                        "each, a prompt's steps take the shortest that holds it",
                                             metavar="N[,N...]"),
           cache_slots: Optional[int] = typer.Option(None, min=1, help="Ring slots per layer (default: the sliding window)", metavar="N"),
           slide: bool = typer.Option(False, help="Let a ring smaller than the window (or no window) slide"),
           opset: int = typer.Option(18, min=18, help="ONNX opset", metavar="N"),
           routing: Optional[str] = typer.Option(None, help="dense: every expert on every token; gather: only each "
                                                     "token's top-k experts (com.microsoft.MoE on ONNX, silu models); "
                                                     "default: gather with int8/int4 weights, else dense", metavar="TEXT"),
           weights: str = typer.Option("float", help="float: the dtype's; int8 | int4: block-wise weight-only "
                                                     "(experts, attention, lm_head; always gathered)", metavar="TEXT"),
           block_size: Optional[int] = typer.Option(None, min=1, help="int8/int4: weights per quantization block (32 | 64 | "
                                                               "128; default: the scheme's, docs/quantization.md)", metavar="N"),
           kv_dtype: Optional[str] = typer.Option(None, help="The KV cache's type: float32 | float16 | int8 (codes "
                                                  "and a float32 scale per slot and kv head); default: --dtype's. "
                                                  "ONNX Runtime only", metavar="TEXT"),
           format: str = typer.Option("onnx", "--format", help="onnx | aoti (an AOTInductor .pt2 package)", metavar="TEXT"),
           device: str = typer.Option("cpu", help="aoti: the device to compile for (cpu | cuda)", metavar="TEXT"),
           head: Optional[str] = typer.Option(None, help="causal-lm | model | sequence-classification | "
                                              "token-classification | question-answering (default: config.json's)", metavar="TEXT"),
           seq_len: int = typer.Option(128, min=1, help="Head graphs: tokens per row (the static T)", metavar="N"),
           stages: Optional[int] = typer.Option(None, min=1, help="Split the step into N pipeline stages, one folder "
                                                "each (default split: balanced weight bytes)", metavar="N"),
           stage_layers: Optional[str] = typer.Option(None, help="Each stage's layer count, e.g. 10,12,10 "
                                                      "(adds up to the model's layers)", metavar="N[,N...]")):
    """Export the prefill/decode step graph (ONNX, or an AOTInductor package) with a manifest; a checkpoint
    with another head (or --head) exports a static (batch, seq-len) head graph instead."""
    if routing not in (None, "dense", "gather"):
        raise UsageError(f"--routing {routing!r} is not available (dense, gather)")
    if not _checkpoint_head(checkpoint, head).generates:  # a head graph, not the step graph
        if format != "onnx":
            raise UsageError(f"--format {format!r}: head graphs export to onnx only")
        from mixtral_export.graphs.onnx_heads import export_head_onnx

        with err.status("exporting the head graph...") as status:
            artifact = export_head_onnx(checkpoint, output, head=head, dtype=dtype, batch=batch, seq_len=seq_len,
                                        opset=opset, routing=routing or "dense",
                                        progress=lambda stage: status.update(f"exporting onnx: {stage}..."))
        _describe(artifact)
        return
    from mixtral_export.artifact.contract import KV_DTYPES

    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise UsageError(f"--kv-dtype {kv_dtype!r} is not supported (one of {', '.join(KV_DTYPES)})")
    staged = stages is not None or stage_layers is not None
    if staged and format != "onnx":
        raise UsageError(f"--stages / --stage-layers: pipeline stages export to onnx only, not {format}")
    if staged and kv_dtype is not None:
        raise UsageError(f"--kv-dtype {kv_dtype}: pipeline stages keep the cache in the build's dtype; "
                         f"leave out --kv-dtype or --stages")
    if format == "onnx":
        from mixtral_export.graphs.onnx_export import export_onnx as build
        options = dict(opset=opset, weights=weights, block_size=block_size, kv_dtype=kv_dtype, stages=stages,
                       stage_layers=_int_list(stage_layers, "--stage-layers"))
    elif format == "aoti":
        if kv_dtype is not None:
            raise UsageError(f"--kv-dtype {kv_dtype}: a cache type of its own is exported for ONNX Runtime only "
                             f"(--format onnx)")
        if weights != "float":
            raise UsageError(f"--weights {weights}: quantized weights are exported for ONNX Runtime only (--format onnx)")
        from mixtral_export.graphs.aoti_export import export_aoti as build
        options = dict(device=device)
        routing = routing or "dense"
    else:
        raise UsageError(f"--format {format!r}: one of onnx, aoti")
    chunks = _int_list(prefill_chunk, "--prefill-chunk")
    with err.status(f"exporting {format} (loading weights, tracing, compiling, checking)...") as status:
        artifact = build(checkpoint, output, dtype=dtype, batch=batch, prefill_chunk=chunks,
                         cache_slots=cache_slots, slide=slide, routing=routing,
                         progress=lambda stage: status.update(f"exporting {format}: {stage}..."), **options)
    _describe(artifact)


def _checkpoint_head(checkpoint: Path, head: Optional[str]):
    """The Head an export of `checkpoint` builds: --head, else the one config.json and the tensors name."""
    from mixtral_export.checkpoint import checkpoint_tensors
    from mixtral_export.head import read_head
    from mixtral_export.safetensors_file import CheckpointError

    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: not a checkpoint folder")
    tensors = checkpoint_tensors(checkpoint)
    return read_head(checkpoint, {key: entry.shape for key, entry in tensors.items()}, head)


@app.command("build-engine")
def build_engine_command(artifact: Path = typer.Argument(..., help="ONNX artifact folder written by export", metavar="ARTIFACT"),
                         precision: str = typer.Option("fp32", help="fp32 | fp16 | bf16 (a float16/bfloat16 export "
                                                                    "builds only as itself)", metavar="TEXT"),
                         workspace: float = typer.Option(4.0, "--workspace", help="Builder workspace in GiB", metavar="X"),
                         timing_cache: Optional[Path] = typer.Option(None, "--timing-cache",
                                                                     help="Timing cache file to reuse and update", metavar="PATH")):
    """Build a TensorRT 10 engine (engine.plan) into an ONNX artifact, for this GPU and TensorRT version."""
    from mixtral_export.artifact.manifest import load_manifest
    from mixtral_export.graphs.trt_engine import build_engine

    with err.status("building the TensorRT engine...") as status:
        engine = build_engine(artifact, precision=precision, workspace_gib=workspace, timing_cache=timing_cache,
                              progress=lambda stage: status.update(f"TensorRT: {stage}..."))
    record = load_manifest(artifact, verify_files=False).engines[engine.name]
    out.print(f"wrote {engine}: {record['precision']}, TensorRT {record['tensorrt']}, {record['gpu']} "
              f"(compute capability {record['compute_capability']})", highlight=False)


@app.command("check-trt")
def check_trt(artifact: Path = typer.Argument(..., help="Artifact folder (or a .onnx file)", metavar="ARTIFACT")):
    """Check, without TensorRT, that the graph uses only what TensorRT 10's ONNX parser supports."""
    from mixtral_export.graphs.trt_compat import check_trt_compat

    report = check_trt_compat(artifact)
    for line in report.lines():
        out.print(line, highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def inspect(artifact: Path = typer.Argument(..., help="Artifact folder written by export", metavar="ARTIFACT")):
    """Show an artifact's config, shapes, files and I/O contract (and check its files)."""
    from mixtral_export.artifact.manifest import load_manifest

    _describe(artifact)
    out.print(_io_table(load_manifest(artifact, verify_files=False).io))


def _io_table(io: dict):
    """The graph's inputs and outputs as the manifest records them: name, dtype, shape per chunk
    length T (a step graph) or the one static shape (a head graph); a layer's run of same-shaped
    names (cache_k.0 .. cache_k.31) is one row."""
    from rich.table import Table

    table = Table(title="I/O contract", title_justify="left")
    for column in ("", "name", "dtype", "shape"):
        table.add_column(column, no_wrap=True)
    for side in ("inputs", "outputs"):
        rows: list[list] = []  # [name, first layer, last layer, dtype, shape]
        for entry in io[side]:
            shapes = [entry["shape"]] if "shape" in entry else list(entry["shapes"].values())
            shape = " | ".join(dict.fromkeys(f"({', '.join(map(str, dims))})" for dims in shapes))
            stem, _, layer = entry["name"].rpartition(".")
            if rows and layer.isdigit() and rows[-1][0] == stem and rows[-1][3:] == [entry["dtype"], shape] \
                    and int(layer) == rows[-1][2] + 1:
                rows[-1][2] += 1
                continue
            if layer.isdigit():
                rows.append([stem, int(layer), int(layer), entry["dtype"], shape])
            else:
                rows.append([entry["name"], None, None, entry["dtype"], shape])
        for n, (name, first, last, dtype, shape) in enumerate(rows):
            if first is not None:
                name = f"{name}.{first}" if first == last else f"{name}.{first}..{last}"
            table.add_row(side[:-1] if n == 0 else "", name, dtype, shape)
    lengths = next((list(entry["shapes"]) for entry in io["inputs"] if "shapes" in entry), None)
    if lengths:
        table.caption = f"a step graph: one shape per chunk length T ({', '.join(lengths)})"
    return table


def _describe(artifact: Path) -> None:
    from mixtral_export.artifact.manifest import HeadManifest, load_manifest

    from mixtral_export.artifact.contract import SPAN_STRIDE, STRIDED_FROM

    manifest = load_manifest(artifact)
    c, s = manifest.config, manifest.shapes
    built = f"opset {manifest.opset}" if manifest.kind == "onnx" else f"device {manifest.device}"
    routing = getattr(manifest, "routing", "dense")
    out.print(Text.assemble((str(artifact), "bold"), f"  ({manifest.kind}, {s.dtype}, {built}, {routing} routing)"),
              highlight=False)
    out.print(f"  model   {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads / "
              f"{c.num_key_value_heads} kv heads x {c.head_dim}, {c.num_local_experts} experts top-"
              f"{c.num_experts_per_tok}, vocab {c.vocab_size}, sliding window {c.sliding_window}", highlight=False)
    if isinstance(manifest, HeadManifest):
        outputs = ", ".join(f"{e['name']} {e['shape']}" for e in manifest.io["outputs"])
        labels = f"; labels {', '.join(manifest.labels)}" if manifest.labels else ""
        out.print(f"  head    {manifest.head}: input_ids, attention_mask [{s.batch}, {s.seq_len}] -> {outputs}{labels}"
                  f"; pad_token_id {c.pad_token_id}", highlight=False)
        for name, info in sorted(manifest.files.items()):
            out.print(f"  file    {name}  {info.size:,} bytes  {info.label()}", highlight=False)
        return
    window = s.attention_window if s.attention_window is not None else f"none (at most {s.cache_slots} positions)"
    out.print(f"  shapes  batch {s.batch}, prefill chunk {', '.join(map(str, s.prefill_chunks))}, decode chunk 1, "
              f"cache slots {s.cache_slots}, attention window {window}", highlight=False)
    buckets = [b for b in s.span_buckets if b <= STRIDED_FROM]
    tail = f", then every {SPAN_STRIDE} slots to {s.cache_slots}" if s.cache_slots > STRIDED_FROM else ""
    spans = (f"spans {', '.join(map(str, buckets))}{tail} (a step attends over the slots in use)" if s.span_axis
             else "the whole ring every step (a graph without the span axis)")
    scales = " + a float32 scale per slot and kv head" if s.scaled_cache else ""
    out.print(f"  cache   {s.cache_dtype}{scales}, {s.cache_bytes_per_row() / 2**20:,.2f} MiB per batch row "
              f"({s.cache_bytes_per_row() * s.batch / 2**20:,.2f} MiB for {s.batch}); {spans}", highlight=False)
    if q := manifest.quantization:
        worst = max(q["tensors"].items(), key=lambda item: item[1]["max_abs"])
        out.print(f"  weights {q['scheme']} ({'symmetric' if q['symmetric'] else 'asymmetric'}, block {q['block_size']}) "
                  f"on {len(q['tensors'])} tensors, largest |error| {worst[1]['max_abs']:.2e} ({worst[0]}); "
                  f"GEMM inputs {q['activations']}", highlight=False)
    for name, info in sorted(manifest.files.items()):
        out.print(f"  file    {name}  {info.size:,} bytes  {info.label()}", highlight=False)
    if manifest.stages:
        _describe_stages(manifest)


def _describe_stages(manifest) -> None:
    """Each stage of a staged artifact: its layers, what else it holds, its bytes and share; its files checked."""
    from mixtral_export.artifact.manifest import load_stage

    stages = [load_stage(manifest, index) for index in range(len(manifest.stages))]
    sizes = [sum(info.size for info in stage.files.values()) for stage in stages]
    out.print(f"  stages  {len(stages)}, {sum(sizes):,} bytes in all, export id {manifest.export_id}", highlight=False)
    for stage, size in zip(stages, sizes):
        s = stage.stage
        extra = ", ".join(part for part, has in (("embedding", s.embeds), ("final norm and lm_head", s.ends)) if has)
        out.print(f"  stage   {s.index}  {manifest.stages[s.index]['folder']}/  layers {s.first_layer}..{s.stop_layer - 1}"
                  f"{' + ' + extra if extra else ''}  {size:,} bytes ({size / sum(sizes):.0%})", highlight=False)
        for name, info in sorted(stage.files.items()):
            out.print(f"            {name}  {info.size:,} bytes  {info.label()}", highlight=False)


def _one_prompt_source(prompt: list[str], input_ids) -> None:
    if prompt and input_ids:
        raise UsageError("give --prompt TEXT or --input-ids 1,2,3, not both")
    if not (prompt or input_ids):
        raise UsageError("give --prompt TEXT (repeatable) or --input-ids 1,2,3")


def _token_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--input-ids must be comma-separated integers, got {text!r}") from None


@app.command()
def generate(artifact: Path = typer.Argument(..., help="Artifact folder written by export", metavar="ARTIFACT"),
             runtime: str = typer.Option("ort", help="eager | compiled | ort | aoti | trt", metavar="TEXT"),
             provider: str = typer.Option("cpu", help="cpu | cuda (| trt for ORT's TensorRT provider)", metavar="TEXT"),
             prompt: list[str] = typer.Option([], help="Prompt text (repeat for a batch)", metavar="TEXT"),
             input_ids: Optional[str] = typer.Option(None, help="Prompt as token ids: 1,2,3", metavar="TEXT"),
             chat: bool = typer.Option(False, help="Wrap each prompt as a Mixtral-Instruct user turn"),
             system: Optional[str] = typer.Option(None, help="System prompt of the chat (implies --chat)", metavar="TEXT"),
             max_new_tokens: int = typer.Option(32, min=1, help="Tokens to generate at most per prompt", metavar="N"),
             temperature: float = typer.Option(0.0, min=0, help="0 = greedy", metavar="X"),
             top_k: int = typer.Option(0, min=0, help="0 = off", metavar="N"),
             top_p: float = typer.Option(1.0, help="1 = off", metavar="X"),
             repetition_penalty: float = typer.Option(1.0, help="1 = off", metavar="X"),
             seed: Optional[int] = typer.Option(None, help="Seed for sampling: the same seed replays the same tokens", metavar="N"),
             stop: list[str] = typer.Option([], help="Stop string (repeatable)", metavar="TEXT"),
             json_schema: Optional[Path] = typer.Option(None, help="Output JSON valid against this JSON schema "
                                                         "file (constrained decoding)", metavar="FILE"),
             json_object: bool = typer.Option(False, help="Output any JSON object (constrained decoding)"),
             checkpoint: Optional[Path] = typer.Option(None, help="Source checkpoint for --runtime eager "
                                                        "(default: the one recorded at export)", metavar="PATH"),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text"),
             ray: bool = typer.Option(False, "--ray", help="A staged artifact: each stage in a Ray actor (joins "
                                      "RAY_ADDRESS, else starts a local cluster)"),
             row_groups: int = typer.Option(1, min=1, help="A staged artifact: G x its batch rows, in G groups in "
                                            "flight through the stages together", metavar="G"),
             stage_options: Optional[Path] = typer.Option(None, help="With --ray: a JSON file of the stage actors' "
                                                          "Ray options, one object or one per stage", metavar="FILE")):
    """Generate text from an artifact on a runtime, streaming tokens as they come."""
    from mixtral_export.runtimes.session import Session

    _one_prompt_source(prompt, input_ids)
    grammar, grammar_source = _output_grammar(json_schema, json_object)
    options = _stage_options(stage_options, ray, "--ray")
    session = Session.open(artifact, runtime=runtime, provider=provider, checkpoint=checkpoint, ray=ray,
                           row_groups=row_groups, stage_options=options)  # refuses a head
    try:
        _generate(session, runtime, prompt, input_ids, chat, system, max_new_tokens, temperature, top_k, top_p,
                  repetition_penalty, seed, stop, as_json, grammar, grammar_source)
    finally:
        session.close()


def _stage_options(path: Optional[Path], actors: bool, flag: str):
    """--stage-options read (JSON), or None; only where the stages are Ray actors."""
    if path is None:
        return None
    if not actors:
        raise UsageError(f"--stage-options needs {flag} (the stages as Ray actors)")
    from mixtral_export.runtimes.ray_stages import read_stage_options

    return read_stage_options(path)


def _generate(session, runtime: str, prompt: list[str], input_ids: Optional[str], chat: bool, system: Optional[str],
              max_new_tokens: int, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
              seed: Optional[int], stop: list[str], as_json: bool, grammar: str | None,
              grammar_source: str | None) -> None:
    chat = chat or system is not None
    if input_ids:
        if chat:
            raise UsageError("--chat needs --prompt text, not --input-ids")
        prompts = [_token_ids(input_ids)]
    else:
        system_turn = [] if system is None else [{"role": "system", "content": system}]
        prompts = [session.encode_chat(system_turn + [{"role": "user", "content": p}]) if chat else session.encode(p)
                   for p in prompt]
    if "" in stop:  # the library's own checks name its parameters (stop_strings, top_p); these name flags
        raise UsageError("--stop needs a non-empty string")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1] (1 = off), got {top_p}")
    if repetition_penalty <= 0:
        raise UsageError(f"--repetition-penalty must be > 0 (1 = off), got {repetition_penalty}")
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, seed=seed, stop_strings=tuple(stop), grammar=grammar)
    if grammar is not None:  # a schema that does not compile or cannot end in time: refused before any step
        from mixtral_export.runtimes.constraint import GrammarError
        from mixtral_export.runtimes.requests import generation_config

        try:
            for ids in prompts:
                session.client.admission.constrain(ids, generation_config(session.manifest.eos_token_id, **options))
        except GrammarError as error:
            raise UsageError(f"{grammar_source}: {error}") from None
    if as_json or len(prompts) > 1:
        result = session.generate_ids(prompts, **options)
        if as_json:
            compiled = getattr(session.backend, "compile_seconds", None)
            extra = {"compile_seconds": sum(compiled.values())} if compiled is not None else {}
            print(json.dumps(result.to_json(runtime=runtime, **extra), indent=2))
        else:
            for n, completion in enumerate(result.completions):
                out.print(Text.assemble((f"#{n}", "bold"), f" {completion.text}"), highlight=False)
        return
    for delta in session.stream_ids(prompts[0], **options):
        out.print(delta, end="", highlight=False, soft_wrap=True)
    out.print()
    stats = session.last_result
    reason = stats.completions[0].finish_reason
    if reason == "cache_full":
        reason = _cache_full(session.manifest.shapes, session.manifest.config.max_position_embeddings)
    err.print(f"{runtime}: prefill {stats.prefill_tokens} tokens in {stats.prefill_seconds * 1e3:.1f} ms, "
              f"{len(stats.completions[0].token_ids)} new tokens at {stats.decode_tokens_per_second:.1f} tok/s "
              f"({reason})", highlight=False, soft_wrap=True)


def _output_grammar(json_schema: Path | None, json_object: bool) -> tuple[str | None, str | None]:
    """The grammar of --json-schema FILE or --json-object, and what to name when it is refused."""
    from mixtral_export.runtimes.json_grammar import json_grammar

    if json_schema is not None and json_object:
        raise UsageError("give --json-schema FILE or --json-object, not both")
    if json_object:
        return json_grammar(None), "--json-object"
    if json_schema is None:
        return None, None
    try:
        schema = json.loads(json_schema.read_text())
    except OSError as error:
        raise UsageError(f"{json_schema}: cannot read the JSON schema ({error.strerror or error})") from None
    except ValueError as error:
        raise UsageError(f"{json_schema}: not JSON ({error})") from None
    if not isinstance(schema, dict):
        raise UsageError(f"{json_schema}: a JSON schema must be a JSON object, got {type(schema).__name__}")
    return json_grammar(schema), str(json_schema)


def _cache_full(shapes, max_position_embeddings: int) -> str:
    """Which limit a generation ran into, and only the export options that lift it: a ring that does
    not slide ends at its slots; past that (or with a sliding window) the model's position limit."""
    ring = shapes.max_positions  # None: the graph slides
    if ring is not None and ring < max_position_embeddings:
        return (f"cache_full: the artifact's ring holds at most {ring} positions and does not slide; export with "
                f"more --cache-slots (up to max_position_embeddings, {max_position_embeddings}), or --slide to "
                f"attend to the last {ring} only")
    return (f"cache_full: the model's max_position_embeddings ({max_position_embeddings}) is reached; "
            f"no export option goes past it")


@app.command()
def verify(artifact: Path = typer.Argument(..., help="Artifact folder written by export", metavar="ARTIFACT"),
           runtimes: str = typer.Option("eager,ort", help="Comma-separated runtimes; the first is the baseline", metavar="TEXT"),
           reference: Optional[str] = typer.Option(None, help="hf: also compare with transformers", metavar="TEXT"),
           steps: int = typer.Option(48, min=1, help="Greedy decode steps per prompt", metavar="N"),
           checkpoint: Optional[Path] = typer.Option(None, help="Source checkpoint for eager/hf "
                                                      "(default: the one recorded at export)", metavar="PATH"),
           as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
           report: Optional[Path] = typer.Option(None, help="Also write the JSON report to this file", metavar="PATH")):
    """Compare runtimes (and the reference) on the same prompts; the exit code says pass or fail."""
    from mixtral_export.artifact.manifest import HeadManifest, load_manifest
    from mixtral_export.runtimes.verify import print_report, verify_artifact
    from mixtral_export.runtimes.verify_heads import print_head_report, verify_head_artifact

    names = [n.strip() for n in runtimes.split(",") if n.strip()]
    if reference not in (None, "hf"):
        raise UsageError(f"--reference {reference!r}: only 'hf' is known")
    if report:
        check_file(report, report_is_ours("verify"))  # before minutes of verifying, not after
    if isinstance(load_manifest(artifact, verify_files=False), HeadManifest):
        # a head graph: every output, left- and right-padded, at the prompts' tokens
        check, options, show = verify_head_artifact, {}, print_head_report
    else:
        check, options, show = verify_artifact, {"steps": steps}, print_report
    with err.status("verifying..."):
        result = check(artifact, names, reference=reference, checkpoint=checkpoint, **options)
    if report:
        write_report(report, result.to_json(), "verify")
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        show(result, out)
    raise typer.Exit(0 if result.passed else 1)


@app.command("eval")
def eval_command(artifact: Path = typer.Argument(..., help="Artifact folder written by export", metavar="ARTIFACT"),
                 text: Optional[Path] = typer.Option(None, help="UTF-8 text to score, in the artifact's tokenizer "
                                                     "(BOS first)", metavar="FILE"),
                 tokens: Optional[Path] = typer.Option(None, help="Token ids to score, whitespace- or "
                                                       "comma-separated", metavar="FILE"),
                 ctx: int = typer.Option(512, help="Window length; each window's second half is scored", metavar="N"),
                 runtime: str = typer.Option("ort", help="eager | compiled | ort | aoti | trt", metavar="TEXT"),
                 provider: str = typer.Option("cpu", help="cpu | cuda (| trt for ORT's TensorRT provider)", metavar="TEXT"),
                 reference: Optional[str] = typer.Option(None, help="hf (transformers on the checkpoint) or a file "
                                                         "from --save-logits: KL divergence against it", metavar="REF"),
                 save_logits: Optional[Path] = typer.Option(None, help="Save this run's next-token distributions "
                                                            "as a reference for later runs", metavar="REF"),
                 checkpoint: Optional[Path] = typer.Option(None, help="Source checkpoint for eager/hf "
                                                           "(default: the one recorded at export)", metavar="PATH"),
                 json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the JSON report to this "
                                                          "file (- prints it instead of the table)", metavar="PATH")):
    """Perplexity over a text or token ids, and KL divergence against a reference run (llama-perplexity's measures)."""
    from mixtral_export.runtimes.perplexity import EvalOptions, eval_artifact, print_eval_report

    options = EvalOptions(ctx=ctx, reference=reference, save_logits=None if save_logits is None else str(save_logits))
    to_stdout = json_path is not None and str(json_path) == "-"
    if json_path is not None and not to_stdout:
        check_file(json_path, report_is_ours("eval"))  # before minutes of scoring, not after
    progress, tasks = _progress(eta=True), []

    def advance(done: int, total: int) -> None:  # the bar starts with the first window: a bad input prints one line
        if not tasks:
            progress.start()
            tasks.append(progress.add_task("scoring windows", total=total))
        progress.update(tasks[0], completed=done)

    try:
        result = eval_artifact(artifact, runtime, options, tokens_file=tokens, text_file=text, provider=provider,
                               checkpoint=checkpoint, progress=advance)
    finally:
        if tasks:
            progress.stop()
    if json_path is not None and not to_stdout:
        write_report(json_path, result.to_json(), "eval")
    if to_stdout:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_eval_report(result, out)


@app.command()
def score(artifact: Path = typer.Argument(..., help="Head artifact folder written by export", metavar="ARTIFACT"),
          runtime: str = typer.Option("ort", help="ort | eager", metavar="TEXT"),
          provider: str = typer.Option("cpu", help="cpu | cuda", metavar="TEXT"),
          prompt: list[str] = typer.Option([], help="Text (repeat for a batch)", metavar="TEXT"),
          input_ids: list[str] = typer.Option([], help="Token ids: 1,2,3 (repeat for a batch)", metavar="TEXT"),
          padding: str = typer.Option("left", help="left | right: where a row shorter than the graph is padded", metavar="TEXT"),
          checkpoint: Optional[Path] = typer.Option(None, help="Source checkpoint for --runtime eager "
                                                     "(default: the one recorded at export)", metavar="PATH"),
          as_json: bool = typer.Option(False, "--json", help="Print one JSON object with every output")):
    """Run a head artifact: a classifier's label, per-token labels, a QA span, or hidden states."""
    from mixtral_export.runtimes.head_session import HeadSession

    _one_prompt_source(prompt, input_ids)
    session = HeadSession.open(artifact, runtime=runtime, provider=provider, checkpoint=checkpoint)  # refuses a causal LM
    prompts = [_token_ids(ids) for ids in input_ids] if input_ids else [session.encode(p) for p in prompt]
    found = [r.to_json(session.head, session.labels) for r in session.score_ids(prompts, padding)]
    if as_json:
        print(json.dumps({"head": session.head, "labels": list(session.labels), "runtime": runtime,
                          "results": found}, indent=2))
        return
    for n, result in enumerate(found):
        if session.head == "sequence-classification":
            scores = ", ".join(f"{k} {v:.3f}" for k, v in result["logits"].items())
            line = f"{result['label']}  ({scores})"
        elif session.head == "token-classification":
            line = " ".join(f"{t}:{label}" for t, label in zip(result["token_ids"], result["labels"]))
        elif session.head == "question-answering":
            line = f"answer span tokens {result['start']}..{result['end']}: {result['token_ids'][result['start']:result['end'] + 1]}"
        else:
            hidden = result["last_hidden_state"]
            line = f"last_hidden_state ({len(hidden)}, {len(hidden[0])}), last token starts {[round(x, 4) for x in hidden[-1][:4]]}"
        out.print(Text.assemble((f"#{n}", "bold"), f" {line}"), highlight=False)


@app.command()
def serve(artifact: Path = typer.Argument(..., help="Artifact folder written by export", metavar="ARTIFACT"),
          runtime: str = typer.Option("ort", help="eager | compiled | ort | aoti | trt", metavar="TEXT"),
          provider: str = typer.Option("cpu", help="cpu | cuda (| trt for ORT's TensorRT provider)", metavar="TEXT"),
          host: str = typer.Option("127.0.0.1", help="Address to listen on", metavar="TEXT"),
          port: int = typer.Option(8000, min=0, max=65535, metavar="N"),
          max_queue: int = typer.Option(64, min=0, help="Requests waiting for a row before new ones get 429", metavar="N"),
          grace: float = typer.Option(10.0, min=0, help="Seconds running requests get to finish on SIGTERM", metavar="X"),
          model_name: Optional[str] = typer.Option(None, help="Model id clients send (default: the folder name)", metavar="TEXT"),
          request_timeout: Optional[float] = typer.Option(None, help="Seconds a request may take, queue included", metavar="X"),
          threads: Optional[int] = typer.Option(None, min=1, help="ONNX Runtime intra-op threads (default: usable cores)", metavar="N"),
          rows: Optional[int] = typer.Option(None, min=1, help="Use at most N batch rows (1 = one request at a time)", metavar="N"),
          stream_interval: int = typer.Option(1, min=1, help="Streamed tokens per SSE chunk after the first (fewer socket writes)", metavar="N"),
          checkpoint: Optional[Path] = typer.Option(None, help="Source checkpoint for --runtime eager/compiled", metavar="PATH"),
          in_process: bool = typer.Option(False, "--in-process", help="Step the engine on a thread of the HTTP "
                                          "server's process (default: a process of its own)"),
          api_key: Optional[str] = typer.Option(None, envvar="MIXTRAL_EXPORT_API_KEY", show_envvar=True,
                                                help="Every route but /health needs Authorization: Bearer KEY",
                                                metavar="KEY"),
          max_body_mb: float = typer.Option(4.0, min=0.001, help="Request bodies over X MB get 413", metavar="X"),
          stall_timeout: float = typer.Option(30.0, min=0.1, help="Seconds a stream may wait on a client that "
                                              "stopped reading before it is cut", metavar="X"),
          ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve (starts or joins a cluster: RAY_ADDRESS)"),
          replicas: int = typer.Option(1, min=1, help="With --ray: replicas, each with its own engine", metavar="N"),
          ray_dashboard: bool = typer.Option(False, "--ray-dashboard", help="With --ray: start Ray's dashboard "
                                             "(on --host)"),
          stage_actors: bool = typer.Option(False, "--stage-actors", help="A staged artifact: each stage in a Ray "
                                            "actor (joins RAY_ADDRESS, else starts a local cluster)"),
          row_groups: int = typer.Option(1, min=1, help="A staged artifact: G x its batch rows, in G groups in "
                                         "flight through the stages together", metavar="G"),
          stage_options: Optional[Path] = typer.Option(None, help="With --stage-actors: a JSON file of the stage "
                                                       "actors' Ray options, one object or one per stage",
                                                       metavar="FILE")):
    """Serve an artifact over an OpenAI-compatible HTTP API (continuous batching over its batch rows)."""
    if request_timeout is not None and request_timeout <= 0:
        raise UsageError(f"--request-timeout must be > 0 seconds, got {request_timeout}")
    if rows is not None:  # the engine's own check names its parameter, not the flag
        from mixtral_export.artifact.manifest import load_manifest

        if rows > (batch := row_groups * load_manifest(artifact, verify_files=False).shapes.batch):
            raise UsageError(f"--rows {rows} is more than the artifact's batch ({batch}; export --batch)")
    if ray_dashboard and not ray:
        raise UsageError("--ray-dashboard needs --ray")
    options = _stage_options(stage_options, stage_actors, "--stage-actors")
    if stage_actors or row_groups != 1:  # refused here, before a server or a Ray cluster starts
        from mixtral_export.runtimes.load import load_step_manifest

        if not load_step_manifest(artifact).stages:
            raise UsageError(f"{artifact}: --stage-actors and --row-groups run the stages of a staged artifact "
                             f"(export with --stages N)")
    if ray:
        if rows is not None or checkpoint is not None or stream_interval != 1 or in_process:
            raise UsageError("--rows, --checkpoint, --stream-interval and --in-process are not available with --ray")
        from mixtral_export.serving.ray_cluster import serve_on_ray  # a missing extra is one line (run())

        serve_on_ray(artifact, replicas, host, port, runtime=runtime, provider=provider, max_queue=max_queue,
                     model_name=model_name, threads=threads, request_timeout=request_timeout, api_key=api_key,
                     dashboard=ray_dashboard, stage_actors=stage_actors, row_groups=row_groups, stage_options=options)
        return
    from mixtral_export.serving.server import serve as run_server

    run_server(artifact, runtime=runtime, provider=provider, host=host, port=port, max_queue=max_queue, grace=grace,
               model_name=model_name, request_timeout=request_timeout, threads=threads, checkpoint=checkpoint,
               max_rows=rows, stream_interval=stream_interval, in_process=in_process, api_key=api_key,
               max_body=int(max_body_mb * 2**20), stall_seconds=stall_timeout, stage_actors=stage_actors,
               row_groups=row_groups, stage_options=options)


@app.command()
def demo(out_dir: Path = typer.Argument(Path("out/demo"), help="Folder for the checkpoint, the artifact and "
                                        "verify.json, relative to the current folder", metavar="OUT_DIR")):
    """The main job on the tiny model: build it, export ONNX, generate on ORT, verify vs eager and HF."""
    checkpoint, artifact = out_dir / "tiny-checkpoint", out_dir / "tiny-onnx"
    _heading("1. tiny checkpoint")
    _run_command("tiny", checkpoint, "--seed", "0")
    out.print("The tiny model's weights are random: its text is gibberish by design. What the demo shows is "
              "that every runtime computes the same gibberish as transformers, to the last logit.")
    _heading("2. export ONNX (fp32, batch 2, prefill chunk 8, 32-slot ring)")
    _run_command("export", checkpoint, "-o", artifact, "--batch", "2", "--prefill-chunk", "8")
    _heading("3. generate on ONNX Runtime (greedy, 48 tokens: the ring wraps)")
    _run_command("generate", artifact, "--runtime", "ort", "--prompt", "The quick brown fox", "--max-new-tokens", "48")
    _heading("4. verify ORT against eager PyTorch and transformers")
    report = out_dir / "verify.json"
    out.print(f"(the full report goes to {report})")
    _run_command("verify", artifact, "--runtimes", "eager,ort", "--reference", "hf", "--steps", "48", "--report", report)


def _heading(title: str) -> None:
    from rich.rule import Rule

    out.print(Rule(title), width=None if out.is_terminal else 80)  # a rule spans the width: not 10,000 columns


def _run_command(*args) -> None:
    """Run one of this program's commands as a user types it: its own parsing and defaults, so an
    option added to it needs nothing here (calling the functions directly passed typer's option
    objects for any argument left out). A non-zero exit (verify failing) ends the demo with it."""
    code = typer.main.get_command(app).main([str(arg) for arg in args], prog_name="mixtral-export",
                                            standalone_mode=False)
    if code:
        raise typer.Exit(code)


def _int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} must be positive integers, got {text!r}")
    return values


@app.command()
def bench(model: str = typer.Argument(..., help="tiny | mixtral-shaped | a checkpoint folder", metavar="MODEL"),
          layers: int = typer.Option(1, min=1, help="Layers of the mixtral-shaped model (random fp32 weights)", metavar="N"),
          runtimes: str = typer.Option("eager,ort-dense,ort-gather,compiled,transformers",
                                       help="Comma-separated: eager, eager-gather, compiled, ort-dense, ort-gather, "
                                            "transformers, llama.cpp (needs the llama extra)", metavar="TEXT"),
          contexts: Optional[str] = typer.Option(None, help="Prompt lengths, comma-separated (default: per model)", metavar="TEXT"),
          decode_steps: Optional[int] = typer.Option(None, min=1, help="Decode steps timed per generation", metavar="N"),
          repeats: Optional[int] = typer.Option(None, min=1, help="Generations per context length", metavar="N"),
          warmup: int = typer.Option(1, min=0, help="Untimed generations first", metavar="N"),
          prefill_chunk: str = typer.Option("16", help="Tokens per prefill step of the static graphs, comma-separated: "
                                                       "one artifact each; 16+128: one artifact serving both",
                                            metavar="TEXT"),
          cache_slots: Optional[str] = typer.Option(None, help="Ring sizes, comma-separated: one artifact each "
                                                               "(default: the sliding window, or 4096)", metavar="TEXT"),
          kv_dtype: str = typer.Option("float32", help="KV cache types of the ONNX runtimes and llama.cpp, comma-"
                                                       "separated: float32, float16, int8 (one artifact each, export "
                                                       "--kv-dtype; llama.cpp's f32, f16, q8_0)", metavar="TEXT"),
          threads: Optional[int] = typer.Option(None, min=1, help="Threads per runtime (default: usable cores)", metavar="N"),
          work_dir: Path = typer.Option(Path("out/bench"), help="Checkpoints and artifacts are built here, reused", metavar="PATH"),
          timeout: Optional[float] = typer.Option(None, help="Seconds allowed per runtime process", metavar="X"),
          json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON to this file", metavar="PATH"),
          plot: Optional[Path] = typer.Option(None, help="Write a PNG of decode tokens/s against context length", metavar="PATH"),
          markdown: bool = typer.Option(False, help="Print the tables as Markdown"),
          ort_spin: bool = typer.Option(False, help="Let ONNX Runtime's threads spin between ops (OpenMP's do)"),
          rounds: int = typer.Option(1, min=1, help="Interleaved passes over all runtimes, samples pooled", metavar="N"),
          weights: str = typer.Option("fp32", help="Precisions of ort-gather, comma-separated: fp32, int8, int4 "
                                                   "(one artifact each)", metavar="TEXT"),
          block_size: Optional[str] = typer.Option(None, help="Quantization blocks of int8/int4 weights, comma-"
                                                              "separated: one artifact each (default: the scheme's)",
                                                   metavar="TEXT"),
          gguf: str = typer.Option("f32", help="GGUF types of llama.cpp, comma-separated: f32, bf16, q8_0, q4_0, q4_k_m "
                                               "(one file each, made by llama.cpp's converter and quantizer)",
                                   metavar="TEXT"),
          llama_converter: Optional[Path] = typer.Option(None, help="llama.cpp's convert_hf_to_gguf.py (default: "
                                                                    "$MIXTRAL_EXPORT_LLAMA_CONVERTER)", metavar="PATH")):
    """Measure every runtime against transformers' generate and the machine's memory bandwidth."""
    from mixtral_export.bench.report import ring_ratios, speedups, table
    from mixtral_export.bench.report import plot as draw
    from mixtral_export.bench.run import BenchOptions, run_bench

    if plot is not None:
        try:
            import matplotlib  # noqa: F401  (fail before minutes of measuring, not after)
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'mixtral-export[plot]'") from None
    if json_path is not None:
        check_file(json_path, report_is_ours("bench"))
    if plot is not None:
        check_file(plot, png_is_ours)
    names = tuple(r.strip() for r in runtimes.split(",") if r.strip())
    options = BenchOptions(model=model, layers=layers, runtimes=names, contexts=_int_list(contexts, "--contexts"),
                           decode_steps=decode_steps, repeats=repeats, warmup=warmup,
                           prefill_chunk=tuple(lengths[0] if len(lengths) == 1 else lengths for lengths in
                                               (_int_list(item.replace("+", ","), "--prefill-chunk")
                                                for item in prefill_chunk.split(",") if item.strip())),
                           cache_slots=_int_list(cache_slots, "--cache-slots"), threads=threads, work_dir=work_dir,
                           kv_dtype=tuple(k.strip() for k in kv_dtype.split(",") if k.strip()),
                           timeout=timeout, ort_spin=ort_spin, rounds=rounds,
                           weights=tuple(w.strip() for w in weights.split(",") if w.strip()),
                           block_size=_int_list(block_size, "--block-size"),
                           gguf=tuple(t.strip() for t in gguf.split(",") if t.strip()), llama_converter=llama_converter)
    result = run_bench(options, say=lambda line: err.print(f"bench: {line}", highlight=False))
    if json_path is not None:
        write_report(json_path, result, "bench")
    out.print(table(result, markdown))
    if result["gather_over_dense"]:
        out.print(speedups(result, markdown))
    if result["over_smallest_ring"]:
        out.print(ring_ratios(result, markdown))
    if plot is not None:
        err.print(f"bench: wrote {draw(result, plot)}", highlight=False)
