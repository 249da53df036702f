"""Loads named SQL statements from ``.sql`` files beside this module for the node targets.

File format: a ``-- name: statement_name`` header line, ``--`` comment lines saying why, then
the statement. Keeping SQL in ``.sql`` files puts every statement of a module in one place.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

__all__ = ["load_statements"]

_HEADER = re.compile(r"^--\s*name:\s*([A-Za-z_][A-Za-z0-9_]*)\s*$")


@functools.cache
def load_statements(filename: str) -> dict[str, str]:
    """Named statements of ``<filename>`` beside this module; refuses unnamed or empty ones."""
    text = resources.files(__package__ or "miroir_pipeline.fleet.targets").joinpath(filename).read_text(encoding="utf-8")
    statements: dict[str, str] = {}
    name: str | None = None
    body: list[str] = []

    def finish() -> None:
        if name is None:
            return
        sql = "\n".join(body).strip().rstrip(";").strip()
        if not sql:
            raise ValueError(f"sql/{filename}: statement {name!r} is empty")
        if name in statements:
            raise ValueError(f"sql/{filename}: statement {name!r} is defined twice")
        statements[name] = sql

    for line in text.splitlines():
        header = _HEADER.match(line.strip())
        if header:
            finish()
            name, body = header.group(1), []
        elif name is not None and not line.lstrip().startswith("--"):
            body.append(line)
    finish()
    return statements
