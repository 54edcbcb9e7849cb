"""docs/cli.md, written from the command line's own definitions so the reference cannot drift.

Walks the typer app's click commands and writes Markdown: per command its usage line, its docstring
and a table of its arguments and options (flags, value, default, help). Nothing depends on the
terminal's width, so the output is the same on every machine:

    python3 -m mixtral_export.cli_reference > docs/cli.md
"""
from __future__ import annotations

import inspect
import sys

import typer

# Parameters are click's (typer carries its own copy of click): read by duck typing, not isinstance.
PROGRAM = "mixtral-export"
REGENERATE = "python3 -m mixtral_export.cli_reference > docs/cli.md"


def _is_argument(param) -> bool:
    return param.param_type_name == "argument"


def _is_flag(param) -> bool:
    return getattr(param, "is_flag", False)


def _cell(text: str) -> str:
    """One Markdown table cell: a single line, its pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _default(param) -> str:
    if param.required:
        return "required"
    value = param.default
    if _is_flag(param):
        return "on" if value else "off"
    if value is None or value == [] or value == ():
        return "-"
    if isinstance(value, (list, tuple)):
        return _code(",".join(str(item) for item in value))
    return _code(str(value))


def _metavar(param) -> str:
    if _is_flag(param):
        return ""
    return param.metavar or param.name.upper()


def _limits(param) -> str:
    """typer's min=/max= (kept on the parameter, or on click's range type) as words."""
    holder = param if hasattr(param, "min") else getattr(param, "type", None)
    low, high = getattr(holder, "min", None), getattr(holder, "max", None)
    if low is not None and high is not None:
        return f"{low} to {high}"
    if low is not None:
        return f"at least {low}"
    if high is not None:
        return f"at most {high}"
    return ""


def _help(param) -> str:
    parts = [getattr(param, "help", None) or ""]
    if limits := _limits(param):
        parts.append(f"({limits})")
    return " ".join(part for part in parts if part)


def _flags(param) -> str:
    if _is_argument(param):
        return _code(_metavar(param))
    names = sorted(param.opts, key=len) + list(param.secondary_opts)
    return ", ".join(_code(name) for name in names)


def _usage(name: str, command) -> str:
    pieces = [PROGRAM, name]
    if any(not _is_argument(p) and not getattr(p, "hidden", False) for p in command.params):
        pieces.append("[OPTIONS]")
    for param in command.params:
        if _is_argument(param):
            shown = _metavar(param) + ("..." if param.nargs != 1 else "")
            pieces.append(shown if param.required else f"[{shown}]")
    return " ".join(pieces)


def _command_section(name: str, command) -> list[str]:
    lines = [f"## {name}", "", "```", _usage(name, command), "```", ""]
    if command.help:
        lines += [inspect.cleandoc(command.help), ""]
    params = [p for p in command.params if not getattr(p, "hidden", False)]
    if params:
        lines += ["| argument / option | value | default | what |", "| --- | --- | --- | --- |"]
        for param in params:
            value = "" if _is_argument(param) else _code(_metavar(param))
            if getattr(param, "multiple", False):
                value += ", repeatable"
            lines.append(f"| {_cell(_flags(param))} | {_cell(value)} | {_cell(_default(param))} "
                         f"| {_cell(_help(param))} |")
        lines.append("")
    return lines


def _commands(app: typer.Typer):
    """The app's click group and its visible commands, in the order they were registered."""
    group = typer.main.get_command(app)
    return group, [(name, command) for name, command in group.commands.items() if not command.hidden]


def reference(app: typer.Typer) -> str:
    """The Markdown reference of every visible command of `app`, in the order the app lists them."""
    group, commands = _commands(app)
    lines = [f"# `{PROGRAM}` command reference", "",
             f"<!-- Generated from the command line's definitions: {REGENERATE}. Do not edit by hand. -->", ""]
    if group.help:
        lines += [inspect.cleandoc(group.help), ""]
    lines += ["`python3 -m mixtral_export` is the same program. Every command takes `--help`.", "",
              "| command | what it does |", "| --- | --- |"]
    for name, command in commands:
        summary = inspect.cleandoc(command.help or "").split("\n\n")[0]
        lines.append(f"| [`{name}`](#{name}) | {_cell(summary)} |")
    lines.append("")
    for name, command in commands:
        lines += _command_section(name, command)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    from mixtral_export.cli import app

    sys.stdout.write(reference(app))


if __name__ == "__main__":
    main()
