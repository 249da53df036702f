"""Dump import into a real Meilisearch 1.21 fleet: exact placement with 2 replica groups and
with RF 2, and a `.dump` archive made by the real server imported with its settings."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest

from miroir_pipeline.dagster import MiroirNames, miroir_definitions
from miroir_pipeline.dagster.worker_pool import Worker
from miroir_pipeline.fleet.targets.base import RequestRefused
from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import, process_dump_chunk
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState
from tests.import_helpers import (
    actual_placement,
    assert_exact_placement,
    expected_placement,
    make_docs,
    write_dump,
)

pytestmark = pytest.mark.meilisearch


@pytest.fixture(autouse=True)
def jobs_dsn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Chunk runs open the job store from the environment, as deployed workers do."""
    dsn = f"sqlite:///{tmp_path}/jobs.sqlite3"
    monkeypatch.setenv("MIROIR_JOBS_DSN", dsn)
    return dsn


def settings_for(root: Path, **kw: Any) -> PipelineSettings:
    return PipelineSettings(allowed_roots=[str(root)], staging_dir=str(root / "staging"), dead_letter_dir=str(root / "dlq"), **kw)


@pytest.mark.parametrize(
    ("layout", "rf"),
    [([[0, 1], [2, 3]], 1), ([[0, 1, 2]], 2)],
    ids=["two-replica-groups", "rf2"],
)
def test_fleet_import_places_every_document_on_exactly_its_write_targets(
    tmp_path: Path, jobs_dsn: str, meili_fleet: Any, meili_topology: Any, meili_index_uid: str, layout: list[list[int]], rf: int
) -> None:
    procs = meili_fleet(4)
    topo = meili_topology(procs, shards=16, replication_factor=rf, groups=layout)
    used = {n.id for n in topo.all_nodes()}
    store = open_store(jobs_dsn)
    docs = make_docs(2500, seed=21)
    dump = write_dump(tmp_path / "fleet.ndjson", docs)
    targets = open_targets(topo)
    settings = settings_for(tmp_path, chunk_size_bytes=48 * 1024, batch_size=400)
    plan = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid=meili_index_uid, primary_key="id"), topo, targets, settings)
    assert len(plan.chunk_ids) >= 3
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(MiroirNames().partitions("dump_import"), plan.chunk_ids)
        stats = Worker(store, instance, miroir_definitions(), settings, parent_id=plan.parent.id, exit_when_empty=True).run()
    assert stats.chunks_failed == 0
    summary = store.parent_summary(plan.parent.id)
    assert summary.parent.state == JobState.COMPLETED
    expected = expected_placement(docs, topo)
    assert set(expected) == used
    assert summary.progress["per_node"] == {n: len(d) for n, d in expected.items()}
    actual = actual_placement(targets, meili_index_uid)
    assert_exact_placement(expected, actual)
    for node_id, target in targets.items():
        assert target.count_documents(meili_index_uid) == len(expected[node_id])
        assert "_miroir_shard" in target.get_settings(meili_index_uid)["filterableAttributes"]


def _wait_task(client: httpx.Client, task_uid: int) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        task = client.get(f"/tasks/{task_uid}").json()
        if task["status"] in ("succeeded", "failed", "canceled"):
            assert task["status"] == "succeeded", task
            return dict(task)
        time.sleep(0.05)
    raise AssertionError(f"task {task_uid} did not finish")


def test_real_meilisearch_dump_archive_imports_with_its_settings_and_primary_key(
    tmp_path: Path, jobs_dsn: str, meili_fleet: Any, meili_topology: Any, meili_index_uid: str
) -> None:
    [source] = meili_fleet(1, dedicated=True)
    movies = [{"movie_id": f"m-{i}", "title": f"Film {i} — ☃", "genre": ["drama", "comedy"][i % 2], "year": 1950 + i % 70} for i in range(700)]
    movies += [{"movie_id": 100000 + i, "title": f"Integer id {i}", "genre": "noir", "year": 2000} for i in range(300)]
    with httpx.Client(base_url=source.url, headers={"Authorization": f"Bearer {source.master_key}"}, timeout=30) as c:
        _wait_task(c, c.post("/indexes", json={"uid": "movies", "primaryKey": "movie_id"}).json()["taskUid"])
        _wait_task(c, c.patch("/indexes/movies/settings", json={"filterableAttributes": ["genre", "year"], "sortableAttributes": ["year"]}).json()["taskUid"])
        _wait_task(c, c.post("/indexes/movies/documents", json=movies).json()["taskUid"])
        done = _wait_task(c, c.post("/dumps").json()["taskUid"])
    dump_uid = done["details"]["dumpUid"]
    archive = source.data_dir / "dumps" / f"{dump_uid}.dump"
    assert archive.exists()

    procs = meili_fleet(3)
    topo = meili_topology(procs, shards=8, replication_factor=1)
    store = open_store(jobs_dsn)
    targets = open_targets(topo)
    settings = settings_for(source.data_dir, chunk_size_bytes=32 * 1024)
    settings = settings.model_copy(update={"staging_dir": str(tmp_path / "staging")})
    plan = plan_dump_import(store, DumpImportRequest(uri=str(archive), index_uid="movies"), topo, targets, settings)
    assert plan.primary_key == "movie_id"
    while (lease := store.claim(["dump_import"], "w", 30)) is not None:
        process_dump_chunk(store, lease, {**targets}, settings)
    assert store.get(plan.parent.id).state == JobState.COMPLETED

    # The archive's index is "movies"; this test's fleet uses the same uid, so clean it up here.
    try:
        expected = expected_placement(movies, topo, pk="movie_id")
        assert_exact_placement(expected, actual_placement(targets, "movies", pk="movie_id"))
        for target in targets.values():
            assert target.get_primary_key("movies") == "movie_id"
            s = target.get_settings("movies")
            assert {"genre", "year", "_miroir_shard"} <= set(s["filterableAttributes"])
            assert s["sortableAttributes"] == ["year"]
    finally:
        for target in targets.values():
            target.delete_index("movies")


@pytest.mark.parametrize("fault", ["wrong-api-key", "payload-over-the-node-limit"])
def test_a_request_the_node_refuses_as_configured_fails_the_chunk_at_once(
    tmp_path: Path, jobs_dsn: str, meili_fleet: Any, meili_topology: Any, meili_index_uid: str,
    monkeypatch: pytest.MonkeyPatch, fault: str,
) -> None:
    """A 401 (the key was rotated after planning) or a 413 (the topology claims a larger payload
    limit than the node takes) would be refused again on every retry: the chunk fails for good
    on its first attempt, naming the node and what to fix, and never the key."""
    if fault == "wrong-api-key":
        [proc] = meili_fleet(1)
        topo = meili_topology([proc])
    else:
        [proc] = meili_fleet(1, extra_args=["--http-payload-size-limit", "16KiB"])
        topo = meili_topology([proc], payload_limit_bytes=1_000_000)
    store = open_store(jobs_dsn)
    dump = write_dump(tmp_path / "d.ndjson", make_docs(3000, seed=5))
    settings = settings_for(tmp_path, max_attempts=5)
    plan = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid=meili_index_uid, primary_key="id"), topo, open_targets(topo), settings)
    wrong_key = "rotated-" + proc.master_key[::-1]
    if fault == "wrong-api-key":
        monkeypatch.setenv(topo.all_nodes()[0].api_key_env, wrong_key)
    targets = open_targets(topo)
    lease = store.claim(["dump_import"], "w", 30)
    assert lease is not None
    with pytest.raises(RequestRefused) as refused:
        process_dump_chunk(store, lease, targets, settings)
    row = store.get(lease.job_id)
    assert row.state == JobState.FAILED and row.attempts == 1, "a refusal a retry cannot change is not retried"
    assert store.get(plan.parent.id).state == JobState.FAILED
    assert row.error is not None and "node meili-0" in row.error
    if fault == "wrong-api-key":
        assert refused.value.status in (401, 403)
        assert f"check the node's API key (environment variable {topo.all_nodes()[0].api_key_env})" in row.error
        assert wrong_key not in row.error and proc.master_key not in row.error
    else:
        assert refused.value.status == 413
        assert "set payload_limit_bytes of this node in the topology" in row.error
        # A retry would send the same bodies: the chunk keeps the topology it was planned with.
        assert "plan the import or reshard again" in row.error and "retry the chunk" not in row.error
