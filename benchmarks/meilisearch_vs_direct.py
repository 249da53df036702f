"""Feeding real Meilisearch 1.21.0 nodes: the pipeline against the best known direct loaders.

Same dump (``sample-dump``, ~1 KiB documents, default 48 MiB), same documents on every node
(each node gets exactly the documents the routing formula sends it, pre-routed untimed for the
direct loaders), on two layouts: **1 node**, and a **3-node fleet with 2 replica groups**
(group 0: one node, group 1: two nodes, RF 1, S 64, so every document goes to two nodes).
Loaders, each on fresh Meilisearch processes (started per run, untimed) with the index created
and ``_miroir_shard`` filterable beforehand (untimed):

- **pipeline**: ``plan_dump_import`` (untimed), then 1 worker process loops
  ``claim -> process_dump_chunk`` (SQLite jobs store, default settings: batches of a quarter of
  the 128 MiB memory buffer, a window of the rest enqueued per node, gzip level 1);
- **importer**: how Meilisearch's own importer loads: per node, the documents cut into 20 MiB
  NDJSON payloads, each gzip'd and POSTed without waiting, then every task awaited (one thread
  per node);
- **single**: per node, all its documents as one gzip'd NDJSON payload, then awaited.

Rate = dump bytes / wall time of the timed part. Rounds are interleaved (the loaders' order
rotates each round); the median of ``--repeat`` rounds is reported. Checked after every run:
each node holds exactly the documents routed to it. Goal (issue 10): pipeline >= 95 % of the
importer-style loader on both layouts.

    .venv/bin/python benchmarks/meilisearch_vs_direct.py [--quick] [--size 48MiB] [--repeat 3]
        [--layouts single,fleet]
"""

from __future__ import annotations

import argparse
import gzip
import multiprocessing as mp
import os
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
from miroir_pipeline.fleet.topology import Group, Node, Topology
from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import
from miroir_pipeline.jobs.dump_import.document_router import DocumentRouter, InvalidLine
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState
from miroir_pipeline.sources import iter_line_blocks, resolve_dump

PAYLOAD = 20 * c.MIB
LAYOUTS = {"single": [[0]], "fleet": [[0], [1, 2]]}


def topology(procs: list[Any], groups: list[list[int]]) -> Topology:
    nodes = {}
    for i, p in enumerate(procs):
        os.environ[svc.key_env(p)] = p.master_key
        nodes[i] = Node(id=f"meili-{i}", url=p.url, api_key_env=svc.key_env(p))
    return Topology(
        shards=64,
        replication_factor=1,
        groups=[Group(id=g, nodes=[nodes[i] for i in members]) for g, members in enumerate(groups)],
    )


def preroute(dump: Path, topo: Topology) -> list[bytes]:
    """Per node, every document routed to it (tagged), as one NDJSON body."""
    router = Router(topo)
    dr = DocumentRouter(router, "id", 100 * c.MIB)
    invalid: list[InvalidLine] = []
    ref = resolve_dump(str(dump), None)
    for data, _at, end, _overlong in iter_line_blocks(ref, 0, ref.size, 4 * c.MIB):
        dr.route_block(data, at_file_start=False, invalid=invalid, end=end)
    if invalid:
        raise SystemExit(f"invalid lines in the sample dump: {invalid[0]}")
    return [b"\n".join(b.lines) + b"\n" if b.lines else b"" for b in dr.take_buffers()]


def _client(proc: Any) -> httpx.Client:
    return httpx.Client(base_url=proc.url, headers={"Authorization": f"Bearer {proc.master_key}"},
                        timeout=httpx.Timeout(300.0))  # fmt: skip


def _await(client: httpx.Client, task_uid: int) -> None:
    delay = 0.005
    while True:
        task = client.get(f"/tasks/{task_uid}").json()
        if task["status"] == "succeeded":
            return
        if task["status"] in ("failed", "canceled"):
            raise SystemExit(f"task {task_uid} {task['status']}: {task.get('error')}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def prepare_index(procs: list[Any], uid: str) -> None:
    for p in procs:
        with _client(p) as cl:
            _await(cl, cl.post("/indexes", json={"uid": uid, "primaryKey": "id"}).json()["taskUid"])
            _await(cl, cl.patch(f"/indexes/{uid}/settings", json={"filterableAttributes": [SHARD_FIELD]}).json()["taskUid"])


def payloads(body: bytes, size: int) -> list[bytes]:
    """``body`` cut on line boundaries into pieces of about ``size`` bytes."""
    out, start = [], 0
    while start < len(body):
        end = body.find(b"\n", min(start + size, len(body) - 1)) + 1 or len(body)
        out.append(body[start:end])
        start = end
    return out


def direct_run(procs: list[Any], uid: str, bodies: list[bytes], piece: int) -> float:
    """Per node (a thread each): gzip and POST every piece without waiting, then await all."""

    def feed(proc: Any, body: bytes) -> None:
        if not body:
            return
        with _client(proc) as cl:
            tasks = []
            for part in payloads(body, piece):
                resp = cl.post(f"/indexes/{uid}/documents", params={"primaryKey": "id"},
                               content=gzip.compress(part, compresslevel=1, mtime=0),
                               headers={"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"})  # fmt: skip
                resp.raise_for_status()
                tasks.append(resp.json()["taskUid"])
            for task in tasks:
                _await(cl, task)

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(procs)) as pool:
        for f in [pool.submit(feed, p, b) for p, b in zip(procs, bodies, strict=True)]:
            f.result()
    return time.monotonic() - t0


def _pipeline_worker(dsn: str, topo_data: dict[str, Any], settings_data: dict[str, Any]) -> None:
    store = open_store(dsn, migrate=False)
    targets = open_targets(Topology.parse(topo_data))
    settings = PipelineSettings(**settings_data)
    try:
        c.run_dump_chunks(store, targets, settings, "w0")
    finally:
        for t in targets.values():
            t.close()
        store.close()


def pipeline_run(root: Path, topo: Topology, dump: Path, uid: str) -> float:
    dsn = f"sqlite:///{root}/jobs-{uid}.sqlite3"
    settings = PipelineSettings(allowed_roots=[str(dump.parent)], staging_dir=str(root / "staging"),
                                dead_letter_dir=str(root / "dlq"))  # fmt: skip
    store = open_store(dsn)
    targets = open_targets(topo)
    try:
        planned = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid=uid, primary_key="id"), topo, targets, settings)
    finally:
        for t in targets.values():
            t.close()
    t0 = time.monotonic()
    proc = mp.get_context("fork").Process(target=_pipeline_worker, args=(dsn, topo.model_dump(mode="json"), settings.model_dump()))
    proc.start()
    proc.join()
    wall = time.monotonic() - t0
    state = store.get(planned.parent.id).state
    store.close()
    if state != JobState.COMPLETED or proc.exitcode:
        raise SystemExit(f"pipeline import ended {state}; worker exit code {proc.exitcode}")
    return wall


def check_counts(procs: list[Any], uid: str, bodies: list[bytes]) -> None:
    for p, body in zip(procs, bodies, strict=True):
        want = body.count(b"\n")
        with _client(p) as cl:
            got = cl.get(f"/indexes/{uid}/stats").json()["numberOfDocuments"]
        if got != want:
            raise SystemExit(f"{p.url} index {uid}: {got} documents, expected {want}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="48MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layouts", default="single,fleet")
    ap.add_argument("--quick", action="store_true", help="8MiB dump, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.size, args.repeat = "8MiB", 1
    c.header("Feeding Meilisearch: the pipeline vs the importer-style and single-payload loaders", args)
    print(f"   Meilisearch 1.21.0 flags: {svc.MEILI_FLAGS_NOTE}")
    dump, docs = c.sample_dump(c.parse_sizes(args.size)[0])
    size = dump.stat().st_size
    res = c.Results("meilisearch_vs_direct", vars(args))
    res.notes.append("Meilisearch flags: " + svc.MEILI_FLAGS_NOTE)
    loaders = ["pipeline", "importer", "single"]
    for layout in args.layouts.split(","):
        groups = LAYOUTS[layout]
        n = 1 + max(i for g in groups for i in g)
        times: dict[str, list[float]] = {k: [] for k in loaders}
        for rnd in range(args.repeat):
            order = loaders[rnd % 3 :] + loaders[: rnd % 3]
            for mode in order:
                with c.scratch_subdir(f"meili-{layout}-{mode}-{rnd}") as root, svc.meilisearch_fleet(root, n) as procs:
                    topo = topology(procs, groups)
                    bodies = preroute(dump, topo)
                    uid = f"bench_{mode}_{uuid.uuid4().hex[:8]}"
                    load = c.loadavg()[0]
                    if mode == "pipeline":
                        dt = pipeline_run(root, topo, dump, uid)
                    else:
                        prepare_index(procs, uid)
                        dt = direct_run(procs, uid, bodies, PAYLOAD if mode == "importer" else 1 << 40)
                    check_counts(procs, uid, bodies)
                    times[mode].append(dt)
                    print(f"  {layout:6s} round {rnd + 1} {mode:8s}: {size / 1e6 / dt:6.2f} MB/s ({dt:.1f} s, load {load:.2f})")
        rate = {k: size / 1e6 / c.median(v) for k, v in times.items()}
        res.add(layout=layout, nodes=n, pipeline_mb_s=round(rate["pipeline"], 2),
                importer_mb_s=round(rate["importer"], 2), single_mb_s=round(rate["single"], 2),
                pipeline_vs_importer=round(rate["pipeline"] / rate["importer"], 3),
                pipeline_vs_single=round(rate["pipeline"] / rate["single"], 3),
                goal_95pct=rate["pipeline"] >= 0.95 * rate["importer"],
                all_s={k: [round(t, 1) for t in v] for k, v in times.items()})  # fmt: skip
    print(f"\n  dump {c.fmt_size(size)}, {docs:,} documents")
    c.print_table(res.rows, ["layout", "nodes", "pipeline_mb_s", "importer_mb_s", "single_mb_s",
                             "pipeline_vs_importer", "pipeline_vs_single", "goal_95pct", "load1"])  # fmt: skip
    res.save()


if __name__ == "__main__":
    main()
