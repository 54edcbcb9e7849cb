"""The layers of docs/design.md, enforced: no import circle, no import upward, no import-path edits.

The import graph is read from the source with `ast` (tests/import_graph.py), lazy imports included.
Each check also runs on a small planted graph, so a checker that stopped finding anything would fail.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.import_graph import (
    Import, Layer, find_cycle, find_cycles, import_graph, imports_in, layer_problems, package_modules, path_edits,
)

REPO = Path(__file__).resolve().parents[1]
P = "mixtral_export"

# Mirrors docs/design.md. A module may import only modules of its own rank or a lower one.
LAYERS = [
    Layer(0, "foundation", (f"{P}.errors", f"{P}.destinations")),
    Layer(1, "artifact contract", (f"{P}.artifact", f"{P}.artifact.*")),
    Layer(2, "model", tuple(f"{P}.{name}" for name in (
        "model", "checkpoint", "safetensors_file", "tokenizer", "chat_format", "tool_calls", "tool_call_parser",
        "head", "head_model", "tiny", "tokenizer_training"))),
    Layer(3, "export", (f"{P}.graphs", f"{P}.graphs.*")),
    Layer(3, "backends", (f"{P}.runtimes",) + tuple(f"{P}.runtimes.{name}" for name in (
        "step", "load", "ort", "span_ring", "pipeline", "ray_stages", "ort_heads", "eager", "eager_heads", "compiled", "aoti", "trt", "torch_ring",
        "resident_weights", "heads"))),
    Layer(4, "engine", tuple(f"{P}.runtimes.{name}" for name in (
        "requests", "scheduler", "sampling", "logprobs", "constraint", "json_grammar", "engine", "engine_client",
        "engine_process", "generate", "session", "head_session"))),
    Layer(5, "tools", (f"{P}.runtimes.verify*", f"{P}.runtimes.step_parity", f"{P}.runtimes.perplexity",
                       f"{P}.runtimes.logit_reference", f"{P}.serving", f"{P}.serving.*",
                       f"{P}.bench", f"{P}.bench.*")),
    Layer(6, "CLI", (P, f"{P}.cli", f"{P}.entry", f"{P}.interruption", f"{P}.cli_reference",
                     f"{P}.__main__")),
]
# Same-rank or lower imports the design still forbids: build and run stay apart, serving never builds.
FORBIDDEN = [(f"{P}.graphs.*", f"{P}.runtimes*"), (f"{P}.runtimes.*", f"{P}.graphs*"),
             (f"{P}.serving*", f"{P}.graphs*")]
GENERIC_NAMES = ("graphs", "runtimes", "serving", "bench", "artifact")


def test_no_import_circle():
    cycles = find_cycles(import_graph(package_modules(REPO)))
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_every_import_goes_to_its_own_layer_or_lower():
    modules = package_modules(REPO)
    problems = layer_problems(list(modules), import_graph(modules), LAYERS, FORBIDDEN)
    assert not problems, "\n".join(problems)


def test_product_code_never_edits_the_import_path():
    product = [path for path in REPO.rglob("*.py")
               if not path.relative_to(REPO).parts[0].startswith(("tests", "scripts", "."))]
    assert len(product) >= len(package_modules(REPO))
    edits = [f"{path.relative_to(REPO)}:{line}" for path in product for line in path_edits(path.read_text())]
    assert not edits, "import path edited at " + ", ".join(edits)


def test_an_install_puts_one_name_on_the_path(tmp_path):
    probe = ("import importlib.util, mixtral_export\n"
             "from mixtral_export import Session\n"
             f"print([name for name in {GENERIC_NAMES!r} if importlib.util.find_spec(name)])\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# The checker itself, on planted graphs.

def test_a_planted_circle_is_reported_in_order():
    imports = [Import("p.a", "p.b", 1), Import("p.b", "p.c", 1), Import("p.c", "p.a", 3), Import("p.c", "p.d", 4)]
    assert find_cycle(imports) == ["p.a", "p.b", "p.c", "p.a"]
    assert find_cycle(imports[:2] + imports[3:]) is None
    second = [Import("p.d", "p.e", 1), Import("p.e", "p.d", 2)]
    assert find_cycles(imports + second) == [["p.a", "p.b", "p.c", "p.a"], ["p.d", "p.e", "p.d"]]


def test_a_lazy_import_inside_a_function_counts():
    source = "import os\n\ndef run():\n    from .b import helper\n    from p import c\n"
    modules = {"p", "p.a", "p.b", "p.c"}
    assert imports_in(source, "p.a", False, modules) == [Import("p.a", "p.b", 4), Import("p.a", "p.c", 5)]
    assert [i.target for i in imports_in("from . import b\nfrom .b import thing\n", "p", True, modules)] == [
        "p.b", "p.b"]


def test_a_planted_upward_import_and_an_unplaced_module_fail():
    layers = [Layer(0, "low", ("p.low",)), Layer(1, "high", ("p.high", "p.side"))]
    upward = layer_problems(["p.low", "p.high"], [Import("p.low", "p.high", 7)], layers, [])
    assert upward == ["p.low:7 imports p.high: low (layer 0) may not import high (layer 1)"]
    assert layer_problems(["p.low", "p.high"], [Import("p.high", "p.low", 2)], layers, []) == []
    assert layer_problems(["p.stray"], [], layers, []) == ["place p.stray in a layer"]
    sideways = layer_problems(["p.high", "p.side"], [Import("p.side", "p.high", 1)], layers, [("p.side", "p.high")])
    assert sideways == ["p.side:1 imports p.high: p.side may not import p.high"]


def test_planted_import_path_edits_are_found():
    source = ("import os, site, sys\n"
              "sys.path.insert(0, 'x')\n"
              "sys.path = []\n"
              "site.addsitedir('x')\n"
              "env = {'PYTHONPATH': 'x'}\n"
              "print(sys.argv)\n")
    assert path_edits(source) == [2, 3, 4, 5]
