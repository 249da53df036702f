"""Reshard backfill against a real Meilisearch 1.21.0 fleet: exact placement both ways
(16 → 64 string ids, 64 → 16 integer ids), the shadow's settings, and verification failures
(deleted, altered, wrong node) naming the keys."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from miroir_pipeline.fleet.routing import SHARD_FIELD, shard_for_key, write_targets
from miroir_pipeline.fleet.targets.base import NodeTarget
from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.reshard_backfill import ReshardRefused, ReshardRequest, plan_reshard
from miroir_pipeline.jobs.reshard_backfill.params import InvalidLiveDocument
from miroir_pipeline.jobs.reshard_backfill.verification import verify_shadow
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import JobStore, open_store
from miroir_pipeline.queue.contract import JobState
from tests.fixtures.meilisearch import MeiliFleet, MeiliTopology
from tests.integration.test_reshard_local import (
    assert_exact_placement,
    load_live,
    make_docs,
    run_backfill,
)

pytestmark = pytest.mark.meilisearch

N_DOCS = 10_000
SETTINGS = PipelineSettings(allowed_roots=["/"], batch_size=2000)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    s = open_store(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    yield s
    s.close()


@pytest.fixture
def fleet(
    meili_fleet: MeiliFleet, meili_topology: MeiliTopology, request: pytest.FixtureRequest
) -> Iterator[tuple[Topology, dict[str, NodeTarget]]]:
    shards = getattr(request, "param", 16)
    topology = meili_topology(meili_fleet(3), shards=shards)
    targets = open_targets(topology)
    yield topology, targets
    for t in targets.values():
        t.close()


@pytest.mark.parametrize(
    ("fleet", "new", "int_ids"), [(16, 64, False), (64, 16, True)], indirect=["fleet"]
)
def test_reshard_on_meilisearch_places_every_document_exactly(
    store: JobStore, fleet: tuple[Topology, dict[str, NodeTarget]], meili_index_uid: str, new: int, int_ids: bool
) -> None:
    topology, targets = fleet
    uid = meili_index_uid
    docs = make_docs(N_DOCS, int_ids=int_ids)
    load_live(topology, targets, uid, docs)
    planned = plan_reshard(
        store, ReshardRequest(index_uid=uid, new_shards=new, shards_per_chunk=16), topology, targets, SETTINGS
    )
    for t in targets.values():  # shadow prepared with the live settings before anything moved
        shadow_settings = t.get_settings(planned.shadow_uid)
        assert shadow_settings["searchableAttributes"] == ["title", "tags"]
        assert SHARD_FIELD in shadow_settings["filterableAttributes"]
        assert t.get_primary_key(planned.shadow_uid) == "id"
    reports = run_backfill(store, targets, targets)
    assert sum(r.documents for r in reports) == N_DOCS
    assert store.parent_summary(planned.parent.id).parent.state == JobState.COMPLETED

    assert_exact_placement(planned.shadow_topology, targets, planned.shadow_uid, docs)
    for node_id, t in targets.items():
        by_shard = t.count_by_shard(planned.shadow_uid)
        assert all(node_id in write_targets(s, planned.shadow_topology) for s in by_shard)
    result = verify_shadow(topology, targets, planned.shadow_topology, targets, uid, planned.shadow_uid, "id")
    assert result.passed, result.summary()
    assert result.live_documents == result.shadow_documents == N_DOCS


def test_meilisearch_check_fails_naming_deleted_altered_and_misplaced_keys(
    store: JobStore, fleet: tuple[Topology, dict[str, NodeTarget]], meili_index_uid: str
) -> None:
    topology, targets = fleet
    uid = meili_index_uid
    docs = make_docs(1200, int_ids=False)
    load_live(topology, targets, uid, docs)
    planned = plan_reshard(store, ReshardRequest(index_uid=uid, new_shards=6), topology, targets, SETTINGS)
    run_backfill(store, targets, targets)
    shadow = planned.shadow_uid
    topo = planned.shadow_topology

    def verify() -> Any:
        return verify_shadow(topology, targets, topo, targets, uid, shadow, "id")

    assert verify().passed

    def home_and_stranger(pk: str) -> tuple[str, str]:
        owners = write_targets(shard_for_key(pk, 6), topo)
        return owners[0], next(n.id for n in topo.all_nodes() if n.id not in owners)

    deleted, altered, misplaced = docs[5]["id"], docs[6]["id"], docs[7]["id"]
    home, _ = home_and_stranger(deleted)
    targets[home].delete_documents(shadow, [deleted])
    home, _ = home_and_stranger(altered)
    changed = {**docs[6], "price": -1, SHARD_FIELD: shard_for_key(altered, 6)}
    targets[home].write_documents(shadow, "id", orjson.dumps(changed) + b"\n", 1)
    _, stranger = home_and_stranger(misplaced)
    copy = {**docs[7], SHARD_FIELD: shard_for_key(misplaced, 6)}
    targets[stranger].write_documents(shadow, "id", orjson.dumps(copy) + b"\n", 1)

    r = verify()
    assert not r.passed
    assert (r.missing, r.altered, r.misplaced, r.extra) == ([deleted], [altered], [misplaced], [])
    assert stranger in r.misplaced_detail[0]

    # A tag Python equates with the shard (true == 1) that a `_miroir_shard = 1` filter misses.
    boolean = next(d for d in docs[10:] if shard_for_key(d["id"], 6) == 1)
    home, _ = home_and_stranger(boolean["id"])
    targets[home].write_documents(shadow, "id", orjson.dumps({**boolean, SHARD_FIELD: True}) + b"\n", 1)
    r = verify()
    assert sorted(r.misplaced) == sorted([misplaced, boolean["id"]]) and r.altered == [altered]


def test_missing_meilisearch_index_is_refused(
    store: JobStore, fleet: tuple[Topology, dict[str, NodeTarget]], meili_index_uid: str
) -> None:
    topology, targets = fleet
    with pytest.raises(ReshardRefused) as err:
        plan_reshard(store, ReshardRequest(index_uid=meili_index_uid, new_shards=8), topology, targets, SETTINGS)
    assert meili_index_uid in str(err.value) and "meili-0" in str(err.value)
    assert store.list_parents() == []


def test_a_live_document_too_big_for_a_shadow_nodes_payload_limit_stops_the_chunk_naming_it(
    store: JobStore, meili_fleet: MeiliFleet, meili_topology: MeiliTopology, meili_index_uid: str
) -> None:
    """The topology says the nodes take requests of at most 4,096 bytes; a live document that
    cannot fit in one once retagged is refused for good before any request, naming it and the
    node, instead of being sent to a node configured to refuse it."""
    topology = meili_topology(meili_fleet(2), shards=8, replication_factor=1, groups=[[0, 1]], payload_limit_bytes=4096)
    targets = open_targets(topology)
    try:
        uid = meili_index_uid
        docs = make_docs(50, int_ids=False)
        docs.append({"id": "big", "title": "x" * 4100})
        load_live(topology, targets, uid, docs)  # each node takes far more than 4,096 bytes
        planned = plan_reshard(store, ReshardRequest(index_uid=uid, new_shards=16), topology, targets, SETTINGS)
        with pytest.raises(InvalidLiveDocument) as refused:
            run_backfill(store, targets, targets)
        message = str(refused.value)
        assert "live document 'big'" in message and "4096-byte payload limit" in message, message
        assert "payload_limit_bytes" in message
        failed = [c for c in store.children(planned.parent.id) if c.state == JobState.FAILED]
        assert len(failed) == 1 and failed[0].error is not None and "'big'" in failed[0].error
    finally:
        for t in targets.values():
            t.close()


def test_user_provided_vectors_are_carried_to_the_shadow(
    store: JobStore, meili_fleet: MeiliFleet, meili_topology: MeiliTopology, meili_index_uid: str
) -> None:
    """Meilisearch leaves ``_vectors`` out of fetched documents unless asked: a reshard must
    carry user-provided embeddings over (the shadow refuses documents without them), and
    verification must compare them."""
    topology = meili_topology(meili_fleet(2), shards=4, replication_factor=1, groups=[[0, 1]])
    targets = open_targets(topology)
    try:
        uid = meili_index_uid
        embedders = {"manual": {"source": "userProvided", "dimensions": 3}}
        docs = [{"id": f"d{i}", "title": f"t{i}", "_vectors": {"manual": [i / 64, 0.5, 0.25]}} for i in range(40)]
        for t in targets.values():
            t.ensure_index(uid, "id", {"embedders": embedders})
        for doc in docs:
            shard = shard_for_key(doc["id"], 4)
            for node_id in write_targets(shard, topology):
                targets[node_id].write_documents(uid, "id", orjson.dumps({SHARD_FIELD: shard, **doc}) + b"\n", 1)
        planned = plan_reshard(store, ReshardRequest(index_uid=uid, new_shards=8), topology, targets, SETTINGS)
        reports = run_backfill(store, targets, targets)
        assert sum(r.documents for r in reports) == len(docs)
        vectors = {}
        for t in targets.values():
            for raw in t.iter_documents(planned.shadow_uid):
                doc = orjson.loads(raw)
                vectors[doc["id"]] = doc["_vectors"]["manual"]["embeddings"][0]
        assert vectors.keys() == {d["id"] for d in docs}
        assert all(vectors[d["id"]] == pytest.approx(d["_vectors"]["manual"]) for d in docs)
        assert verify_shadow(topology, targets, planned.shadow_topology, targets, uid, planned.shadow_uid, "id").passed
    finally:
        for t in targets.values():
            t.close()


def test_live_deletes_during_the_read_skip_nothing_on_meilisearch(
    store: JobStore, meili_fleet: MeiliFleet, meili_topology: MeiliTopology, meili_index_uid: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Meilisearch pages a filtered read by offset in its internal order: documents deleted
    below the offset between two page reads would make the next page skip as many. The read
    overlaps the documents it read last and skips nothing."""
    topology = meili_topology(meili_fleet(1), shards=2)
    targets = open_targets(topology)
    [node] = targets.values()
    uid = meili_index_uid
    docs = make_docs(3000, int_ids=False)
    load_live(topology, targets, uid, docs)
    planned = plan_reshard(store, ReshardRequest(index_uid=uid, new_shards=3), topology, targets, SETTINGS)
    real = node.fetch_shard
    reads, gone = [0], []

    def fetch(index_uid: str, shard: int, offset: int, limit: int) -> list[bytes]:
        reads[0] += index_uid == uid and shard == 0
        if index_uid == uid and shard == 0 and reads[0] == 3:  # a live delete below the third page
            gone.extend(orjson.loads(d)["id"] for d in real(index_uid, 0, 0, 5))
            node.delete_documents(index_uid, gone)
        return real(index_uid, shard, offset, limit)

    monkeypatch.setattr(node, "fetch_shard", fetch)
    try:
        (report,) = run_backfill(store, targets, targets, PipelineSettings(allowed_roots=["/"], batch_size=300))
        assert len(gone) == 5 and report.documents == 3000
        node.delete_documents(planned.shadow_uid, gone)  # as Miroir's own delete does on the shadow
        assert_exact_placement(planned.shadow_topology, targets, planned.shadow_uid, [d for d in docs if d["id"] not in gone])
    finally:
        for t in targets.values():
            t.close()
