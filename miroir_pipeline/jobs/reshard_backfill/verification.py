"""Verify a reshard's shadow index against the live index before any cutover.

Three promises are checked:

- the shadow holds exactly the live index's primary keys (none ``missing``, none ``extra``);
- every document's content, without ``_miroir_shard``, is the same on both sides (compared by
  a 128-bit hash of its canonical JSON: orjson with sorted keys), on every copy (``altered``);
- every shadow document carries ``_miroir_shard = shard_for_key(pk, S_new)`` and sits on
  exactly the nodes ``write_targets`` gives for that shard, and on no other node
  (``misplaced``).

Memory: one dict entry per document on each side (primary key → 16-byte hash, plus a node
bitmask for the shadow), roughly 150-250 bytes a document, so a few hundred MB for millions of
documents. That is accepted here; an index of hundreds of millions would need an external sort.
Live documents are read shard by shard from one healthy node holding each shard (the copy the
backfill read); shadow documents are read from every shadow node, and from any live node outside
the shadow topology that also holds the shadow index.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import xxhash

from miroir_pipeline.fleet.replica_reads import from_first_replica
from miroir_pipeline.fleet.routing import SHARD_FIELD, InvalidPrimaryKey, Router, primary_key_text
from miroir_pipeline.fleet.targets.base import NodeTarget
from miroir_pipeline.fleet.topology import Topology

__all__ = ["VerificationResult", "content_hash", "verify_shadow"]

log = logging.getLogger(__name__)

_PAGE = 2000


@dataclass
class VerificationResult:
    """Outcome of comparing a shadow index with its live index; lists hold up to
    ``max_examples`` primary keys each, the ``*_count`` fields the full numbers."""

    passed: bool
    live_documents: int
    shadow_documents: int
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    altered: list[str] = field(default_factory=list)
    misplaced: list[str] = field(default_factory=list)
    missing_count: int = 0
    extra_count: int = 0
    altered_count: int = 0
    misplaced_count: int = 0
    #: One line per misplaced example: where the document is and where it belongs.
    misplaced_detail: list[str] = field(default_factory=list)
    #: Shadow documents per node (copies; with RF x groups > 1 they sum to more than the total).
    shadow_per_node: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.passed:
            return (
                f"shadow verified: {self.shadow_documents} documents, same keys and content as the "
                "live index, every one on exactly its new nodes"
            )
        parts = [
            f"{name} {count} (e.g. {', '.join(examples[:5])})"
            for name, count, examples in (
                ("missing", self.missing_count, self.missing),
                ("extra", self.extra_count, self.extra),
                ("altered", self.altered_count, self.altered),
                ("misplaced", self.misplaced_count, self.misplaced),
            )
            if count
        ]
        return (
            f"shadow differs from the live index ({self.live_documents} live, "
            f"{self.shadow_documents} shadow documents): " + "; ".join(parts)
        )


def content_hash(doc: dict[str, Any]) -> bytes:
    """128-bit hash of a document's canonical JSON without ``_miroir_shard`` (the doc is changed)."""
    doc.pop(SHARD_FIELD, None)
    return xxhash.xxh3_128_digest(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS))


def _pk_of(doc: Any, primary_key: str, where: str) -> str:
    if not isinstance(doc, dict) or primary_key not in doc:
        raise ValueError(f"{where}: a document has no {primary_key!r} field")
    try:
        return primary_key_text(doc[primary_key]).decode("utf-8")
    except InvalidPrimaryKey as exc:
        raise ValueError(f"{where}: invalid primary key: {exc}") from None


def _read_live(
    router: Router, targets: Mapping[str, NodeTarget], uid: str, primary_key: str
) -> dict[str, bytes]:
    """pk → content hash of every live document, each shard from its first healthy replica."""
    hashes: dict[str, bytes] = {}
    for shard in range(router.shards):

        def read(_node: str, target: NodeTarget, shard: int = shard) -> dict[str, bytes]:
            return _read_shard(target, uid, shard, primary_key)

        _, shard_docs = from_first_replica(
            router.targets_of(shard), targets, read, f"verification of {uid}: live shard {shard}"
        )
        hashes.update(shard_docs)
    return hashes


def _read_shard(target: NodeTarget, uid: str, shard: int, primary_key: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    offset = 0
    where = f"live index {uid} on node {target.node_id}, shard {shard}"
    while True:
        page = target.fetch_shard(uid, shard, offset, _PAGE)
        for raw in page:
            doc = orjson.loads(raw)
            out[_pk_of(doc, primary_key, where)] = content_hash(doc)
        offset += len(page)
        if len(page) < _PAGE:
            return out


def verify_shadow(
    live_topology: Topology,
    live_targets: Mapping[str, NodeTarget],
    shadow_topology: Topology,
    shadow_targets: Mapping[str, NodeTarget],
    uid: str,
    shadow_uid: str,
    primary_key: str,
    max_examples: int = 20,
) -> VerificationResult:
    """Compare the shadow index with the live one (keys, content, placement); see the module doc.

    Raises :class:`TargetError` when a node cannot be read: no verdict is better than a wrong one.
    """
    live = _read_live(Router(live_topology), live_targets, uid, primary_key)
    shadow_router = Router(shadow_topology)
    node_ids = list(shadow_router.node_ids)
    targets: dict[str, NodeTarget] = {n: shadow_targets[n] for n in node_ids}
    for node_id, target in live_targets.items():  # a stray copy on a node the shadow does not use
        if node_id not in targets and target.index_exists(shadow_uid):
            node_ids.append(node_id)
            targets[node_id] = target
    expected_mask = [sum(1 << t for t in shadow_router.targets[s]) for s in range(shadow_router.shards)]

    result = VerificationResult(passed=False, live_documents=len(live), shadow_documents=0)
    seen: dict[str, int] = {}  # pk -> bitmask of nodes holding it
    altered: set[str] = set()
    misplaced: dict[str, str] = {}

    for bit, node_id in enumerate(node_ids):
        target = targets[node_id]
        where = f"shadow index {shadow_uid} on node {node_id}"
        count = 0
        if not target.index_exists(shadow_uid):
            if bit < len(shadow_router.node_ids):
                log.warning("verification: %s does not exist", where)
            result.shadow_per_node[node_id] = 0
            continue
        for raw in target.iter_documents(shadow_uid, page_size=_PAGE):
            count += 1
            doc = orjson.loads(raw)
            pk = _pk_of(doc, primary_key, where)
            seen[pk] = seen.get(pk, 0) | (1 << bit)
            tagged = doc.get(SHARD_FIELD)
            want = shadow_router.shard(pk.encode("utf-8"))
            # bool is an int in Python, and 1.0 == 1: neither is what a shard filter matches
            if (type(tagged) is not int or tagged != want) and pk not in misplaced:
                misplaced[pk] = f"{pk}: {SHARD_FIELD} is {tagged!r} on {node_id}, expected {want}"
            live_hash = live.get(pk)
            if live_hash is not None and content_hash(doc) != live_hash:
                altered.add(pk)
        result.shadow_per_node[node_id] = count

    for pk, mask in seen.items():
        want = shadow_router.shard(pk.encode("utf-8"))
        if mask != expected_mask[want] and pk not in misplaced:
            on = [n for b, n in enumerate(node_ids) if mask >> b & 1]
            misplaced[pk] = f"{pk}: on {on}, expected exactly {shadow_router.targets_of(want)} (shard {want})"

    missing = [pk for pk in live if pk not in seen]
    extra = [pk for pk in seen if pk not in live]
    result.shadow_documents = len(seen)
    result.missing_count, result.missing = len(missing), sorted(missing)[:max_examples]
    result.extra_count, result.extra = len(extra), sorted(extra)[:max_examples]
    result.altered_count, result.altered = len(altered), sorted(altered)[:max_examples]
    result.misplaced_count = len(misplaced)
    result.misplaced = sorted(misplaced)[:max_examples]
    result.misplaced_detail = [misplaced[pk] for pk in result.misplaced]
    result.passed = not (missing or extra or altered or misplaced)
    return result
