"""A worker process SIGKILLed mid-chunk: another worker re-claims after the lease expires and
resumes at the committed cursor; the final document sets are exact, with no duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState
from tests.import_helpers import (
    actual_placement,
    assert_exact_placement,
    expected_placement,
    local_topology,
    make_docs,
    write_dump,
)

REPO = Path(__file__).resolve().parents[2]


def worker_env(root: Path, dsn: str, topo_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "MIROIR_JOBS_DSN": dsn,
            "MIROIR_TOPOLOGY": str(topo_file),
            "MIROIR_ALLOWED_ROOTS": str(root),
            "DAGSTER_HOME": str(root / "dagster"),
            "MIROIR_LEASE_TTL": "2",
            "MIROIR_HEARTBEAT_INTERVAL": "0.5",
            "MIROIR_BATCH_SIZE": "50",
            "MIROIR_READ_BLOCK_BYTES": "16KiB",
        }
    )
    return env


def start_worker(env: dict[str, str], parent: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "miroir_pipeline.cli", "worker", "--parent", parent, "--exit-when-empty"],
        env=env,
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.timeout(180)
def test_sigkill_mid_chunk_resumes_at_cursor(tmp_path: Path) -> None:
    import yaml

    topo = local_topology(tmp_path / "nodes")
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topo.model_dump(mode="json")))
    dsn = f"sqlite:///{tmp_path}/jobs.sqlite3"
    store = open_store(dsn)
    docs = make_docs(20_000, seed=11)
    dump = write_dump(tmp_path / "big.ndjson", docs)
    targets = open_targets(topo)
    settings = PipelineSettings(allowed_roots=[str(tmp_path)], chunk_size_bytes=1 << 30)
    plan = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid="k", primary_key="id"), topo, targets, settings)
    [chunk_id] = plan.chunk_ids
    env = worker_env(tmp_path, dsn, topo_file)
    (tmp_path / "dagster").mkdir()

    victim = start_worker(env, plan.parent.id)
    try:
        deadline = time.monotonic() + 60
        seen = 0
        while time.monotonic() < deadline:
            seen = int(store.get(chunk_id).progress.get("last_cursor", 0))
            if seen > 0 or victim.poll() is not None:
                break
            time.sleep(0.005)
        assert victim.poll() is None, "worker finished before it could be killed; make the chunk bigger"
        assert seen > 0, "worker never committed progress"
        os.killpg(victim.pid, signal.SIGKILL)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    killed_at = int(store.get(chunk_id).progress["last_cursor"])
    assert 0 < killed_at < dump.stat().st_size
    row = store.get(chunk_id)
    assert row.state == JobState.IN_PROGRESS and row.attempts == 1  # lease left behind by the dead worker

    rescuer = start_worker(env, plan.parent.id)
    try:
        _, err = rescuer.communicate(timeout=120)
    finally:
        if rescuer.poll() is None:
            os.killpg(rescuer.pid, signal.SIGKILL)
    assert rescuer.returncode == 0, err.decode()[-2000:]

    row = store.get(chunk_id)
    assert row.state == JobState.COMPLETED and row.attempts == 2
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster")) as instance:
        mats = instance.fetch_materializations(dg.AssetKey(["miroir", "dump_chunk"]), limit=10).records
        resumed = [int(m.asset_materialization.metadata["resumed_from"].value) for m in mats]
        attempts = [int(m.asset_materialization.metadata["attempt"].value) for m in mats]
    assert attempts == [2], "only the rescuing run completes the chunk"
    assert resumed == [killed_at], "the rescuer starts exactly at the committed cursor"

    summary = store.parent_summary(plan.parent.id)
    expected = expected_placement(docs, topo)
    assert summary.progress["docs_routed"] == len(docs)
    assert summary.progress["per_node"] == {n: len(d) for n, d in expected.items()}
    assert_exact_placement(expected, actual_placement(targets, "k"))
