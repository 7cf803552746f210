"""The CLI's one error boundary: every exception ends as one ``error:`` line and an exit status.

* the user's input or environment (an :class:`~attnscope.errors.AttnscopeError`, a usage error from typer,
  a full disk, a file-size limit, a permission denied): ``error: what is wrong; how to fix it``, exit 2;
* Ctrl-C (``KeyboardInterrupt``, typer's ``Abort``): ``interrupted: ...``, exit 130;
* anything else is a bug: ``error: internal error: TYPE: message; ...`` naming a log file that holds the
  traceback, exit 1.

The boundary cannot itself fail: it uses typer's public exceptions only (``typer.TyperException``,
``typer.Abort``; typer 0.29 vendors click as a private module), and a failure while classifying an error
falls back to a last-resort line written with ``os.write``.
"""

from __future__ import annotations

import errno
import os
import platform
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import typer

import attnscope.cli as entry
from attnscope import __version__
from attnscope.core.errors import AttnscopeError

_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up; free some space or write elsewhere",
    errno.EFBIG: "a file-size limit (`ulimit -f`) or the file system's limit stopped a write; raise the limit or "
                 "write elsewhere (outputs were left as they were)",
    errno.EACCES: "check the path's permissions",
    errno.EPERM: "check the path's permissions",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.ENOTDIR: "a file stands where a folder is needed; move it or pick another path",
    errno.EISDIR: "a folder stands where a file is needed; move it or pick another path",
}


def run(app: Callable[..., Any], setup: Callable[[], None] = lambda: None) -> NoReturn:
    """Run the typer ``app`` on ``sys.argv`` and exit with its status, through the boundary."""
    try:
        code = _run(app, setup)
    except KeyboardInterrupt:  # a second Ctrl-C while an error was being reported
        code = _interrupted()
    except BaseException as err:  # noqa: BLE001 - the boundary's own failure: still one line
        code = _last_resort(err)
    _exit(code)


def _run(app: Callable[..., Any], setup: Callable[[], None]) -> int:
    try:
        setup()
        refuse_empty_arguments(sys.argv[1:])
        rc = app(standalone_mode=False)
        if rc == 130:  # typer turns a KeyboardInterrupt inside a command into this status
            return _interrupted()
        return rc if isinstance(rc, int) else 0
    except BaseException as err:  # noqa: BLE001 - classified below
        return classify(err)


def classify(err: BaseException) -> int:
    """Print the one line for ``err`` and return the exit status."""
    if isinstance(err, (KeyboardInterrupt, typer.Abort)):
        return _interrupted()
    if isinstance(err, SystemExit):
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    if isinstance(err, typer.Exit):
        return int(getattr(err, "exit_code", 0))
    if isinstance(err, AttnscopeError):
        return fail(_one_line(str(err)))
    if isinstance(err, typer.TyperException):  # click's exceptions, as vendored by typer
        return _typer_error(err)
    if isinstance(err, OSError):
        return fail(_os_error(err))
    if isinstance(err, MemoryError):
        return fail("out of memory; use smaller settings (--n-samples, --batch-size, --n-ctx) or a smaller model")
    return internal_error(err)


def _typer_error(err: Any) -> int:
    ctx = getattr(err, "ctx", None)
    prog = ctx.command_path if ctx is not None else "attnscope"
    if type(err).__name__ == "NoArgsIsHelpError":  # its message is the help text
        _say(err.format_message(), sys.stdout)
        return fail(f"no command given; pick one of the commands above (`{prog} --help`)")
    msg = _one_line(err.format_message())
    if getattr(err, "exit_code", 1) == 2:  # a usage error
        return fail(f"{msg.rstrip('.')}; see `{prog} --help`")
    return fail(msg)


def _os_error(err: OSError) -> str:
    where = f"{os.fsdecode(err.filename)}: " if err.filename else ""
    what = err.strerror or type(err).__name__
    hint = _OS_HINTS.get(err.errno or 0, "check the path, its permissions and free space")
    return f"{where}{what}; {hint}"


def refuse_empty_arguments(args: list[str]) -> None:
    """An empty string given as a value (``--samples ""``) is an error, never "the current folder"."""
    for i, a in enumerate(args):
        if a.startswith("--") and a.endswith("=") and len(a) > 3:
            opt = a[:-1]
        elif a == "":
            opt = args[i - 1] if i > 0 and args[i - 1].startswith("-") else "an argument"
        else:
            continue
        raise AttnscopeError(f"{opt} was given an empty string; pass a value (a path, a name), or leave the option "
                             "out for its default")


def internal_error(err: BaseException) -> int:
    """A bug: one line naming a log file with the traceback; exit 1."""
    log = _write_log(err)
    where = f"the traceback is in {log}" if log else "no log file could be written"
    try:
        what = _one_line(str(err))[:300]
    except Exception:  # noqa: BLE001 - an exception whose message cannot be printed
        what = "(its message cannot be printed)"
    return fail(f"internal error: {type(err).__name__}: {what}; this is a bug in attnscope: {where} (please include "
                "it in a bug report)", code=1)


def _write_log(err: BaseException) -> str | None:
    try:
        fd, path = tempfile.mkstemp(prefix="attnscope-internal-error-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(f"attnscope {__version__}, Python {platform.python_version()} on {platform.platform()}\n")
            f.write(f"command: {' '.join(sys.argv)}\n\n")
            f.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
        return path
    except Exception:  # noqa: BLE001 - a full disk must not hide the error line
        return None


def fail(msg: str, code: int = 2) -> int:
    _say(f"error: {msg}")
    return code


def _interrupted() -> int:
    _ignore_sigint()
    _say(entry.INTERRUPTED)
    return 130


def _last_resort(err: BaseException) -> int:
    try:
        _say(f"error: internal error: {type(err).__name__} while reporting an error; this is a bug in attnscope")
    except BaseException:  # noqa: BLE001
        pass
    return 1


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _say(line: str, stream: Any = None) -> None:
    stream = stream or sys.stderr
    try:
        stream.write(line + "\n")
        stream.flush()
    except Exception:  # noqa: BLE001 - a closed or odd stream: write the bytes
        os.write(2 if stream is sys.stderr else 1, (line + "\n").encode("utf-8", "backslashreplace"))


def _ignore_sigint() -> None:
    if not entry.STANDALONE:  # called in-process (tests, scripts): leave the caller's handler alone
        return
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):  # not the main thread
        pass


def _exit(code: int) -> NoReturn:
    """Exit with ``code``; once the status is decided, Ctrl-C and a failing flush cannot change it."""
    _ignore_sigint()
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001 - e.g. a closed pipe or a file-size limit on redirected stdout
        os._exit(code)
    sys.exit(code)
