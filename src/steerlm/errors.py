"""Errors that point at the exact place in the user's input."""

from __future__ import annotations


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


def user_errors(fn):
    """Entry-point decorator: bad input or config ends the run with one line on stderr and exit 2.

    Tracebacks are for bugs; set STEERLM_TRACEBACK=1 to see one for these errors too.
    """
    import functools
    import os
    import sys

    from .attributes import SchemaMismatchError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DataError, SchemaMismatchError, ConfigError, FileNotFoundError, FileExistsError) as e:
            if os.environ.get("STEERLM_TRACEBACK") == "1":
                raise
            print(f"steerlm: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
