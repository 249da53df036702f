"""Open the node target a topology node's URL names: ``local://`` or ``http(s)://``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from miroir_pipeline.fleet.targets.base import NodeTarget
from miroir_pipeline.fleet.targets.local_store import LocalNodeStore
from miroir_pipeline.fleet.topology import Node, Topology

__all__ = ["open_target", "open_targets"]


def open_target(node: Node, **options: Any) -> NodeTarget:
    """The target of one node; ``options`` go to :class:`LocalNodeStore` or
    :class:`MeilisearchNode` (e.g. ``max_retries`` for a Meilisearch node)."""
    if node.kind == "local":
        return LocalNodeStore(node.id, node.local_path, **options)
    # Imported on first use: httpx and the client are a good part of a worker's start-up, and
    # the embedded defaults (local nodes only) never need them.
    from miroir_pipeline.fleet.targets.meilisearch import MeilisearchNode

    return MeilisearchNode.from_node(node, **options)


def open_targets(
    topology: Topology,
    *,
    local_options: Mapping[str, Any] | None = None,
    meilisearch_options: Mapping[str, Any] | None = None,
) -> dict[str, NodeTarget]:
    """A target per node of the topology, keyed by node id (groups in id order).

    If opening one node fails, those already opened are closed before the error propagates.
    """
    targets: dict[str, NodeTarget] = {}
    try:
        for node in topology.all_nodes():
            options = local_options if node.kind == "local" else meilisearch_options
            targets[node.id] = open_target(node, **dict(options or {}))
    except BaseException:
        for target in targets.values():
            target.close()
        raise
    return targets
