"""The program's entry point (`mixtral-export`, `python3 -m mixtral_export`).

Ctrl-C at any moment, even while torch is half imported, ends in one line and exit code 130
(mixtral_export/interruption.py raises and remembers it). The process then leaves without the
interpreter's shutdown, which can trip over a half-imported library.
"""
from __future__ import annotations

import os
import signal
import sys

from mixtral_export.interruption import interrupted, on_interrupt


def main() -> None:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_interrupt)
    try:
        from mixtral_export.cli import run

        run()
    except BaseException as error:
        if not (interrupted() or isinstance(error, KeyboardInterrupt)):
            raise
        sys.stdout.flush()
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        os._exit(130)
