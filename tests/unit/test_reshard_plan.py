"""Reshard planning: refusals before any row, chunk params over [0, S_old), shadow preparation,
the cursor format. Local node stores and a SQLite job store (no services)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from miroir_pipeline.fleet.routing import SHARD_FIELD, shard_for_key, write_targets
from miroir_pipeline.fleet.targets.base import NodeTarget
from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.fleet.topology import Group, Node, Topology, default_topology
from miroir_pipeline.jobs.reshard_backfill import (
    ReshardChunkParams,
    ReshardRefused,
    ReshardRequest,
    format_cursor,
    parse_cursor,
    plan_reshard,
    shadow_index_uid,
    shadow_topology_for,
)
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import JobStore, open_store
from miroir_pipeline.queue.contract import JobKind, JobState


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    s = open_store(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    yield s
    s.close()


@pytest.fixture
def topology(tmp_path: Path) -> Topology:
    return default_topology(tmp_path, shards=16)


@pytest.fixture
def targets(topology: Topology) -> Iterator[dict[str, NodeTarget]]:
    t = open_targets(topology)
    yield t
    for target in t.values():
        target.close()


SETTINGS = PipelineSettings(allowed_roots=["/"])


def load(topology: Topology, targets: dict[str, NodeTarget], uid: str, n: int) -> None:
    for t in targets.values():
        t.ensure_index(uid, "id", {"searchableAttributes": ["title"], "filterableAttributes": ["genre"]})
    for i in range(n):
        s = shard_for_key(i, topology.shards)
        line = orjson.dumps({"id": i, "title": f"t{i}", SHARD_FIELD: s}) + b"\n"
        for node_id in write_targets(s, topology):
            targets[node_id].write_documents(uid, "id", line, 1)


def test_plan_splits_old_shard_space_and_prepares_the_shadow(
    store: JobStore, topology: Topology, targets: dict[str, NodeTarget]
) -> None:
    load(topology, targets, "books", 50)
    planned = plan_reshard(
        store, ReshardRequest(index_uid="books", new_shards=64, shards_per_chunk=5), topology, targets, SETTINGS
    )
    assert planned.shadow_uid == "books__reshard_64" == shadow_index_uid("books", 64)
    assert planned.old_shards == 16 and planned.new_shards == 64 and planned.primary_key == "id"
    parent = store.get(planned.parent.id)
    assert parent.kind == JobKind.PARENT and parent.type == "reshard_backfill"
    chunks = store.children(parent.id)
    assert [c.id for c in chunks] == planned.chunk_ids
    params = [ReshardChunkParams.model_validate(c.params) for c in chunks]
    assert [(p.shard_start, p.shard_end) for p in params] == [(0, 5), (5, 10), (10, 15), (15, 16)]
    for p, c in zip(params, chunks, strict=True):
        assert (p.old_shards, p.new_shards, p.index_uid, p.shadow_uid) == (16, 64, "books", "books__reshard_64")
        assert Topology.parse(p.live_topology) == topology
        assert Topology.parse(p.shadow_topology) == topology.model_copy(update={"shards": 64})
        assert c.state == JobState.QUEUED and c.progress["last_cursor"] == f"{p.shard_start}:0"
    for t in targets.values():
        assert t.index_exists("books__reshard_64")
        assert t.get_primary_key("books__reshard_64") == "id"
        shadow_settings = t.get_settings("books__reshard_64")
        assert shadow_settings["searchableAttributes"] == ["title"]
        assert set(shadow_settings["filterableAttributes"]) == {"genre", SHARD_FIELD}
        assert SHARD_FIELD in t.get_settings("books")["filterableAttributes"]
        assert t.count_documents("books__reshard_64") == 0, "planning moves no document"


def test_same_shard_count_is_refused_before_any_row(
    store: JobStore, topology: Topology, targets: dict[str, NodeTarget]
) -> None:
    load(topology, targets, "books", 5)
    with pytest.raises(ReshardRefused, match=r"already has 16 shards.*nothing to do"):
        plan_reshard(store, ReshardRequest(index_uid="books", new_shards=16), topology, targets, SETTINGS)
    assert store.list_parents() == []
    assert not any(t.index_exists("books__reshard_16") for t in targets.values())


def test_missing_live_index_is_refused_naming_index_and_nodes(
    store: JobStore, topology: Topology, targets: dict[str, NodeTarget]
) -> None:
    with pytest.raises(ReshardRefused) as err:
        plan_reshard(store, ReshardRequest(index_uid="ghost", new_shards=8), topology, targets, SETTINGS)
    msg = str(err.value)
    assert "ghost" in msg and all(n in msg for n in ("node-0", "node-1", "node-2"))
    assert store.list_parents() == []
    assert not any(t.index_exists("ghost__reshard_8") for t in targets.values())


def test_index_missing_on_one_node_is_refused_naming_it(
    store: JobStore, topology: Topology, targets: dict[str, NodeTarget]
) -> None:
    load(topology, targets, "books", 5)
    targets["node-1"].delete_index("books")
    with pytest.raises(ReshardRefused, match=r"does not exist on node\(s\) \['node-1'\]"):
        plan_reshard(store, ReshardRequest(index_uid="books", new_shards=8), topology, targets, SETTINGS)
    assert store.list_parents() == []


def test_leftover_shadow_is_refused_unless_replaced(
    store: JobStore, topology: Topology, targets: dict[str, NodeTarget]
) -> None:
    load(topology, targets, "books", 5)
    stale = orjson.dumps({"id": "stale", SHARD_FIELD: 0}) + b"\n"
    targets["node-0"].write_documents("books__reshard_8", "id", stale, 1)
    with pytest.raises(ReshardRefused, match="already exists on node"):
        plan_reshard(store, ReshardRequest(index_uid="books", new_shards=8), topology, targets, SETTINGS)
    assert store.list_parents() == []
    plan_reshard(
        store, ReshardRequest(index_uid="books", new_shards=8, replace_shadow=True), topology, targets, SETTINGS
    )
    assert targets["node-0"].count_documents("books__reshard_8") == 0


@pytest.mark.parametrize(
    ("shadow_node", "named"),
    [("m0", "node-1"), ("node-1", "node-1 (live)")],
    ids=["other-nodes", "a-live-id-reused-for-another-server"],
)
def test_leftover_shadow_on_a_live_node_is_refused_unless_replaced(
    tmp_path: Path, store: JobStore, topology: Topology, targets: dict[str, NodeTarget], shadow_node: str, named: str
) -> None:
    """An earlier reshard that reused the live nodes left its shadow there; a reshard onto other
    nodes would leave those copies behind (verification counts them as extra): refused, and
    deleted with replace_shadow, like a leftover on the shadow's own nodes. The same when the new
    topology gives a live node's id to another server: the leftover is named as the live node's."""
    load(topology, targets, "books", 5)
    stale = orjson.dumps({"id": "stale", SHARD_FIELD: 0}) + b"\n"
    targets["node-1"].write_documents("books__reshard_8", "id", stale, 1)
    elsewhere = Topology(shards=8, groups=[Group(id=0, nodes=[Node(id=shadow_node, url=f"local://{tmp_path}/other")])])
    shadow = open_targets(elsewhere)
    try:
        with pytest.raises(ReshardRefused, match=re.escape(f"already exists on node(s) {[named]}")):
            plan_reshard(
                store, ReshardRequest(index_uid="books", new_shards=8), topology, targets, SETTINGS,
                new_topology=elsewhere, shadow_targets=shadow,
            )  # fmt: skip
        assert store.list_parents() == []
        plan_reshard(
            store, ReshardRequest(index_uid="books", new_shards=8, replace_shadow=True), topology, targets, SETTINGS,
            new_topology=elsewhere, shadow_targets=shadow,
        )  # fmt: skip
        assert not targets["node-1"].index_exists("books__reshard_8")
        assert shadow[shadow_node].index_exists("books__reshard_8")
    finally:
        for t in shadow.values():
            t.close()


def test_new_topology_must_agree_with_new_shards(tmp_path: Path, topology: Topology) -> None:
    other = Topology(shards=32, groups=[Group(id=0, nodes=[Node(id="x", url=f"local://{tmp_path}/x")])])
    with pytest.raises(ReshardRefused, match="shards: 32 but --new-shards is 8"):
        shadow_topology_for(topology, 8, other)
    assert shadow_topology_for(topology, 32, other) is other
    assert shadow_topology_for(topology, 8).shards == 8
    assert shadow_topology_for(topology, 8).groups == topology.groups


def test_request_validation() -> None:
    with pytest.raises(ValueError):
        ReshardRequest(index_uid="bad uid", new_shards=8)
    with pytest.raises(ValueError):
        ReshardRequest(index_uid="ok", new_shards=0)
    with pytest.raises(ValueError):
        ReshardRequest(index_uid="ok", new_shards=8, shards_per_chunk=0)


def test_cursor_round_trip_and_errors() -> None:
    assert parse_cursor(format_cursor(7, 1234)) == (7, 1234)
    for bad in ("7", "a:1", "1:-2", ""):
        with pytest.raises(ValueError, match="cursor"):
            parse_cursor(bad)
