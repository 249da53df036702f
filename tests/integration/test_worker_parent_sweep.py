"""A pool worker that always finds work still completes a parent a crash left in progress."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from miroir_pipeline.dagster import MiroirNames, miroir_definitions
from miroir_pipeline.dagster.worker_pool import Worker
from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState
from tests.conformance.test_jobstore import strand_parent
from tests.import_helpers import local_topology, make_docs, write_dump


def test_a_busy_pool_worker_completes_a_parent_left_in_progress(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's claims all find work, so no empty claim repairs the stranded parent; the
    worker's own periodic sweep must, without the dispatch sensor."""
    # The chunk run opens its store from the environment, as a deployed code location does.
    monkeypatch.setenv("MIROIR_JOBS_DSN", pg_dsn)
    monkeypatch.setenv("MIROIR_ALLOWED_ROOTS", str(tmp_path))
    monkeypatch.setenv("MIROIR_DEAD_LETTER_DIR", str(tmp_path / "dlq"))
    monkeypatch.setenv("MIROIR_STAGING_DIR", str(tmp_path / "staging"))
    store = open_store(pg_dsn)
    try:
        stranded = strand_parent(store, monkeypatch)
        assert stranded is not None  # Postgres checks the parent after the chunk's commit
        root = tmp_path
        topo = local_topology(root / "nodes", groups=1, rf=1)
        dump = write_dump(root / "dump.ndjson", make_docs(600))
        settings = PipelineSettings(
            allowed_roots=[str(root)],
            staging_dir=str(root / "staging"),
            dead_letter_dir=str(root / "dlq"),
            chunk_size_bytes=16 * 1024,
            batch_size=100,
        )
        targets: Any = open_targets(topo)
        plan = plan_dump_import(
            store, DumpImportRequest(uri=str(dump), index_uid="products", primary_key="id"), topo, targets, settings
        )
        assert len(plan.chunk_ids) > 1  # work is left after the worker's one chunk
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions(MiroirNames().partitions("dump_import"), plan.chunk_ids)
            worker = Worker(store, instance, miroir_definitions(), settings, max_chunks=1)
            stats = worker.run()
        assert stats.chunks_succeeded == 1
        assert store.get(stranded.id).state == JobState.COMPLETED
        assert store.get(plan.parent.id).state == JobState.IN_PROGRESS  # its chunks are not all done
    finally:
        store.close()
