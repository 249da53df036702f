"""Index-settings helpers shared by the node targets: ``_miroir_shard`` must be filterable."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from miroir_pipeline.fleet.routing import SHARD_FIELD

__all__ = ["covers_shard_field", "merge_settings", "with_shard_filterable"]


def covers_shard_field(filterable: list[Any]) -> bool:
    """True when a ``filterableAttributes`` value already makes ``_miroir_shard`` filterable.

    Entries are attribute names or (Meilisearch >= 1.14) objects with ``attributePatterns``;
    ``*`` matches every attribute. An object entry must keep equality filtering enabled.
    """
    for entry in filterable:
        if isinstance(entry, str):
            if entry in (SHARD_FIELD, "*"):
                return True
        elif isinstance(entry, Mapping):
            patterns = entry.get("attributePatterns") or []
            if SHARD_FIELD in patterns or "*" in patterns:
                features = entry.get("features") or {}
                filter_features = features.get("filter") or {}
                if filter_features.get("equality", True):
                    return True
    return False


def with_shard_filterable(filterable: list[Any] | None) -> list[Any]:
    """``filterable`` with ``_miroir_shard`` added if it is not covered yet (user entries kept)."""
    current = list(filterable or [])
    if not covers_shard_field(current):
        current.append(SHARD_FIELD)
    return current


def merge_settings(old: Mapping[str, Any], new: Mapping[str, Any] | None) -> dict[str, Any]:
    """PATCH semantics: top-level keys of ``new`` replace those of ``old``; then the shard field
    is made filterable without dropping the user's filterable attributes."""
    merged = dict(old)
    merged.update(new or {})
    merged["filterableAttributes"] = with_shard_filterable(merged.get("filterableAttributes"))
    return merged
