"""Ctrl-C as the program sees it: the first SIGINT raises `Interrupted` and is remembered.

`Interrupted` is not KeyboardInterrupt, which click would turn into "Aborted!" and exit 1; any
further SIGINT is ignored, so cleanup (removing a half-built artifact) runs to its end. A signal
that lands inside an import can leave that library broken, so whatever error surfaces after it is
the interruption's aftermath: `interrupted()` tells the CLI so. The record is process-wide because
a signal is: entry.py installs the handler for the `mixtral-export` process alone.
"""
from __future__ import annotations

import signal


class Interrupted(BaseException):
    """Ctrl-C: unwinds like KeyboardInterrupt, through every `except BaseException` cleanup."""


_received: list[int] = []  # the signal, once it came


def on_interrupt(signum, frame) -> None:
    """The SIGINT handler: ignore any further one, remember this one, unwind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _received.append(signum)
    raise Interrupted()


def interrupted() -> bool:
    """Whether Ctrl-C came: then any error is its aftermath, not the user's input."""
    return bool(_received)
