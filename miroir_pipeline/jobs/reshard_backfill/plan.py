"""Planning a reshard: check the live index, prepare the shadow index on every shadow node, then
enqueue the parent and split the live shard-id space into ranges, all before a document moves."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from miroir_pipeline.fleet.routing import write_targets
from miroir_pipeline.fleet.targets.base import NodeTarget
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.ids import new_parent_id
from miroir_pipeline.jobs.reshard_backfill.params import (
    MAX_INDEX_UID_BYTES,
    RESHARD_BACKFILL,
    PlannedReshard,
    ReshardChunkParams,
    ReshardRefused,
    ReshardRequest,
    format_cursor,
    shadow_index_uid,
    shadow_topology_for,
)
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue.contract import JobStore, NewChunk
from miroir_pipeline.sources.split import split_shards

__all__ = ["plan_reshard"]

log = logging.getLogger(__name__)


def plan_reshard(
    store: JobStore,
    request: ReshardRequest,
    live_topology: Topology,
    live_targets: Mapping[str, NodeTarget],
    settings: PipelineSettings,
    *,
    new_topology: Topology | None = None,
    shadow_targets: Mapping[str, NodeTarget] | None = None,
) -> PlannedReshard:
    """Validate, prepare the shadow index on every shadow node, then enqueue and split.

    Refused before any row is written: the same shard count, a live index missing on its
    nodes (or without a primary key), a shadow uid too long, a shadow index left by an earlier
    reshard on any live or shadow node (unless ``replace_shadow``, which deletes it). The shadow gets the live index's settings and primary
    key, and ``_miroir_shard`` is made filterable on live and shadow nodes alike.
    """
    uid = request.index_uid
    old_shards = live_topology.shards
    if request.new_shards == old_shards:
        raise ReshardRefused(
            f"index {uid} already has {old_shards} shards under the live topology; nothing to do"
        )
    shadow_uid = shadow_index_uid(uid, request.new_shards)
    if len(shadow_uid.encode()) > MAX_INDEX_UID_BYTES:
        raise ReshardRefused(
            f"shadow index uid {shadow_uid[:40]}... would be longer than {MAX_INDEX_UID_BYTES} bytes"
        )
    shadow_topology = shadow_topology_for(live_topology, request.new_shards, new_topology)
    if shadow_targets is None:
        shadow_targets = live_targets
    live_nodes = [n.id for n in live_topology.all_nodes()]
    shadow_nodes = [n.id for n in shadow_topology.all_nodes()]
    for role, nodes, targets in (("live", live_nodes, live_targets), ("shadow", shadow_nodes, shadow_targets)):
        unknown = [n for n in nodes if n not in targets]
        if unknown:
            raise ReshardRefused(f"no target opened for {role} node(s) {unknown}")

    missing = [n for n in live_nodes if not live_targets[n].index_exists(uid)]
    if missing:
        where = "any of its nodes" if len(missing) == len(live_nodes) else f"node(s) {missing}"
        raise ReshardRefused(
            f"live index {uid} does not exist on {where} (live nodes: {live_nodes}); "
            "check the index uid and --topology"
        )
    source = live_targets[live_nodes[0]]
    primary_key = source.get_primary_key(uid)
    if not primary_key:
        raise ReshardRefused(f"live index {uid} on node {source.node_id} has no primary key yet")
    index_settings = source.get_settings(uid)

    # A shadow left by an earlier reshard counts on live-only nodes too (one that reused the live
    # nodes): verification would find its copies there, extra to the shadow's topology.
    # A live node at another URL than the shadow node of the same id (a new topology may reuse
    # an id for another server) is a holder of its own.
    shadow_urls = {n.id: n.url for n in shadow_topology.all_nodes()}
    holders = {n: shadow_targets[n] for n in shadow_nodes}
    for node in live_topology.all_nodes():
        if node.id not in holders:
            holders[node.id] = live_targets[node.id]
        elif shadow_urls[node.id] != node.url:
            holders[f"{node.id} (live)"] = live_targets[node.id]
    existing = [n for n, target in holders.items() if target.index_exists(shadow_uid)]
    if existing:
        if not request.replace_shadow:
            raise ReshardRefused(
                f"shadow index {shadow_uid} already exists on node(s) {existing}, left by an earlier "
                "reshard; delete it or plan with replace_shadow (CLI: --replace-shadow)"
            )
        for n in existing:
            holders[n].delete_index(shadow_uid)

    for n in live_nodes:  # makes _miroir_shard filterable where it was not yet (awaited)
        live_targets[n].ensure_index(uid, primary_key, None)
    _check_live_tags(uid, live_topology, live_targets)
    for n in shadow_nodes:
        shadow_targets[n].ensure_index(shadow_uid, primary_key, index_settings)

    parent = store.enqueue(
        RESHARD_BACKFILL,
        {
            "index_uid": uid,
            "shadow_uid": shadow_uid,
            "primary_key": primary_key,
            "old_shards": old_shards,
            "new_shards": request.new_shards,
            "shards_per_chunk": request.shards_per_chunk,
        },
        job_id=new_parent_id("reshard", uid),
        max_attempts=settings.max_attempts,
    )
    live_dict = live_topology.model_dump(mode="json")
    shadow_dict = shadow_topology.model_dump(mode="json")
    chunks = [
        NewChunk(
            chunk_index=i,
            params=ReshardChunkParams(
                index_uid=uid,
                shadow_uid=shadow_uid,
                primary_key=primary_key,
                old_shards=old_shards,
                new_shards=request.new_shards,
                shard_start=r.start,
                shard_end=r.stop,
                live_topology=live_dict,
                shadow_topology=shadow_dict,
            ).model_dump(),
            progress={"last_cursor": format_cursor(r.start, 0)},
        )
        for i, r in enumerate(split_shards(old_shards, request.shards_per_chunk))
    ]
    children = store.split(parent.id, chunks)
    log.info(
        "reshard %s: %s %d -> %d shards into %s, %d chunk(s)",
        parent.id, uid, old_shards, request.new_shards, shadow_uid, len(children),
    )  # fmt: skip
    return PlannedReshard(
        parent=store.get(parent.id),
        chunk_ids=[c.id for c in children],
        shadow_uid=shadow_uid,
        primary_key=primary_key,
        old_shards=old_shards,
        new_shards=request.new_shards,
        shadow_topology=shadow_topology,
    )


def _check_live_tags(uid: str, topology: Topology, targets: Mapping[str, NodeTarget]) -> None:
    """Refuse a live index whose nodes hold documents the backfill would never read: it reads
    each shard of ``[0, S)`` where the live topology places it, so a document tagged with
    another shard (the index was imported under another topology), or with none, would be left
    behind, and verification (which reads the same way) would not see it missing."""
    owned: dict[str, set[int]] = {n.id: set() for n in topology.all_nodes()}
    for shard in range(topology.shards):
        for node_id in write_targets(shard, topology):
            owned[node_id].add(shard)
    for node_id, shards in owned.items():
        target = targets[node_id]
        total = target.count_documents(uid)
        by_shard = target.count_by_shard(uid)
        read = sum(count for shard, count in by_shard.items() if shard in shards)
        if read == total:
            continue
        strays = sorted((s, c) for s, c in by_shard.items() if s not in shards)
        untagged = total - sum(by_shard.values())
        what = ", ".join(f"{c} in shard {s}" for s, c in strays[:5]) + (", ..." if len(strays) > 5 else "")
        if untagged:
            what = f"{what}, {untagged} without a shard tag" if what else f"{untagged} without a shard tag"
        raise ReshardRefused(
            f"live index {uid} on node {node_id} holds {total} documents, but only {read} carry a "
            f"shard the live topology ({topology.shards} shards) places on that node ({what}); "
            "a backfill would leave the others behind. Check that --topology is the one the index "
            "was imported with (shards, groups, replication factor)"
        )
