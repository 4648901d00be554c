"""Errors that point at the exact place in the user's input, and the one error boundary of every recipe.

A user mistake (bad config value, bad data, a missing path, a full disk, a port in use, an output
directory in use) ends a run with exactly one line on stderr, ``steerlm: error: <where>: <what>``,
and exit code 2. Anything else is a bug: its traceback is shown, followed by a line that says so.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from typing import Optional

EXIT_USER_ERROR = 2
EXIT_BUG = 1
# OSErrors that are the environment's or the user's doing, not a bug: the message names the path
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EADDRINUSE,
                      errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EEXIST, errno.EFBIG}


class DataError(ValueError):
    """Bad input data: one line naming the file, the line (1-based) or row, and the field.

    Example: ``data/x.jsonl:17: field 'label': unknown attribute 'helpfullness' (schema steerlm9: ...)``
    """

    def __init__(self, source: str, line: int | None, field: str | None, message: str):
        self.source, self.line, self.field, self.message = source, line, field, message
        where = source if line is None else f"{source}:{line}"
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{message}")


class ConfigError(ValueError):
    """A config value or combination that cannot work (the message names the key)."""


class OutputError(OSError):
    """Writing an output failed for a reason outside steerlm (disk full, read-only directory)."""

    def __init__(self, path, what: str, cause: OSError):
        self.path, self.what = str(path), what
        reason = cause.strerror or str(cause)
        super().__init__(cause.errno, f"{path}: writing {what} failed: {reason}; nothing partial was kept "
                                      f"(fix it and rerun the same command to continue)")

    def __str__(self) -> str:
        return self.strerror


class SchemaMismatchError(ValueError):
    """Two artefacts carry different attribute schemas (raised by steerlm.attributes)."""


def user_message(exc: BaseException) -> Optional[str]:
    """The one-line message for a user mistake, or None when `exc` is a bug."""
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, (DataError, SchemaMismatchError, ConfigError, OutputError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        where = exc.filename if exc.filename is not None else ""
        return f"{where}: {exc.strerror}" if where and exc.strerror else (exc.strerror or str(exc))
    if isinstance(exc, (FileNotFoundError, FileExistsError)):  # raised by steerlm with a message of its own
        return str(exc)
    if isinstance(exc, OmegaConfBaseException):  # a config key missing or of the wrong type
        return one_line(str(exc))
    try:  # Hydra's own errors: a bad override, an unknown key, a missing config file
        from hydra.errors import HydraException
    except ImportError:  # pragma: no cover
        return None
    return f"config: {one_line(str(exc), exc.__cause__)}" if isinstance(exc, HydraException) else None


def one_line(text: str, cause: Optional[BaseException] = None) -> str:
    """Multi-line library messages -> one line (OmegaConf's `full_key:`/`object_type=` lines are dropped)."""
    lines = [ln.strip() for ln in text.split("Config search path:")[0].splitlines() if ln.strip()]
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    keep = [ln.rstrip(":;") for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type="))]
    return "; ".join(dict.fromkeys(keep))  # the cause often repeats the message


def report_user_error(message: str) -> None:
    print(f"steerlm: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def report_bug(exc: BaseException) -> None:
    traceback.print_exception(exc, file=sys.stderr)
    print(f"steerlm: internal error: {type(exc).__name__}: this is a bug in steerlm, not a mistake in your input "
          "(the traceback above is for the report)", file=sys.stderr, flush=True)
    sys.exit(EXIT_BUG)


def user_errors(fn):
    """Entry-point decorator: bad input or config ends the run with one line on stderr and exit 2;
    a bug shows its traceback and says so (exit 1).

    Set STEERLM_TRACEBACK=1 to see a traceback for user errors too.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- the boundary: every exception is sorted here
            end_run(e)

    return wrapper


def end_run(exc: Exception) -> None:
    """The boundary's verdict: one line and exit 2 for a user mistake, the traceback and exit 1 for a bug
    (STEERLM_TRACEBACK=1 re-raises either)."""
    message = user_message(exc)
    if os.environ.get("STEERLM_TRACEBACK") == "1":
        raise exc
    if message is None:
        report_bug(exc)
    report_user_error(message)
