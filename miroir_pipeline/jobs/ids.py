"""Parent job ids: readable (kind, index, time) and unique."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

__all__ = ["new_parent_id"]


def new_parent_id(prefix: str, index_uid: str) -> str:
    """``{prefix}-{index}-{UTC time}-{6 hex}``, e.g. ``import-products-20261201T230000-a1b2c3``."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{prefix}-{index_uid}-{stamp}-{secrets.token_hex(3)}"
