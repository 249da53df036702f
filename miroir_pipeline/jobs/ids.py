"""Parent job ids: readable (kind, index, time) and unique, built only from a valid index uid."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

__all__ = ["INDEX_UID_PATTERN", "INDEX_UID_RULE", "new_parent_id"]

#: Meilisearch's rule for an index uid (a pydantic ``pattern``), and how to say it to an operator.
INDEX_UID_PATTERN = r"^[A-Za-z0-9_-]{1,400}$"
INDEX_UID_RULE = "index uid may use only letters, digits, - and _ (1-400 characters)"
_INDEX_UID = re.compile(INDEX_UID_PATTERN.removeprefix("^").removesuffix("$"))


def new_parent_id(prefix: str, index_uid: str) -> str:
    """``{prefix}-{index}-{UTC time}-{6 hex}``, e.g. ``import-products-20261201T230000-a1b2c3``.

    The id names log files and worker arguments, so an index uid outside Meilisearch's rule is
    refused here (ValueError) rather than carried into a path."""
    if not _INDEX_UID.fullmatch(index_uid):
        raise ValueError(f"{index_uid!r}: {INDEX_UID_RULE}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{prefix}-{index_uid}-{stamp}-{secrets.token_hex(3)}"
