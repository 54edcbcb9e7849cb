"""The program's entry point (`mixtral-export`, `python3 -m mixtral_export`).

Ctrl-C at any moment, even while torch is half imported, ends in one line and exit code 130:
the first SIGINT raises `Interrupted` (not KeyboardInterrupt, which click would turn into
"Aborted!" and exit 1) and ignores any further one, so cleanup (removing a half-built artifact)
runs to its end. A signal that lands inside an import can leave that library broken, so whatever
error surfaces after it is reported as the interruption it is. The process then leaves without
the interpreter's shutdown, which can trip over a half-imported library.
"""
from __future__ import annotations

import os
import signal
import sys


class Interrupted(BaseException):
    """Ctrl-C: unwinds like KeyboardInterrupt, through every `except BaseException` cleanup."""


_received: list[int] = []  # the signal, once it came


def _interrupt(signum, frame) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _received.append(signum)
    raise Interrupted()


def interrupted() -> bool:
    """Whether Ctrl-C came: then any error is its aftermath, not the user's input."""
    return bool(_received)


def main() -> None:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        from mixtral_export.cli import run

        run()
    except BaseException as error:
        if not (_received or isinstance(error, KeyboardInterrupt)):
            raise
        sys.stdout.flush()
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        os._exit(130)
