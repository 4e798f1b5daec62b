"""The one exception type that means "the user did something we can explain in a line".

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake in the input, options or environment that the user can fix.

    The message names the place: `path, line 3, row 2, field 'src': what is wrong` (lines count from 1, rows of a
    table from 0). It is always one line, whatever the input put into it.
    """

    def __init__(self, message: str, *, path: Path | str | None = None, line: int | None = None,
                 row: int | None = None, field: str | None = None) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        text = f"{', '.join(where)}: {message}" if where else message
        self.message = " ".join(part.strip() for part in text.splitlines() if part.strip()) or text
        super().__init__(self.message)


class Interrupted(Exception):
    """The user stopped a stage (Ctrl-C) and it stopped cleanly: what it wrote is valid and --resume continues."""


def require_extra(what: str, extra: str, *modules: str, note: str = "") -> None:
    """Refuse in one line to run `what` without the optional extra `extra` (pyproject.toml's optional-dependencies)
    whose `modules` it imports: `serve needs the 'serve' extra (uvicorn is not installed): pip install -e
    ".[serve]"`. Checked before anything is loaded; `note` follows the install command."""
    missing = [m for m in modules if not _installed(m)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise UserError(f"{what} needs the '{extra}' extra ({', '.join(missing)} {verb} not installed): "
                        f'pip install -e ".[{extra}]"{note}')


def _installed(module: str) -> bool:
    import importlib.util
    import sys

    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
