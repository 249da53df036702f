"""Reading a shard back from the fleet: from the first replica holding it that answers.

Shared by the reshard backfill (which reads live shards page by page) and the shadow
verification (which reads whole shards), so both fall back across replicas the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from miroir_pipeline.fleet.routing import Router
from miroir_pipeline.fleet.targets.base import NodeTarget, RequestRefused, TargetError

__all__ = ["ShardReader", "from_first_replica"]

T = TypeVar("T")
log = logging.getLogger(__name__)


def from_first_replica(
    order: Sequence[str],
    targets: Mapping[str, NodeTarget],
    read: Callable[[str, NodeTarget], T],
    what: str,
) -> tuple[str, T]:
    """``(node, read(node, target))`` for the first node of ``order`` whose read does not raise
    :class:`TargetError`; when none answers, a retryable :class:`TargetError` naming ``what``,
    the nodes tried and the last error. When every node refused the request as configured
    (:class:`RequestRefused`: a wrong key), that refusal is raised: no retry would change it."""
    last: TargetError | None = None
    refused_by_all = True
    for node in order:
        try:
            return node, read(node, targets[node])
        except TargetError as exc:
            log.warning("%s: node %s failed (%s); trying the next replica", what, node, exc)
            last = exc
            refused_by_all = refused_by_all and isinstance(exc, RequestRefused)
    if last is None:
        raise TargetError(f"{what}: no node holds it", node_id="", retryable=False)
    if isinstance(last, RequestRefused) and refused_by_all:
        raise RequestRefused(
            f"{what}: every node holding it refused the request (tried {list(order)}); last: {last}",
            node_id=last.node_id,
            status=last.status,
        )
    raise TargetError(
        f"{what}: no node holding it answered (tried {list(order)}); last error: {last}",
        node_id=last.node_id,
        retryable=True,
    )


class ShardReader:
    """Reads one shard page by page from one node holding it, sticking to that node.

    Offsets are only meaningful on the node that produced them (Meilisearch orders by its
    internal ids), so moving to another replica part-way restarts the shard at offset 0;
    re-sending documents is harmless because writes are idempotent by primary key.
    """

    def __init__(self, router: Router, targets: Mapping[str, NodeTarget], index_uid: str) -> None:
        self.router = router
        self.targets = targets
        self.index_uid = index_uid
        self.node: str | None = None

    def read(self, shard: int, offset: int, limit: int, preferred: str | None) -> tuple[list[bytes], int]:
        """A page and the offset it was read at (0 if the read moved to another node)."""
        replicas = self.router.targets_of(shard)
        order = [preferred] if preferred in replicas else []
        order += [n for n in replicas if n not in order]

        def at(node: str) -> int:
            return offset if node == preferred or offset == 0 else 0

        node, page = from_first_replica(
            order,
            self.targets,
            lambda n, t: t.fetch_shard(self.index_uid, shard, at(n), limit),
            f"index {self.index_uid} shard {shard}",
        )
        if at(node) != offset:
            log.warning(
                "shard %d: reading moved from %s to %s; restarting the shard at offset 0",
                shard, preferred, node,
            )  # fmt: skip
        self.node = node
        return page, at(node)
