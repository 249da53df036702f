"""Faults with a full window of enqueued batches, on real Meilisearch nodes slowed to one task
per indexing batch so that each node's queue fills up to the byte-bounded window; every test
waits until a node lists that queue before striking.

1. Worker SIGKILLed: the nodes hold batches past the committed cursor; a second worker resumes
   at that cursor and the placement is exact (latest version wins).
2. Worker SIGTERMed: it hands the chunk back at the acknowledged cursor at once, without
   waiting for the nodes to index the window; the rescuer's placement is exact.
3. Node SIGKILLed: the tasks it had accepted survive its restart, the import rides the outage
   out, nothing it had not acknowledged is committed meanwhile; the placement is exact.
4. A task failing mid-window: under ``fail`` the cursor stops at the batch holding the refused
   document and everything before it is placed; under ``skip`` it is dead-lettered and the
   rest placed exactly. The refusing node is held busy by a large task of another index while
   the window fills, so the refused batch is enqueued behind it with later batches after it,
   whatever the machine's load (a bare node indexes small batches about as fast as they come).

In 1-3 the window waits on meili-0 behind a large task of another index, enqueued once a quarter
of the dump is committed; only tasks queued behind it count towards a full window. Without it a
busy machine slows the worker more than the node, which then never falls ``FULL`` tasks behind.

Every commit sampled from the jobs table is also checked against the tasks each node had
finished by then: a commit never covers documents a node had not acknowledged.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from bisect import bisect_right
from dataclasses import dataclass
from datetime import datetime
from itertools import accumulate
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import orjson
import pytest

from miroir_pipeline.fleet.routing import shard_for_key, write_targets
from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.dump_import import (
    DumpImportRequest,
    InvalidDocumentError,
    plan_dump_import,
    process_dump_chunk,
)
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState, JobStore
from tests.failure.conftest import (
    WorkerProc,
    Workers,
    settings_for,
    wait_for,
    worker_env,
    write_topology,
)
from tests.fixtures.meilisearch import MeiliProcess
from tests.import_helpers import (
    actual_placement,
    assert_exact_placement,
    expected_placement,
    make_docs,
    write_dump,
)

pytestmark = [pytest.mark.meilisearch, pytest.mark.slow]

#: One task per indexing batch: a node falls behind the pipeline and its queue grows.
SLOW_NODES = ("--experimental-max-number-of-batched-tasks", "1")
#: Every 32 KiB block becomes a batch (~64 KiB routed to two replica groups); the window
#: (memory buffer minus one batch) holds about 14 of them.
BLOCK = 32 * 1024
MEMORY = 1024 * 1024
BATCH_BYTES = 128 * 1024
#: Tasks enqueued or processing on the slowest node that make a window "full".
FULL = 8
#: Documents of the task that holds a node's queue (a few seconds of indexing).
BLOCKER_DOCS = 40_000
#: Refused by a node once ``_geo`` is filterable; the router's pre-filters let it through.
GEO_BAD = b'{"id":"geo_bad","_geo":{"lat":"north","lng":2}}'


def window_settings(root: Path, **kw: Any) -> PipelineSettings:
    return settings_for(
        root,
        chunk_size_bytes=1 << 30,
        batch_size=50,
        read_block_bytes=BLOCK,
        memory_buffer_bytes=MEMORY,
        batch_bytes=BATCH_BYTES,
        **kw,
    )


def fleet(meili_fleet: Any, meili_topology: Any) -> tuple[list[MeiliProcess], Topology]:
    """Three slow nodes: group 0 is meili-0 alone (every shard), group 1 splits them."""
    procs = meili_fleet(3, extra_args=SLOW_NODES)
    return procs, meili_topology(procs, shards=16, groups=[[0], [1, 2]])


def versioned_docs(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` documents; after every fifth, a second version of one 1000 lines back."""
    docs = make_docs(n, seed=seed)
    lines: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        lines.append(doc)
        if i % 5 == 4 and i >= 1000:
            old = docs[i - 1000]
            lines.append({**old, "title": f"{old['title']} v2", "version": 2})
    return lines


def routed_per_node(docs: list[dict[str, Any]], topology: Topology) -> dict[str, int]:
    """Documents (every line, versions included) the routing formula sends to each node."""
    counts = {n.id: 0 for n in topology.all_nodes()}
    for doc in docs:
        for node in write_targets(shard_for_key(doc["id"], topology.shards), topology):
            counts[node] += 1
    return counts


# -- what a node says -------------------------------------------------------------------------


def node_tasks(proc: MeiliProcess, index_uid: str, **filters: str) -> list[dict[str, Any]]:
    """The node's document-addition tasks of the index (``filters`` go to ``GET /tasks``)."""
    params: dict[str, Any] = {
        "indexUids": index_uid,
        "types": "documentAdditionOrUpdate",
        "limit": 1000,
        **filters,
    }
    tasks: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {proc.master_key}"}
    with httpx.Client(base_url=proc.url, headers=headers, timeout=10.0) as client:
        while True:
            resp = client.get("/tasks", params=params)
            resp.raise_for_status()
            body = resp.json()
            tasks.extend(body["results"])
            if body.get("next") is None:
                return sorted(tasks, key=lambda t: int(t["uid"]))
            params["from"] = body["next"]


def queued(proc: MeiliProcess, index_uid: str) -> list[int]:
    """Uids of the node's tasks of the index not yet finished (enqueued or processing)."""
    return [int(t["uid"]) for t in node_tasks(proc, index_uid, statuses="enqueued,processing")]


def at(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def acknowledged(tasks: list[dict[str, Any]]) -> int:
    return sum(int(t["details"]["receivedDocuments"]) for t in tasks if t["status"] == "succeeded")


@functools.lru_cache(maxsize=4)
def blocker_body(documents: int) -> bytes:
    """The blocker's NDJSON, built once: on a loaded box building it takes long enough for the
    import to run on, so it is ready before the moment it must be enqueued."""
    return b"".join(
        orjson.dumps({"id": i, "text": f"blocker {i} " + "lorem ipsum dolor sit amet " * 8}) + b"\n"
        for i in range(documents)
    )


def occupy(proc: MeiliProcess, documents: int, *, started: bool = True) -> int:
    """Enqueue one large addition to an index of its own on ``proc`` and return its task uid
    (with ``started``, once the node is processing it): tasks enqueued after it queue up
    behind it until it is done."""
    headers = {"Authorization": f"Bearer {proc.master_key}", "Content-Type": "application/x-ndjson"}
    body = blocker_body(documents)
    with httpx.Client(base_url=proc.url, headers=headers, timeout=30.0) as client:
        resp = client.post("/indexes/window_blocker/documents", params={"primaryKey": "id"}, content=body)
        resp.raise_for_status()
        uid = int(resp.json()["taskUid"])

        def processing() -> bool:
            task = client.get(f"/tasks/{uid}")
            task.raise_for_status()
            return str(task.json()["status"]) != "enqueued"

        if started:
            wait_for(processing, 60, f"the blocker task {uid} to start on {proc.url}", interval=0.01)
    return uid



# -- what the jobs table says -----------------------------------------------------------------


class CommitWatcher:
    """Samples a chunk row's committed progress (with the wall time after each read)."""

    def __init__(self, dsn: str, chunk_id: str) -> None:
        self.dsn, self.chunk_id = dsn, chunk_id
        self.samples: list[tuple[float, int, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commit-watcher", daemon=True)

    def _run(self) -> None:
        store = open_store(self.dsn)
        try:
            while not self._stop.is_set():
                progress = store.get(self.chunk_id).progress
                self.samples.append(
                    (
                        time.time(),
                        int(progress.get("last_cursor", 0)),
                        {n: int(c) for n, c in progress.get("per_node", {}).items()},
                    )
                )
                self._stop.wait(0.01)
        finally:
            store.close()

    def __enter__(self) -> CommitWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def assert_commits_trail_acknowledgements(
    samples: list[tuple[float, int, dict[str, int]]], tasks_by_node: dict[str, list[dict[str, Any]]]
) -> None:
    """No sampled commit counts more documents for a node than the node had acknowledged
    (tasks ``succeeded`` with ``finishedAt`` before the sample was read)."""
    assert samples, "no commit was sampled"
    for node, tasks in tasks_by_node.items():
        done = sorted(
            (at(t["finishedAt"]), int(t["details"]["receivedDocuments"]))
            for t in tasks
            if t["status"] == "succeeded"
        )
        finished = [d[0] for d in done]
        total = list(accumulate(d[1] for d in done))
        for when, cursor, per_node in samples:
            k = bisect_right(finished, when)
            acked = total[k - 1] if k else 0
            assert per_node.get(node, 0) <= acked, (
                f"cursor {cursor} committed {per_node[node]} documents of {node} when the node "
                f"had acknowledged {acked}"
            )


# -- a worker's import with a full window ---------------------------------------------------


@dataclass
class WorkerImport:
    """One planned single-chunk import into the slow fleet, and the worker environment for it."""

    uid: str
    procs: list[MeiliProcess]
    topo: Topology
    dsn: str
    store: JobStore
    docs: list[dict[str, Any]]
    size: int
    targets: dict[str, Any]
    chunk: str
    env: dict[str, str]
    args: tuple[str, ...]

    def start(self, workers: Workers, name: str) -> WorkerProc:
        return workers.start(self.env, name, *self.args)

    def wait_window_full(self, worker: WorkerProc, window: list[int], *, hold: bool = False) -> None:
        """Until ``worker`` committed a quarter of the dump and meili-0 lists ``FULL`` queued
        tasks (kept in ``window``); fails if the import ended first. With ``hold``, a large
        task of another index is enqueued on meili-0 once a quarter is committed, and only
        tasks queued behind it count: they stay unacknowledged for as long as it runs, however
        fast the node indexes small batches and however slowly the test's next step comes."""
        blocker: list[int] = []
        if hold:
            blocker_body(BLOCKER_DOCS)

        def full() -> bool:
            row = self.store.get(self.chunk)
            if not worker.alive() or row.state not in (JobState.QUEUED, JobState.IN_PROGRESS):
                return True  # over before the window filled: said below
            if row.claimed_by != worker.name or int(row.progress.get("last_cursor", 0)) < self.size // 4:
                return False
            if hold and not blocker:
                blocker.append(occupy(self.procs[0], BLOCKER_DOCS, started=False))
            window[:] = [u for u in queued(self.procs[0], self.uid) if not blocker or u > blocker[0]]
            return len(window) >= FULL

        wait_for(full, 90, f"{FULL} tasks queued on meili-0, a quarter of the dump committed", interval=0.05)
        assert worker.alive(), worker.output()[-3000:]
        assert self.store.get(self.chunk).state == JobState.IN_PROGRESS, "the import ended first"


def worker_import(tmp_path: Path, meili_fleet: Any, meili_topology: Any, uid: str, seed: int) -> WorkerImport:
    procs, topo = fleet(meili_fleet, meili_topology)
    dsn = f"sqlite:///{tmp_path}/jobs.sqlite3"
    store = open_store(dsn)
    docs = versioned_docs(12_000, seed=seed)
    dump = write_dump(tmp_path / "dump.ndjson", docs)
    targets = open_targets(topo)
    settings = window_settings(tmp_path)
    request = DumpImportRequest(uri=str(dump), index_uid=uid, primary_key="id")
    plan = plan_dump_import(store, request, topo, targets, settings)
    [chunk] = plan.chunk_ids
    env = worker_env(
        tmp_path,
        dsn,
        write_topology(tmp_path / "topology.yaml", topo),
        MIROIR_BATCH_SIZE=str(settings.batch_size),
        MIROIR_READ_BLOCK_BYTES=str(BLOCK),
        MIROIR_MEMORY_BUFFER_BYTES=str(MEMORY),
        MIROIR_BATCH_BYTES=str(BATCH_BYTES),
    )
    args = ("--parent", plan.parent.id, "--exit-when-empty")
    return WorkerImport(uid, procs, topo, dsn, store, docs, dump.stat().st_size, targets, chunk, env, args)


# -- 1. the worker dies -------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_worker_sigkilled_with_a_full_window_resumes_at_the_cursor_with_exact_placement(
    tmp_path: Path, workers: Workers, meili_fleet: Any, meili_topology: Any
) -> None:
    imp = worker_import(tmp_path, meili_fleet, meili_topology, "window_kill", seed=41)
    procs, topo, store, docs, size, chunk, uid = imp.procs, imp.topo, imp.store, imp.docs, imp.size, imp.chunk, imp.uid
    nodes = {f"meili-{i}": p for i, p in enumerate(procs)}

    with CommitWatcher(imp.dsn, chunk) as watcher:
        first = imp.start(workers, "first")
        window: list[int] = []
        imp.wait_window_full(first, window, hold=True)
        first.kill()
        killed = store.get(chunk)
        assert killed.state == JobState.IN_PROGRESS and killed.attempts == 1
        assert killed.claimed_by == "first", "the dead worker's lease is still on the row"
        cursor = int(killed.progress["last_cursor"])
        assert 0 < cursor < size

        # The node keeps what the dead worker enqueued and indexes it: batches past the cursor.
        wait_for(lambda: not any(queued(p, uid) for p in procs), 60, "the nodes to go idle")
        for node, proc in nodes.items():
            tasks = node_tasks(proc, uid)
            assert all(t["status"] == "succeeded" for t in tasks), [t["error"] for t in tasks]
            assert acknowledged(tasks) > killed.progress["per_node"][node], (
                f"{node} acknowledged nothing past the committed cursor: no window in flight"
            )

        rescuer = imp.start(workers, "rescuer")
        rescuer.proc.wait(timeout=90)
    assert rescuer.proc.returncode == 0, rescuer.output()[-3000:]

    row = store.get(chunk)
    assert row.state == JobState.COMPLETED and row.attempts == 2 and row.claimed_by == "rescuer"
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster")) as instance:
        records = instance.fetch_materializations(
            dg.AssetKey(["miroir", "dump_chunk"]), limit=10
        ).records
        meta = [r.asset_materialization.metadata for r in records if r.asset_materialization]
    assert [int(m["attempt"].value) for m in meta] == [2], "only the rescuer completes it"
    assert [int(m["resumed_from"].value) for m in meta] == [cursor], "resumed at the cursor"

    assert row.progress["last_cursor"] == size and row.progress["docs_routed"] == len(docs)
    assert row.progress["per_node"] == routed_per_node(docs, topo)
    assert_exact_placement(expected_placement(docs, topo), actual_placement(imp.targets, uid))
    assert_commits_trail_acknowledgements(
        watcher.samples, {n: node_tasks(p, uid) for n, p in nodes.items()}
    )
    print(
        f"\nkilled with {len(window)} tasks queued on meili-0, cursor {cursor}/{size}; "
        f"{len(watcher.samples)} commit samples"
    )


# -- 2. the worker is told to stop -------------------------------------------------------------


@pytest.mark.timeout(120)
def test_sigterm_with_a_full_window_hands_back_at_once_and_the_rescuer_places_exactly(
    tmp_path: Path, workers: Workers, meili_fleet: Any, meili_topology: Any
) -> None:
    """A drain does not wait for the nodes to index the window: the chunk is handed back at
    the acknowledged cursor while meili-0 still holds batches past it, which the rescuer sends
    again after them, and the run's failure names that cursor (not the last batch sent)."""
    imp = worker_import(tmp_path, meili_fleet, meili_topology, "window_drain", seed=43)
    procs, topo, store, docs, size, chunk, uid = imp.procs, imp.topo, imp.store, imp.docs, imp.size, imp.chunk, imp.uid

    with CommitWatcher(imp.dsn, chunk) as watcher:
        first = imp.start(workers, "first")
        imp.wait_window_full(first, [], hold=True)
        first.proc.send_signal(signal.SIGTERM)  # the worker alone, as the kubelet sends it
        assert first.proc.wait(timeout=30) == 0, first.output()[-3000:]
        released = store.get(chunk)
        assert released.state == JobState.QUEUED and released.claimed_by is None, released
        assert released.attempts == 0, "a hand-back must not count as an attempt"
        cursor = int(released.progress["last_cursor"])
        assert 0 < cursor < size

        # The batches in flight at the drain were not waited for: meili-0 indexes them after
        # the hand-back, past the cursor the worker committed.
        wait_for(lambda: not any(queued(p, uid) for p in procs), 60, "the nodes to go idle")
        assert acknowledged(node_tasks(procs[0], uid)) > released.progress["per_node"]["meili-0"], (
            "meili-0 acknowledged nothing past the handed-back cursor: the drain waited for the window"
        )

        rescuer = imp.start(workers, "rescuer")
        rescuer.proc.wait(timeout=90)
    assert rescuer.proc.returncode == 0, rescuer.output()[-3000:]

    row = store.get(chunk)
    assert row.state == JobState.COMPLETED and row.attempts == 1 and row.claimed_by == "rescuer"
    assert row.progress["last_cursor"] == size and row.progress["docs_routed"] == len(docs)
    assert row.progress["per_node"] == routed_per_node(docs, topo)
    assert_exact_placement(expected_placement(docs, topo), actual_placement(imp.targets, uid))
    assert_commits_trail_acknowledgements(
        watcher.samples, {f"meili-{i}": node_tasks(p, uid) for i, p in enumerate(procs)}
    )
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster")) as instance:
        failures = [
            e.dagster_event.step_failure_data.error.message  # type: ignore[union-attr]
            for run in instance.get_runs()
            for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
        ]
    assert len(failures) == 1 and f"handed back at byte {cursor}: worker first received signal 15" in failures[0], (
        failures
    )


# -- 3. a node dies ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_node_sigkilled_with_a_full_window_keeps_its_tasks_and_the_import_rides_it_out(
    tmp_path: Path, meili_fleet: Any, meili_topology: Any
) -> None:
    procs, topo = fleet(meili_fleet, meili_topology)
    nodes = {f"meili-{i}": p for i, p in enumerate(procs)}
    victim, survivors = procs[0], procs[1:]
    uid = "window_outage"
    dsn = f"sqlite:///{tmp_path}/jobs.sqlite3"
    store = open_store(dsn)
    # A retry budget (at least 50 s of backoff) that outlasts the outage.
    targets = open_targets(
        topo, meilisearch_options={"max_retries": 200, "backoff_base": 0.05, "backoff_cap": 0.5}
    )
    docs = versioned_docs(12_000, seed=42)
    dump = write_dump(tmp_path / "dump.ndjson", docs)
    size = dump.stat().st_size
    settings = window_settings(tmp_path, lease_ttl=5.0, heartbeat_interval=1.0)
    request = DumpImportRequest(uri=str(dump), index_uid=uid, primary_key="id")
    plan = plan_dump_import(store, request, topo, targets, settings)
    [chunk] = plan.chunk_ids
    lease = store.claim(["dump_import"], "rider", settings.lease_ttl)
    assert lease is not None
    errors: list[BaseException] = []

    def run() -> None:
        try:
            process_dump_chunk(store, lease, targets, settings)
        except BaseException as exc:
            errors.append(exc)

    rider = threading.Thread(target=run, name="rider", daemon=True)
    blocker_body(BLOCKER_DOCS)
    with CommitWatcher(dsn, chunk) as watcher:
        rider.start()
        window: list[int] = []
        blocker: list[int] = []

        def window_full() -> bool:
            if not rider.is_alive():
                return True
            if int(store.get(chunk).progress.get("last_cursor", 0)) < size // 4:
                return False
            if not blocker:  # the window queues up behind it (see wait_window_full)
                blocker.append(occupy(victim, BLOCKER_DOCS, started=False))
            window[:] = [u for u in queued(victim, uid) if u > blocker[0]]
            return len(window) >= FULL

        wait_for(
            window_full,
            90,
            f"{FULL} tasks queued on meili-0, a quarter of the dump committed",
            interval=0.05,
        )
        assert rider.is_alive(), errors or "the import ended before the window filled"
        killed_at = time.time()
        victim.kill()

        # The survivors index what they were sent and go quiet: the chunk waits on meili-0.
        quiet_since = [time.monotonic()]

        def stalled() -> bool:
            if any(queued(p, uid) for p in survivors):
                quiet_since[0] = time.monotonic()
            return time.monotonic() - quiet_since[0] >= 1.0

        wait_for(stalled, 60, "the survivors to go idle", interval=0.1)
        during = store.get(chunk)
        assert during.state == JobState.IN_PROGRESS and during.attempts == 1, during.error
        restarted_at = time.time()
        victim.start()
        rider.join(timeout=90)
    assert not rider.is_alive(), "the import did not finish after the node came back"
    assert not errors, errors[0]

    # Every task meili-0 had accepted survived the SIGKILL and was indexed after the restart.
    tasks = {n: node_tasks(p, uid) for n, p in nodes.items()}
    by_uid = {int(t["uid"]): t for t in tasks["meili-0"]}
    assert set(window) <= by_uid.keys(), "the node lost tasks it had accepted"
    assert all(by_uid[u]["status"] == "succeeded" for u in window), [by_uid[u] for u in window]
    survived = [u for u in window if at(by_uid[u]["finishedAt"]) > restarted_at]
    assert len(survived) >= FULL // 2, f"only {survived} of {window} were left for the restart"
    # While it was down, no commit covered what it had not acknowledged before the kill.
    before_kill = acknowledged([t for t in tasks["meili-0"] if at(t["finishedAt"]) < killed_at])
    outage = [s[2].get("meili-0", 0) for s in watcher.samples if killed_at <= s[0] <= restarted_at]
    assert outage, "no commit was sampled during the outage"
    assert max(outage) <= before_kill, (
        f"{max(outage)} documents of meili-0 committed while it was down; it had acknowledged "
        f"{before_kill} before the kill"
    )
    assert_commits_trail_acknowledgements(watcher.samples, tasks)

    row = store.get(chunk)
    assert row.state == JobState.COMPLETED and row.attempts == 1, "the retry budget ran out"
    assert row.progress["docs_routed"] == len(docs)
    assert row.progress["per_node"] == routed_per_node(docs, topo)
    assert_exact_placement(expected_placement(docs, topo), actual_placement(targets, uid))
    print(
        f"\nmeili-0 killed with {len(window)} tasks queued, down "
        f"{restarted_at - killed_at:.1f}s; {len(survived)} indexed after its restart"
    )


# -- 4. a task fails ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_task_failing_mid_window_is_never_passed_by_the_cursor(
    policy: str, tmp_path: Path, meili_fleet: Any, meili_topology: Any
) -> None:
    procs, topo = fleet(meili_fleet, meili_topology)
    nodes = {f"meili-{i}": p for i, p in enumerate(procs)}
    uid = "window_refusal"
    targets = open_targets(topo)
    for target in targets.values():  # the node validates _geo only once it is filterable
        target.ensure_index(uid, "id", {"filterableAttributes": ["_geo"]})
    dsn = f"sqlite:///{tmp_path}/jobs.sqlite3"
    store = open_store(dsn)
    good = make_docs(12_000, seed=43)
    lines = [orjson.dumps(d) for d in good]
    # The refused document sits in the third block: two acknowledged batches come before it,
    # and the rest of the window (about 14 batches) is enqueued behind it.
    bad_at = next(i for i, end in enumerate(accumulate(len(x) + 1 for x in lines)) if end >= 2 * BLOCK + BLOCK // 2)
    lines.insert(bad_at, GEO_BAD)
    data = b"\n".join(lines) + b"\n"
    dump = tmp_path / "dump.ndjson"
    dump.write_bytes(data)
    bad_offset, bad_line = sum(len(x) + 1 for x in lines[:bad_at]), bad_at + 1
    refusing = write_targets(shard_for_key("geo_bad", topo.shards), topo)
    settings = window_settings(tmp_path)
    request = DumpImportRequest(
        uri=str(dump), index_uid=uid, primary_key="id", on_invalid_document=policy
    )
    plan = plan_dump_import(store, request, topo, targets, settings)
    [chunk] = plan.chunk_ids
    lease = store.claim(["dump_import"], "w", settings.lease_ttl)
    assert lease is not None

    occupy(nodes["meili-0"], BLOCKER_DOCS)
    with CommitWatcher(dsn, chunk) as watcher:
        if policy == "fail":
            with pytest.raises(InvalidDocumentError) as caught:
                process_dump_chunk(store, lease, targets, settings)
        else:
            report = process_dump_chunk(store, lease, targets, settings)
    wait_for(lambda: not any(queued(p, uid) for p in procs), 60, "the nodes to go idle")
    tasks = {n: node_tasks(p, uid) for n, p in nodes.items()}

    # meili-0 refused the document with later batches of the window already queued behind it.
    failed = [t for t in tasks["meili-0"] if t["status"] == "failed"]
    assert "meili-0" in refusing and failed, "meili-0 never failed a task"
    first = failed[0]
    assert first["error"]["code"] == "invalid_document_geo_field", first["error"]
    behind = [
        t
        for t in tasks["meili-0"]
        if t["uid"] > first["uid"] and at(t["enqueuedAt"]) < at(first["finishedAt"])
    ]
    assert len(behind) >= FULL // 2, f"only {len(behind)} batches queued behind the failed task"
    assert_commits_trail_acknowledgements(watcher.samples, tasks)
    held = actual_placement(targets, uid)
    assert not any("geo_bad" in docs for docs in held.values()), "the refused document landed"

    row = store.get(chunk)
    if policy == "fail":
        message = str(caught.value)
        assert f"line {bad_line}, byte offset {bad_offset}" in message, message
        assert "latitude" in message.lower(), message
        assert row.state == JobState.FAILED and row.attempts == 1
        assert store.claim(["dump_import"], "again", 30) is None, "a refused document is final"
        committed = int(row.progress.get("last_cursor", 0))
        # The cursor stops at the start of the batch holding the document, never past it.
        assert 0 < committed <= bad_offset and bad_offset - committed < BLOCK, committed
        assert data[committed - 1 : committed] == b"\n"
        assert max(s[1] for s in watcher.samples) <= committed
        committed_docs = good[: data.count(b"\n", 0, committed)]
        assert row.progress["per_node"] == routed_per_node(committed_docs, topo)
        # Everything before the document is placed; what the window sent past it is placed
        # right; nothing else is anywhere.
        before, everything = expected_placement(good[:bad_at], topo), expected_placement(good, topo)
        for node in nodes:
            missing = before[node].keys() - held[node].keys()
            assert not missing, f"{node} misses {len(missing)}, e.g. {sorted(missing)[:5]}"
            extra = held[node].keys() - everything[node].keys()
            assert not extra, f"{node} holds {len(extra)} it should not, e.g. {sorted(extra)[:5]}"
            assert all(d == everything[node][k] for k, d in held[node].items())
        ahead = held["meili-0"].keys() - before["meili-0"].keys()
        assert ahead, "the window sent nothing past the refused document"
    else:
        assert row.state == JobState.COMPLETED and row.attempts == 1
        assert report.invalid_documents == 1 and report.documents == len(good)
        assert row.progress["invalid_documents"] == 1
        assert row.progress["docs_routed"] == len(good)
        assert row.progress["per_node"] == routed_per_node(good, topo)
        assert_exact_placement(expected_placement(good, topo), held)
        [dead] = [
            orjson.loads(x)
            for f in sorted((tmp_path / "dlq" / plan.parent.id).glob("*.refused.ndjson"))
            for x in f.read_bytes().splitlines()
        ]
        assert (dead["line"], dead["byte_offset"]) == (bad_line, bad_offset), dead
        assert dead["raw"] == GEO_BAD.decode() and dead["node"] in refusing, dead
        assert dead["code"] == "invalid_document_geo_field", dead
    print(f"\n{policy}: {len(behind)} batches were queued on meili-0 behind the failed task")
