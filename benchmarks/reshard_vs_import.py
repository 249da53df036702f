"""Reshard backfill throughput vs dump import of the same documents, into local node stores.

One run, one process, the same ~1 KiB sample documents: first the dump is imported (64 shards,
3 local nodes: ``plan_dump_import`` + ``process_dump_chunk``), then that live index is
resharded 64 -> 128 onto the same nodes (``plan_reshard`` + ``process_reshard_chunk``), and
both are timed in documents/s. A second, identical backfill runs under cProfile and its top-10
functions by own time are printed, to show where the time goes (reading pages back, JSON re-encoding,
SQLite upserts). Verification time is reported too.

    .venv/bin/python benchmarks/reshard_vs_import.py [--quick] [--size 256MiB]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import _common as c

from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.fleet.topology import default_topology
from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import, process_dump_chunk
from miroir_pipeline.jobs.reshard_backfill import (
    ReshardRequest,
    plan_reshard,
    process_reshard_chunk,
)
from miroir_pipeline.jobs.reshard_backfill.verification import verify_shadow
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import open_store


def run_all(store: object, job_type: str, fn: object) -> int:
    chunks = 0
    while (lease := store.claim([job_type], "bench")) is not None:  # type: ignore[attr-defined]
        fn(lease)  # type: ignore[operator]
        chunks += 1
    return chunks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", default="256MiB", help="sample dump size (default 256MiB)")
    p.add_argument("--quick", action="store_true", help="a 32MiB dump")
    p.add_argument("--old-shards", type=int, default=64)
    p.add_argument("--new-shards", type=int, default=128)
    args = p.parse_args()
    size = c.parse_sizes("32MiB" if args.quick else args.size)[0]
    c.header("reshard backfill vs dump import (local node stores, one process)", args)
    results = c.Results("reshard_vs_import", vars(args))
    dump, n_docs = c.sample_dump(size)

    with c.scratch_subdir("reshard_vs_import") as root:
        topology = default_topology(root, shards=args.old_shards)
        targets = open_targets(topology)
        store = open_store(f"sqlite:///{root / 'jobs.sqlite3'}")
        settings = PipelineSettings(
            allowed_roots=[str(dump.parent)], staging_dir=str(root / "staging"), chunk_size_bytes=64 * c.MIB
        )

        planned = plan_dump_import(
            store, DumpImportRequest(uri=str(dump), index_uid="bench", primary_key="id"), topology, targets, settings
        )
        t0 = time.perf_counter()
        import_chunks = run_all(store, "dump_import", lambda lease: process_dump_chunk(store, lease, targets, settings))
        import_s = time.perf_counter() - t0
        imported = int(store.parent_summary(planned.parent.id).progress.get("docs_routed", 0))

        plan = plan_reshard(
            store,
            ReshardRequest(index_uid="bench", new_shards=args.new_shards, shards_per_chunk=8),
            topology,
            targets,
            settings,
        )
        t0 = time.perf_counter()
        reshard_chunks = run_all(
            store,
            "reshard_backfill",
            lambda lease: process_reshard_chunk(store, lease, targets, targets, settings),
        )
        backfill_s = time.perf_counter() - t0
        backfilled = int(store.parent_summary(plan.parent.id).progress.get("documents_backfilled", 0))

        t0 = time.perf_counter()
        verdict = verify_shadow(topology, targets, plan.shadow_topology, targets, "bench", plan.shadow_uid, "id")
        verify_s = time.perf_counter() - t0
        # Profile a second, identical backfill (the timed one above ran without the profiler).
        plan_reshard(
            store,
            ReshardRequest(index_uid="bench", new_shards=args.new_shards, shards_per_chunk=8, replace_shadow=True),
            topology,
            targets,
            settings,
        )
        profiler = cProfile.Profile()
        profiler.enable()
        run_all(store, "reshard_backfill", lambda lease: process_reshard_chunk(store, lease, targets, targets, settings))
        profiler.disable()
        for t in targets.values():
            t.close()
        store.close()

    import_rate = imported / import_s
    backfill_rate = backfilled / backfill_s
    results.add(phase="dump import", documents=imported, chunks=import_chunks, seconds=import_s, docs_per_s=import_rate)
    results.add(phase="reshard backfill", documents=backfilled, chunks=reshard_chunks, seconds=backfill_s, docs_per_s=backfill_rate)
    results.add(phase="verification", documents=verdict.shadow_documents, chunks=0, seconds=verify_s, docs_per_s=verdict.shadow_documents / verify_s)
    print()
    c.print_table(results.rows, ["phase", "documents", "chunks", "seconds", "docs_per_s"])
    print(f"\nbackfill / import throughput ratio: {backfill_rate / import_rate:.2f}  (sample of {n_docs:,} documents)")
    print(f"verification passed: {verdict.passed}")
    results.note(f"backfill/import ratio {backfill_rate / import_rate:.2f}")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(10)
    print("\ncProfile of the backfill, top 10 by own time:")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:4000])
    results.save()


if __name__ == "__main__":
    main()
