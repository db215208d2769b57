"""Ctrl-C: an interrupt that says what was kept and how to go on, and a handler for long loops.

A KeyboardInterrupt raised anywhere prints a traceback that hides the one line the user needs: whether
anything was saved and which command continues. `Interrupted` carries that line to the command line,
which prints it alone and exits 130 (128 + SIGINT, what a shell reports for a Ctrl-C'd program).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_CODE = 130
# A run stopped by SIGTERM (a preemption), after saving: 128 + SIGTERM, what a shell reports for a program the
# signal ended, so that `train && next` does not go on as if the run had finished.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the message to show: what was saved and how to resume."""


class GracefulStop:
    """While active, the first Ctrl-C only sets `requested` (the loop saves at a step boundary and
    stops); a second one exits at once, without saving.

    Installed only in the main thread (where Python delivers signals); elsewhere it does nothing and
    Ctrl-C keeps its default behaviour.
    """

    def __init__(self, first_message: str = "Ctrl-C: stopping at the end of this step to save a checkpoint "
                                            "(Ctrl-C again to quit at once, without saving)"):
        self.requested = False
        self._first_message = first_message
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            print("Ctrl-C again: quitting without saving", file=sys.stderr, flush=True)
            os._exit(EXIT_CODE)  # at once: no cleanup that might itself wait on the device or the disk
        self.requested = True
        print(self._first_message, file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
