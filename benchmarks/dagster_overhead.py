"""Dagster overhead per chunk: the worker-pool path against a run launched through the daemon.

Every chunk here is tiny (one small document), so what is measured is what Dagster adds:

* **bare**: claim the chunk and ``process_dump_chunk`` it directly, no Dagster (the baseline);
* **worker pool**: ``miroir_pipeline.dagster.worker_pool.Worker`` claims the chunk and executes
  ``dump_chunk_job`` in-process against the instance (what ``miroir-pipeline worker`` does);
* **daemon launch**: the run is submitted over GraphQL (``DagsterGraphQLClient``) to a real
  ``dagster-webserver`` + ``dagster-daemon`` (QueuedRunCoordinator, dequeue every second,
  DefaultRunLauncher: one process per run) and waited for until it succeeded.

Overhead = median time per chunk minus the bare median. Goal: worker-pool overhead <= 0.5 s
(median). Ratio printed: daemon launch / worker pool. Everything runs on loopback under the
scratch dir (SQLite jobs store and Dagster instance, 3 local node stores); the webserver and
daemon run in their own process group and are stopped by pgid.

    .venv/bin/python benchmarks/dagster_overhead.py [--quick] [--chunks 15] [--launched 8]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import _common as c
import httpx
import yaml

VENV_BIN = Path(sys.executable).parent
LOCATION = "miroir_pipeline"
READY_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 120.0
GOAL_S = 0.5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _setup(root: Path) -> dict[str, str]:
    """Topology, Dagster home and workspace under ``root``; returns the environment to use."""
    topo = {
        "shards": 16,
        "replication_factor": 1,
        "groups": [{"id": 0, "nodes": [{"id": f"node-{i}", "url": f"local://{root / 'nodes' / f'node-{i}'}"} for i in range(3)]}],
    }
    (root / "topology.yaml").write_text(yaml.safe_dump(topo))
    home = root / "dagster"
    home.mkdir()
    config = yaml.safe_load((c.REPO_ROOT / "miroir_pipeline" / "dagster" / "dagster.yaml").read_text())
    config["run_coordinator"]["config"]["dequeue_interval_seconds"] = 1
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    workspace = {
        "load_from": [
            {
                "python_file": {
                    "relative_path": str(c.REPO_ROOT / "definitions.py"),
                    "working_directory": str(c.REPO_ROOT),
                    "location_name": LOCATION,
                }
            }
        ]
    }
    (root / "workspace.yaml").write_text(yaml.safe_dump(workspace))
    env = {
        "DAGSTER_HOME": str(home),
        "MIROIR_HOME": str(root / "miroir"),
        "MIROIR_JOBS_DSN": f"sqlite:///{root / 'jobs.sqlite3'}",
        "MIROIR_TOPOLOGY": str(root / "topology.yaml"),
        "MIROIR_ALLOWED_ROOTS": str(root),
        "MIROIR_STAGING_DIR": str(root / "staging"),
        "MIROIR_DEAD_LETTER_DIR": str(root / "dead-letter"),
        "MIROIR_DISPATCH_ENABLED": "0",  # only the runs this script launches
    }
    os.environ.update(env)
    return env


def _plan(root: Path, name: str, chunks: int) -> list[str]:
    """An import of ``chunks`` one-document chunks; partitions registered by the caller."""
    from miroir_pipeline.dagster.resources import targets_for
    from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import
    from miroir_pipeline.jobs.settings import PipelineSettings, resolve_topology
    from miroir_pipeline.queue import open_store

    dump = root / f"{name}.ndjson"
    lines = [f'{{"id":"{name}-{i:05d}","title":"tiny chunk {i}"}}'.ljust(63) + "\n" for i in range(chunks)]
    dump.write_text("".join(lines))
    topology = resolve_topology()
    store = open_store()
    planned = plan_dump_import(
        store,
        DumpImportRequest(uri=str(dump), index_uid=name, primary_key="id", chunk_size_bytes=64),
        topology,
        targets_for(topology),
        PipelineSettings.from_env(),
    )
    assert len(planned.chunk_ids) == chunks, (len(planned.chunk_ids), chunks)
    return planned.chunk_ids


def measure_bare(root: Path, n: int) -> list[float]:
    from miroir_pipeline.dagster.resources import targets_for
    from miroir_pipeline.fleet.topology import Topology
    from miroir_pipeline.jobs.dump_import import DumpChunkParams, process_dump_chunk
    from miroir_pipeline.jobs.settings import PipelineSettings
    from miroir_pipeline.queue import open_store

    store = open_store()
    settings = PipelineSettings.from_env()
    times = []
    for chunk_id in _plan(root, "bare", n):
        t0 = time.perf_counter()
        lease = store.claim_by_id(chunk_id, "bench-bare", settings.lease_ttl)
        params = DumpChunkParams.model_validate(lease.job.params)
        process_dump_chunk(store, lease, targets_for(Topology.parse(params.topology)), settings)
        times.append(time.perf_counter() - t0)
    return times


def measure_worker_pool(root: Path, n: int) -> list[float]:
    import dagster as dg

    from miroir_pipeline.dagster import miroir_definitions
    from miroir_pipeline.dagster.worker_pool import Worker
    from miroir_pipeline.jobs.settings import PipelineSettings
    from miroir_pipeline.queue import open_store

    store = open_store()
    settings = PipelineSettings.from_env()
    chunk_ids = _plan(root, "pool", n)
    parent = store.get(chunk_ids[0]).parent_job_id
    times = []
    defs = miroir_definitions()
    with dg.DagsterInstance.from_config(os.environ["DAGSTER_HOME"]) as instance:
        for _ in chunk_ids:
            worker = Worker(store, instance, defs, settings, parent_id=parent, max_chunks=1, worker_id="bench-pool")
            t0 = time.perf_counter()
            stats = worker.run()
            times.append(time.perf_counter() - t0)
            if stats.chunks_succeeded != 1:
                raise SystemExit(f"worker-pool chunk run failed: {stats}")
    return times


@contextlib.contextmanager
def _service(name: str, cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, cwd=c.REPO_ROOT, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)


def _wait(what: str, check: Callable[[], bool], timeout: float, procs: list[subprocess.Popen[bytes]], step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a Dagster service exited while waiting for {what}")
        time.sleep(step)
    raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")


def _location_loaded(url: str) -> bool:
    query = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"
    try:
        resp = httpx.post(f"{url}/graphql", json={"query": query}, timeout=5)
        entries = resp.json()["data"]["workspaceOrError"]["locationEntries"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return False
    return any(e["name"] == LOCATION and e["loadStatus"] == "LOADED" for e in entries)


def measure_daemon(root: Path, n: int, env: dict[str, str]) -> tuple[list[float], list[float]]:
    """(submit-to-success latency, in-run time from run start to end) per chunk."""
    import dagster as dg
    from dagster_graphql import DagsterGraphQLClient

    from miroir_pipeline.dagster import MiroirNames

    chunk_ids = _plan(root, "launched", n)
    port = _free_port()
    workspace = str(root / "workspace.yaml")
    latency: list[float] = []
    in_run: list[float] = []
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        instance.add_dynamic_partitions(MiroirNames().partitions("dump_import"), chunk_ids)
        with (
            _service("daemon", [str(VENV_BIN / "dagster-daemon"), "run", "-w", workspace], env, root / "daemon.log") as daemon,
            _service(
                "webserver",
                [str(VENV_BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", workspace],
                env,
                root / "webserver.log",
            ) as web,
        ):
            url = f"http://127.0.0.1:{port}"
            _wait("the webserver to load the code location", lambda: _location_loaded(url), READY_TIMEOUT_S, [daemon, web], 0.5)
            client = DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=30)
            for chunk_id in chunk_ids:
                t0 = time.perf_counter()
                run_id = client.submit_job_execution(MiroirNames().chunk_job("dump_import"), tags={"dagster/partition": chunk_id})

                def finished(run_id: str = run_id) -> bool:
                    run = instance.get_run_by_id(run_id)
                    return run is not None and run.is_finished

                _wait(f"run {run_id} of {chunk_id}", finished, RUN_TIMEOUT_S, [daemon, web])
                latency.append(time.perf_counter() - t0)
                record = instance.get_run_record_by_id(run_id)
                assert record is not None and record.dagster_run.status == dg.DagsterRunStatus.SUCCESS, (
                    f"run {run_id} of {chunk_id} did not succeed; see {root / 'daemon.log'}"
                )
                if record.start_time and record.end_time:
                    in_run.append(record.end_time - record.start_time)
    return latency, in_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=15, help="chunks for the bare and worker-pool paths")
    ap.add_argument("--launched", type=int, default=8, help="chunks launched through the daemon")
    ap.add_argument("--quick", action="store_true", help="6 chunks, 3 launched")
    args = ap.parse_args()
    if args.quick:
        args.chunks, args.launched = 6, 3
    c.header("Dagster overhead per chunk: worker pool (in-process run) vs daemon-launched run", args)
    res = c.Results("dagster_overhead", vars(args))
    with c.scratch_subdir("dagster_overhead") as root:
        env = _setup(root)
        bare = measure_bare(root, args.chunks)
        pool = measure_worker_pool(root, args.chunks)
        launched, in_run = measure_daemon(root, args.launched, env)
    base = c.median(bare)
    pool_m, launched_m = c.median(pool), c.median(launched)
    res.add(path="bare (no Dagster)", chunks=len(bare), median_s=round(base, 3), overhead_s=0.0, all=[round(t, 3) for t in bare])
    res.add(
        path="worker pool (in-process run)",
        chunks=len(pool),
        median_s=round(pool_m, 3),
        overhead_s=round(pool_m - base, 3),
        goal_le_0_5s=pool_m - base <= GOAL_S,
        all=[round(t, 3) for t in pool],
    )
    res.add(
        path="daemon launch (GraphQL submit -> success)",
        chunks=len(launched),
        median_s=round(launched_m, 3),
        overhead_s=round(launched_m - base, 3),
        all=[round(t, 2) for t in launched],
    )
    res.add(
        path="  of which inside the run process",
        chunks=len(in_run),
        median_s=round(c.median(in_run), 3),
        all=[round(t, 2) for t in in_run],
    )
    res.note("daemon path: QueuedRunCoordinator dequeuing every 1 s (shipped default 5 s), DefaultRunLauncher")
    print()
    c.print_table(res.rows, ["path", "chunks", "median_s", "overhead_s", "goal_le_0_5s", "load1"])
    ratio = launched_m / pool_m if pool_m > 0 else float("inf")
    print(f"\n  daemon launch / worker pool (median per chunk): {ratio:.1f}x")
    res.note(f"ratio daemon launch / worker pool = {ratio:.1f}x")
    res.save()


if __name__ == "__main__":
    main()
