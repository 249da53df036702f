"""Planning a dump import: stage and validate the dump, prepare every node's index, then
enqueue the parent and split it into byte-range chunks, all before a single document moves."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import orjson

from miroir_pipeline.fleet.targets.base import NodeTarget
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.dump_import.params import (
    DUMP_IMPORT,
    DumpChunkParams,
    DumpImportRequest,
    PlannedImport,
)
from miroir_pipeline.jobs.ids import new_parent_id
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue.contract import JobStore, NewChunk
from miroir_pipeline.sources import DumpRef, open_range, stage_dump
from miroir_pipeline.sources.split import split_dump

__all__ = ["plan_dump_import"]

log = logging.getLogger(__name__)


def plan_dump_import(
    store: JobStore,
    request: DumpImportRequest,
    topology: Topology,
    targets: Mapping[str, NodeTarget],
    settings: PipelineSettings,
) -> PlannedImport:
    """Stage and validate the dump, prepare every node's index, then enqueue and split.

    Everything that can be refused (a URI outside the allowed roots, an unreadable dump, no
    primary key) is refused before any row is written.
    """
    staged = stage_dump(
        request.uri, settings.staging_dir, settings.allowed_roots, index_uid=request.index_uid
    )
    ref = staged.ref
    if staged.unapplied_update_files:
        if staged.kind != "ndjson":  # do not leave a staged copy of a refused dump behind
            for path in (ref.path + ".complete", ref.path):
                with contextlib.suppress(OSError):
                    ref.filesystem.delete_file(path)
        raise ValueError(
            f"{request.uri}: the Meilisearch dump holds {len(staged.unapplied_update_files)} document "
            "update(s) that were still queued when it was taken (tasks/update_files); importing it "
            "would lose them. Take the dump again once the source's tasks have finished"
        )
    primary_key = request.primary_key or staged.primary_key or _infer_primary_key(ref)
    chunk_size = request.chunk_size_bytes or settings.chunk_size_bytes
    ranges = split_dump(ref, chunk_size).ranges
    for node in topology.all_nodes():
        targets[node.id].ensure_index(request.index_uid, primary_key, staged.settings)
    on_invalid = request.on_invalid_document or settings.on_invalid_document
    parent = store.enqueue(
        DUMP_IMPORT,
        {
            "source_uri": request.uri,
            "data_uri": ref.uri,
            "index_uid": request.index_uid,
            "primary_key": primary_key,
            "chunk_size_bytes": chunk_size,
            "bytes_total": ref.size,
            "on_invalid_document": on_invalid,
        },
        job_id=new_parent_id("import", request.index_uid),
        max_attempts=settings.max_attempts,
    )
    topo = topology.model_dump(mode="json")
    chunks = [
        NewChunk(
            chunk_index=i,
            params=DumpChunkParams(
                source_uri=request.uri,
                data_uri=ref.uri,
                start=r.start,
                end=r.end,
                index_uid=request.index_uid,
                primary_key=primary_key,
                topology=topo,
                on_invalid_document=on_invalid,
            ).model_dump(),
        )
        for i, r in enumerate(ranges)
    ]
    children = store.split(parent.id, chunks)
    log.info("import %s: %d chunk(s) over %d bytes of %s", parent.id, len(children), ref.size, request.uri)
    return PlannedImport(
        parent=store.get(parent.id),
        chunk_ids=[c.id for c in children],
        data_uri=ref.uri,
        primary_key=primary_key,
        bytes_total=ref.size,
    )


def _infer_primary_key(ref: DumpRef) -> str:
    """Meilisearch's rule: the one top-level field of the first document whose name ends in ``id``."""
    reader = open_range(ref, 0, min(ref.size, 1 << 20))
    try:
        head = reader.read(1 << 20)
    finally:
        reader.close()
    for line in head.split(b"\n"):
        line = line.strip().removeprefix(b"\xef\xbb\xbf")
        if not line:
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            break
        if isinstance(doc, dict):
            candidates = [k for k in doc if k.lower().endswith("id")]
            if len(candidates) == 1:
                return str(candidates[0])
            raise ValueError(
                f"{ref.uri}: cannot infer the primary key (candidates: {candidates or 'none'}); "
                "pass --primary-key"
            )
        break
    raise ValueError(f"{ref.uri}: cannot infer the primary key from the first line; pass --primary-key")
