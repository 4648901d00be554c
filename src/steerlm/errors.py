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
