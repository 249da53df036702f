"""Turning what the command line refuses into one line an operator can act on.

:func:`format_validation_error` renders a pydantic ``ValidationError`` in terms of the flags the
operator typed (``--index 'bad index!': index uid may use only letters, …``), without pydantic's
layout or its links to pydantic's documentation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

__all__ = ["CliError", "format_validation_error"]


class CliError(ValueError):
    """A refusal the command prints as one line on stderr (exit status 2)."""


_UNSET = object()


def format_validation_error(
    exc: ValidationError,
    flags: Mapping[str, str] | None = None,
    *,
    given: Mapping[str, Any] | None = None,
    rules: Mapping[str, str] | None = None,
) -> str:
    """One line for every error of ``exc``, joined with ``; ``.

    ``flags`` maps a model field to the flag that sets it (``index_uid`` → ``--index``);
    ``given`` the field to the text the operator typed (shown instead of the parsed value);
    ``rules`` a field to the sentence that explains what it accepts, used for any error on it.
    """
    flags, given, rules = flags or {}, given or {}, rules or {}
    parts: list[str] = []
    for err in exc.errors(include_url=False):
        loc = err.get("loc") or ()
        field = str(loc[0]) if loc else ""
        name = flags.get(field) or ".".join(str(p) for p in loc) or exc.title
        value = given.get(field, err.get("input", _UNSET)) if field else _UNSET
        if err.get("type") in ("missing", "extra_forbidden") or isinstance(value, dict):
            value = _UNSET
        why = rules.get(field) or _explain(err)
        parts.append(f"{name} {value!r}: {why}" if value is not _UNSET else f"{name}: {why}")
    return "; ".join(dict.fromkeys(parts)) or str(exc)


def _explain(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}"
    if kind == "greater_than":
        return f"must be more than {ctx.get('gt')}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}"
    if kind == "less_than":
        return f"must be less than {ctx.get('lt')}"
    if kind == "string_too_short":
        n = ctx.get("min_length", 1)
        return "must not be empty" if n == 1 else f"must be at least {n} characters"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known setting"
    msg = str(err.get("msg", "is invalid"))
    return msg[:1].lower() + msg[1:]
