"""The throughput counters count committed work once: documents and bytes of a batch are
counted when its progress is committed (every target acknowledged it), so a failed attempt
counts only what it committed and the retry, resuming at that cursor, counts the rest.

Local node stores and a SQLite jobs store, all real; the failing write is a stand-in (FAKE:
a node failing one request at a chosen batch cannot be produced otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import Counter

from miroir_pipeline import metrics
from miroir_pipeline.fleet.targets.base import TargetError
from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.fleet.targets.local_store import LocalNodeStore
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import, process_dump_chunk
from miroir_pipeline.jobs.reshard_backfill import (
    ReshardRequest,
    plan_reshard,
    process_reshard_chunk,
)
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import JobStore, open_store
from miroir_pipeline.queue.contract import JobState
from tests.import_helpers import local_topology, make_docs, write_dump
from tests.integration.test_reshard_local import load_live


class FailsOnce(LocalNodeStore):
    """A local node whose write of its ``fail_at``-th batch fails once, as a node answering
    503 past its retries does (retryable)."""

    def __init__(self, *a: Any, fail_at: int, **k: Any) -> None:
        super().__init__(*a, **k)
        self.writes, self.fail_at = 0, fail_at

    def write_routed(self, index_uid: str, primary_key: str, lines: Sequence[bytes], *a: Any, **k: Any) -> None:
        self.writes += 1
        if self.writes == self.fail_at:
            raise TargetError(f"node {self.node_id}: unavailable", node_id=self.node_id, retryable=True)
        super().write_routed(index_uid, primary_key, lines, *a, **k)


def count(counter: Counter) -> float:
    return float(counter._value.get())


def settings_for(root: Path) -> PipelineSettings:
    return PipelineSettings(
        batch_size=50, read_block_bytes=8192, allowed_roots=[str(root)], staging_dir=str(root / "staging"), dead_letter_dir=str(root / "dlq")
    )


@pytest.fixture
def store(tmp_path: Path) -> Any:
    opened = open_store(f"sqlite:///{tmp_path}/jobs.sqlite3")
    yield opened
    opened.close()


def failing_targets(topo: Topology, fail_at: int) -> dict[str, Any]:
    return {n.id: FailsOnce(n.id, n.local_path, fail_at=fail_at) for n in topo.all_nodes()}


def test_dump_import_counts_documents_and_bytes_once_across_a_failed_attempt(tmp_path: Path, store: JobStore) -> None:
    topo = local_topology(tmp_path / "nodes", shards=8, nodes_per_group=1)
    settings = settings_for(tmp_path)
    dump = write_dump(tmp_path / "d.ndjson", make_docs(400, seed=2))
    plan = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid="m", primary_key="id"), topo, open_targets(topo), settings)
    (chunk,) = plan.chunk_ids
    docs0, bytes0 = count(metrics.DUMP_IMPORT_DOCUMENTS_ROUTED), count(metrics.DUMP_IMPORT_BYTES_READ)
    targets = failing_targets(topo, fail_at=3)  # batches 1 and 2 commit, the third fails
    lease = store.claim(["dump_import"], "w1", 30)
    assert lease is not None
    with pytest.raises(TargetError):
        process_dump_chunk(store, lease, targets, settings)
    committed = store.get(chunk).progress
    assert 0 < committed["docs_routed"] < 400 and store.get(chunk).state == JobState.QUEUED
    assert count(metrics.DUMP_IMPORT_DOCUMENTS_ROUTED) - docs0 == committed["docs_routed"]
    assert count(metrics.DUMP_IMPORT_BYTES_READ) - bytes0 == committed["bytes_processed"]

    process_dump_chunk(store, store.claim_by_id(chunk, "w2", 30), targets, settings)
    assert store.get(chunk).state == JobState.COMPLETED
    assert count(metrics.DUMP_IMPORT_DOCUMENTS_ROUTED) - docs0 == 400
    assert count(metrics.DUMP_IMPORT_BYTES_READ) - bytes0 == dump.stat().st_size


def test_reshard_counts_documents_once_across_a_failed_attempt(tmp_path: Path, store: JobStore) -> None:
    topo = local_topology(tmp_path / "nodes", shards=4, nodes_per_group=2)
    live = open_targets(topo)
    load_live(topo, live, "books", make_docs(200, seed=4))
    settings = settings_for(tmp_path)
    plan = plan_reshard(store, ReshardRequest(index_uid="books", new_shards=8, shards_per_chunk=4), topo, live, settings)
    (chunk,) = [c.id for c in store.children(plan.parent.id)]
    before = count(metrics.RESHARD_DOCUMENTS_BACKFILLED)
    shadow = failing_targets(topo, fail_at=3)
    lease = store.claim(["reshard_backfill"], "w1", 30)
    assert lease is not None
    with pytest.raises(TargetError):
        process_reshard_chunk(store, lease, live, shadow, settings)
    committed = store.get(chunk).progress
    assert 0 < committed["documents_backfilled"] < 200
    assert count(metrics.RESHARD_DOCUMENTS_BACKFILLED) - before == committed["documents_backfilled"]

    report = process_reshard_chunk(store, store.claim_by_id(chunk, "w2", 30), live, shadow, settings)
    assert report.documents == 200 and store.get(chunk).state == JobState.COMPLETED
    assert count(metrics.RESHARD_DOCUMENTS_BACKFILLED) - before == 200
