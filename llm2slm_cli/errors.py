"""The one exception type that means "the user did something we can explain in a line".

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake in the input, options or environment that the user can fix."""

    def __init__(self, message: str, *, path: Path | str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        self.message = f"{', '.join(where)}: {message}" if where else message
        super().__init__(self.message)
