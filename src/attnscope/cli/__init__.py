"""The ``attnscope`` command line: a thin layer over the Python API.

``app`` (the commands), ``args`` (options derived from the settings dataclasses, argument checks),
``show`` (tables printed to the terminal), ``boundary`` (the one error boundary).  :func:`main` is the
console entry point (``attnscope``, ``python -m attnscope.cli``).

This module imports only the standard library, so the first thing the process does is install the
Ctrl-C handling: a SIGINT while torch and the CLI are still being imported (a few seconds on a cold
machine) prints the one ``interrupted`` line and exits 130, with no ``KeyboardInterrupt`` traceback.
Once the CLI is imported, Ctrl-C raises ``KeyboardInterrupt`` again, so that staged outputs are
discarded on the way out, and :mod:`attnscope.cli.boundary` turns it into the same line and status.
"""

from __future__ import annotations

import os
import signal

INTERRUPTED = "interrupted: nothing was written (partial outputs are discarded)"
STANDALONE = False  # True in a process started by main(): the boundary may then ignore a second Ctrl-C


def _exit_interrupted(signum=None, frame=None) -> None:  # noqa: ARG001 - a signal handler's signature
    """Print the one line and leave at once: nothing has been written yet (start-up)."""
    try:
        os.write(2, (INTERRUPTED + "\n").encode())
    finally:
        os._exit(130)


def main() -> None:
    """Console entry point (``attnscope``): Ctrl-C handled from the first line, then the CLI imported and run."""
    global STANDALONE
    STANDALONE = True
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # a background job: keep ignoring Ctrl-C
    if not ignored:
        signal.signal(signal.SIGINT, _exit_interrupted)
    try:
        from attnscope.cli.app import main as run  # lazy: start-up speed / clean Ctrl-C before torch is imported
    except KeyboardInterrupt:  # raised by a library that installed its own handler while importing
        _exit_interrupted()
    except Exception as err:  # noqa: BLE001 - a broken installation (a missing dependency): one line, not a traceback
        os.write(2, f"error: internal error: attnscope's command line cannot be imported ({type(err).__name__}: "
                    f"{' '.join(str(err).split())[:200]}); reinstall attnscope and its dependencies\n"
                 .encode("utf-8", "backslashreplace"))
        raise SystemExit(1) from None
    if not ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    run()
