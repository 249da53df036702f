"""Import into a real 3-node Meilisearch 1.21.0 fleet: the pipeline vs feeding the fleet directly.

Same dump (~1 KiB documents, default 128 MiB), same fleet (3 processes, 1 replica group, RF 1,
S 64), same batches, in one run:

- pipeline: ``plan_dump_import`` (untimed: creates the index on each node and makes
  ``_miroir_shard`` filterable), then N worker processes loop ``claim -> process_dump_chunk``
  (SQLite jobs store; NDJSON gzip'd at level 1 by the Meilisearch target, as shipped);
- direct: the dump pre-routed (untimed) into exactly the pipeline's batches (chunk ranges from
  ``split_dump``, a flush every 10,000 documents and at each chunk's end); index created with the
  same primary key and filterable ``_miroir_shard`` (untimed); then N feeder threads each take
  the next chunk and, batch after batch, POST every node's NDJSON (plain, not gzip'd) with
  httpx and poll the tasks to ``succeeded`` (5 ms doubling to 200 ms, like the pipeline) before
  the next batch. No job store, no routing, no Dagster.

Rate = dump bytes / wall time of the timed part. Checked: every node holds exactly the documents
routed to it. Goal: pipeline >= 90 % of the direct rate. Meilisearch flags: see
``_services.MEILI_FLAGS_NOTE`` (printed).

    .venv/bin/python benchmarks/meilisearch_vs_direct.py [--quick] [--size 128MiB] [--workers 1,2]
        [--repeat 1]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _common as c
import _services as svc
import httpx

from miroir_pipeline.fleet.routing import SHARD_FIELD, Router
from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import, process_dump_chunk
from miroir_pipeline.jobs.dump_import.document_router import DocumentRouter, InvalidLine
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState
from miroir_pipeline.sources import iter_range_blocks, resolve_dump
from miroir_pipeline.sources.split import split_dump

BATCH_DOCS = 10_000


def preroute(
    dump: Path, topo: Topology, chunk_size: int
) -> tuple[list[list[list[bytes]]], list[int]]:
    """Per chunk, per flush, per node: the NDJSON body the pipeline would send; and per-node counts."""
    router = Router(topo)
    ref = resolve_dump(str(dump), None)
    dr = DocumentRouter(router, "id", 100 * c.MIB)
    chunks: list[list[list[bytes]]] = []
    invalid: list[InvalidLine] = []

    def flush(batches: list[list[bytes]]) -> None:
        taken = dr.take_buffers()
        batches.append([b"\n".join(b.lines) + b"\n" if b.lines else b"" for b in taken])

    for r in split_dump(ref, chunk_size).ranges:
        batches: list[list[bytes]] = []
        leftover = b""
        for data in iter_range_blocks(ref, r.start, r.end, 4 * c.MIB):
            buf = leftover + data
            cut = buf.rfind(b"\n")  # the sample dump's lines are far below 4 MiB
            leftover = buf[cut + 1 :]
            dr.route_block(buf[: cut + 1], at_file_start=False, invalid=invalid)
            if dr.buffered_docs >= BATCH_DOCS:
                flush(batches)
        if leftover:
            dr.route_block(leftover, at_file_start=False, invalid=invalid)
        flush(batches)
        chunks.append(batches)
    if invalid:
        raise SystemExit(f"invalid lines in the sample dump: {invalid[0]}")
    return chunks, dr.per_node_docs


def _await(client: httpx.Client, task_uid: int) -> None:
    delay = 0.005
    while True:
        task = client.get(f"/tasks/{task_uid}").json()
        if task["status"] == "succeeded":
            return
        if task["status"] in ("failed", "canceled"):
            raise SystemExit(f"direct: task {task_uid} {task['status']}: {task.get('error')}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _client(proc: Any) -> httpx.Client:
    return httpx.Client(base_url=proc.url, headers={"Authorization": f"Bearer {proc.master_key}"},
                        timeout=httpx.Timeout(60.0))  # fmt: skip


def direct_run(procs: list[Any], uid: str, chunks: list[list[list[bytes]]], feeders: int) -> float:
    for p in procs:  # untimed: same index shape as the pipeline's ensure_index
        with _client(p) as cl:
            _await(cl, cl.post("/indexes", json={"uid": uid, "primaryKey": "id"}).json()["taskUid"])
            _await(
                cl,
                cl.patch(
                    f"/indexes/{uid}/settings", json={"filterableAttributes": [SHARD_FIELD]}
                ).json()["taskUid"],
            )
    todo: queue.Queue[list[list[bytes]]] = queue.Queue()
    for ch in chunks:
        todo.put(ch)
    errors: list[BaseException] = []

    def feeder() -> None:
        clients = [_client(p) for p in procs]
        try:
            with ThreadPoolExecutor(len(procs)) as pool:
                while True:
                    try:
                        batches = todo.get_nowait()
                    except queue.Empty:
                        return

                    def send(i: int, body: bytes, clients: list[httpx.Client] = clients) -> None:
                        resp = clients[i].post(f"/indexes/{uid}/documents", params={"primaryKey": "id"}, content=body,
                                               headers={"Content-Type": "application/x-ndjson"})  # fmt: skip
                        resp.raise_for_status()
                        _await(clients[i], resp.json()["taskUid"])

                    for per_node in batches:
                        for f in [
                            pool.submit(send, i, body) for i, body in enumerate(per_node) if body
                        ]:
                            f.result()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            for cl in clients:
                cl.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=feeder) for _ in range(feeders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    if errors:
        raise SystemExit(f"direct feeder failed: {errors[0]!r}")
    return wall


def _pipeline_worker(
    dsn: str, topo_data: dict[str, Any], settings_data: dict[str, Any], worker: str
) -> None:
    store = open_store(dsn, migrate=False)
    targets = open_targets(Topology.parse(topo_data))
    settings = PipelineSettings(**settings_data)
    try:
        while (lease := store.claim(["dump_import"], worker, settings.lease_ttl)) is not None:
            process_dump_chunk(store, lease, targets, settings)
    finally:
        for t in targets.values():
            t.close()
        store.close()


def pipeline_run(
    root: Path, topo: Topology, dump: Path, uid: str, chunk_size: int, workers: int
) -> float:
    dsn = f"sqlite:///{root}/jobs-{uid}.sqlite3"
    settings = PipelineSettings(allowed_roots=[str(dump.parent)], staging_dir=str(root / "staging"),
                                dead_letter_dir=str(root / "dlq"), chunk_size_bytes=chunk_size)  # fmt: skip
    store = open_store(dsn)
    targets = open_targets(topo)
    try:
        planned = plan_dump_import(
            store,
            DumpImportRequest(uri=str(dump), index_uid=uid, primary_key="id"),
            topo,
            targets,
            settings,
        )
    finally:
        for t in targets.values():
            t.close()
    ctx = mp.get_context("fork")
    t0 = time.monotonic()
    procs = [ctx.Process(target=_pipeline_worker, args=(dsn, topo.model_dump(mode="json"), settings.model_dump(), f"w{i}"))
             for i in range(workers)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    wall = time.monotonic() - t0
    state = store.get(planned.parent.id).state
    store.close()
    if state != JobState.COMPLETED or any(p.exitcode for p in procs):
        raise SystemExit(
            f"pipeline import ended {state}; worker exit codes {[p.exitcode for p in procs]}"
        )
    return wall


def check_counts(procs: list[Any], uid: str, expected: list[int]) -> None:
    for p, want in zip(procs, expected, strict=True):
        with _client(p) as cl:
            got = cl.get(f"/indexes/{uid}/stats").json()["numberOfDocuments"]
        if got != want:
            raise SystemExit(f"{p.url} index {uid}: {got} documents, expected {want}")


def drop_index(procs: list[Any], uid: str) -> None:
    for p in procs:
        with _client(p) as cl:
            _await(cl, cl.delete(f"/indexes/{uid}").json()["taskUid"])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="128MiB")
    ap.add_argument("--workers", default="1,2", help="pipeline workers = direct feeder threads")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="16MiB dump, 1 run each")
    args = ap.parse_args()
    if args.quick:
        args.size, args.repeat = "16MiB", 1
    c.header("Meilisearch fleet: pipeline import vs direct feeding of the same batches", args)
    print(f"   Meilisearch 1.21.0 flags: {svc.MEILI_FLAGS_NOTE}")
    size = c.parse_sizes(args.size)[0]
    dump, docs = c.sample_dump(size)
    size = dump.stat().st_size
    chunk_size = max(size // 4 + 1, c.MIB)  # 4 chunks: enough for 2 workers to overlap
    res = c.Results("meilisearch_vs_direct", vars(args))
    res.notes.append("Meilisearch flags: " + svc.MEILI_FLAGS_NOTE)
    with c.scratch_subdir("meili") as root, svc.meilisearch_fleet(root, 3) as procs:
        topo = svc.meili_topology(procs)
        chunks, per_node = preroute(dump, topo, chunk_size)
        if sum(per_node) != docs:
            raise SystemExit(f"pre-routing found {sum(per_node)} documents, dump has {docs}")
        print(
            f"  {len(chunks)} chunks, {sum(len(b) for b in chunks)} flushes (one batch per node each); per-node documents {per_node}"
        )
        for w in [int(x) for x in args.workers.split(",")]:
            times: dict[str, list[float]] = {"pipeline": [], "direct": []}
            for rep in range(args.repeat):
                for mode in ("direct", "pipeline") if rep % 2 == 0 else ("pipeline", "direct"):
                    uid = f"bench_{mode}_{uuid.uuid4().hex[:8]}"
                    load = c.loadavg()[0]
                    if mode == "direct":
                        dt = direct_run(procs, uid, chunks, w)
                    else:
                        dt = pipeline_run(root, topo, dump, uid, chunk_size, w)
                    check_counts(procs, uid, per_node)
                    drop_index(procs, uid)
                    times[mode].append(dt)
                    print(
                        f"  {w} worker(s) {mode:8s}: {size / 1e6 / dt:6.1f} MB/s ({dt:.1f} s, load {load:.2f})"
                    )
            rate = {k: size / 1e6 / c.median(v) for k, v in times.items()}
            res.add(workers=w, pipeline_mb_s=round(rate["pipeline"], 2), direct_mb_s=round(rate["direct"], 2),
                    pipeline_vs_direct=round(rate["pipeline"] / rate["direct"], 3),
                    goal_90pct=rate["pipeline"] >= 0.9 * rate["direct"],
                    all_pipeline=[round(size / 1e6 / t, 2) for t in times["pipeline"]],
                    all_direct=[round(size / 1e6 / t, 2) for t in times["direct"]])  # fmt: skip
    print()
    c.print_table(
        res.rows,
        [
            "workers",
            "pipeline_mb_s",
            "direct_mb_s",
            "pipeline_vs_direct",
            "goal_90pct",
            "all_pipeline",
            "all_direct",
            "load1",
        ],
    )
    res.save()


if __name__ == "__main__":
    main()
