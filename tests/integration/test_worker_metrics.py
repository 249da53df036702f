"""A worker serves its own /metrics: queue depth, claims and chunk durations."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import httpx
from prometheus_client.parser import text_string_to_metric_families

from miroir_pipeline.dagster import miroir_definitions
from miroir_pipeline.dagster.worker_pool import Worker
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.metrics import start_metrics_server
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import NewChunk


def _samples(url: str, name: str) -> dict[str, float]:
    text = httpx.get(url, timeout=10).text
    return {
        s.labels.get("job_type", ""): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def test_worker_serves_queue_depth_and_claims(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/jobs.sqlite3")
    parent = store.enqueue("dump_import", {})
    store.split(parent.id, [NewChunk(i, {}) for i in range(3)])
    server = start_metrics_server(0)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with dg.instance_for_test() as instance:
            # A reshard-only worker finds nothing to do and exits, having published the depth.
            worker = Worker(
                store,
                instance,
                miroir_definitions(),
                PipelineSettings(),
                job_types=("reshard_backfill",),
                exit_when_empty=True,
            )
            worker.run()
        depth = _samples(url, "miroir_background_queue_depth")
        assert depth == {"dump_import": 3.0, "reshard_backfill": 0.0}
        assert "miroir_chunk_claims_total" in httpx.get(url, timeout=10).text
    finally:
        server.shutdown()
        server.server_close()
        store.close()
