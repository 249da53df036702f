"""The ``has_documents`` check on chunk and parent assets: a materialization whose every document
was invalid (all skipped to dead letters) is not a healthy success.

The check is produced by the asset itself (``check_specs`` plus an ``AssetCheckResult`` in the
``MaterializeResult``), so it is evaluated with every materialization, never on its own. Its
severity is WARN: the data moved as asked (``--on-invalid skip``), but the operator should look.
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from miroir_pipeline.dagster.names import MiroirNames

__all__ = ["documents_check_failed", "has_documents_result", "has_documents_spec"]


def has_documents_spec(names: MiroirNames, asset_key: dg.AssetKey, what: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        names.has_documents_check,
        asset=asset_key,
        description=(
            f"WARN when the {what} wrote no document because every one it read was invalid "
            "(skipped to dead letters): it finished, but moved nothing."
        ),
    )


def documents_check_failed(documents: int, invalid_documents: int) -> bool:
    """True when nothing was written and only because every document was invalid."""
    return documents == 0 and invalid_documents > 0


def has_documents_result(
    names: MiroirNames,
    asset_key: dg.AssetKey,
    what: str,
    *,
    documents: int,
    invalid_documents: int,
    dead_letter: str | None = None,
    refused_dead_letter: str | None = None,
) -> dg.AssetCheckResult:
    """The check's evaluation for a materialization of ``asset_key`` (``what``: "chunk c-0001").
    ``dead_letter``: where invalid lines went (a file, or a parent's folder);
    ``refused_dead_letter``: where documents a node refused went, when that is elsewhere."""
    failed = documents_check_failed(documents, invalid_documents)
    metadata: dict[str, Any] = {"documents": documents, "invalid_documents": invalid_documents}
    if dead_letter:
        metadata["dead_letter"] = dg.MetadataValue.path(dead_letter)
    if refused_dead_letter:
        metadata["refused_dead_letter"] = dg.MetadataValue.path(refused_dead_letter)
    if failed:
        where = f"; dead letters in {dead_letter}" if dead_letter else ""
        if refused_dead_letter:
            where += f"{' and' if where else '; dead letters in'} {refused_dead_letter} (refused by a node)"
        description = f"{what}: all {invalid_documents} document(s) were invalid, none written{where}"
    elif invalid_documents:
        description = f"{what}: {documents} document(s) written, {invalid_documents} invalid skipped"
    else:
        description = f"{what}: {documents} document(s) written"
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=names.has_documents_check,
        passed=not failed,
        severity=dg.AssetCheckSeverity.WARN,
        metadata=metadata,
        description=description,
    )
