"""Planning a dump import: stage and validate the dump, prepare every node's index, then
enqueue the parent and split it into byte-range chunks, all before a single document moves.

Also :func:`unfinished_identical_import`, which finds an earlier import of the same request that
has not finished (so it can be resumed rather than started again)."""

from __future__ import annotations

import contextlib
import logging
import posixpath
import shlex
from collections.abc import Mapping
from typing import Any

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
from miroir_pipeline.queue.contract import JobState, JobStore, NewChunk, ParentSummary
from miroir_pipeline.sources import DumpRef, StagedDump, open_range, stage_dump
from miroir_pipeline.sources.resolve import DumpSourceError, locate
from miroir_pipeline.sources.split import split_dump
from miroir_pipeline.sources.staging import mark_staged_used

__all__ = ["HEAD_BYTES", "plan_dump_import", "unfinished_identical_import"]

log = logging.getLogger(__name__)

#: How much of a dump planning reads: primary-key inference, and the empty and JSON-array checks.
HEAD_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"


def plan_dump_import(
    store: JobStore,
    request: DumpImportRequest,
    topology: Topology,
    targets: Mapping[str, NodeTarget],
    settings: PipelineSettings,
    *,
    parent_id: str | None = None,
) -> PlannedImport:
    """Stage and validate the dump, prepare every node's index, then enqueue and split.

    ``parent_id`` names the parent when the caller chose it up front (workers started for it
    wait for the plan); by default a new id is made.

    Everything that can be refused (a URI outside the allowed roots, an unreadable dump, a JSON
    array instead of NDJSON, a dump with no documents unless ``allow_empty``, no primary key) is
    refused before any row is written. ``source_index_uid`` picks the index of a ``.dump``
    (default: the index of the same name as ``index_uid``).
    """
    staged = stage_dump(
        request.uri,
        settings.staging_dir,
        settings.allowed_roots,
        index_uid=request.source_index_uid or request.index_uid,
        pick_index=request.source_index_uid is not None,
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
    head = _read_head(ref)
    _check_documents(request, staged, head)
    primary_key = request.primary_key or staged.primary_key or _infer_primary_key(ref, head)
    chunk_size = request.chunk_size_bytes or settings.chunk_size_bytes
    ranges = split_dump(ref, chunk_size).ranges
    for node in topology.all_nodes():
        targets[node.id].ensure_index(request.index_uid, primary_key, staged.settings)
    on_invalid = request.on_invalid_document or settings.on_invalid_document
    mark_staged_used(staged)  # the checks above can take long: a prune must not take it now
    parent = store.enqueue(
        DUMP_IMPORT,
        {
            "source_uri": request.uri,
            "source_location": locate(request.uri).normalized,
            "source_index_uid": request.source_index_uid,
            "data_uri": ref.uri,
            "index_uid": request.index_uid,
            "primary_key": primary_key,
            "requested_primary_key": request.primary_key,
            "chunk_size_bytes": chunk_size,
            "bytes_total": ref.size,
            "on_invalid_document": on_invalid,
            "allow_empty": request.allow_empty,
        },
        job_id=parent_id or new_parent_id("import", request.index_uid),
        max_attempts=settings.max_attempts,
    )
    topo = topology.model_dump(mode="json")
    chunks = [
        NewChunk(
            chunk_index=i,
            params=DumpChunkParams(
                source_uri=request.uri,
                source_kind=staged.kind,
                data_uri=ref.uri,
                data_size=ref.size,
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


def unfinished_identical_import(
    store: JobStore, request: DumpImportRequest, settings: PipelineSettings, *, scan: int = 200
) -> ParentSummary | None:
    """The newest unfinished (queued or in progress) import, among the latest ``scan``, that the
    same request planned: same source (after resolving the path), target and source index,
    chunk size and invalid-document policy, and the same primary key when one is asked for.

    Nothing is read but the jobs table, so this is cheap to ask before planning.
    """
    want = _identity(request, settings)
    for summary in store.list_parents(DUMP_IMPORT, limit=scan):
        parent = summary.parent
        if parent.state not in (JobState.QUEUED, JobState.IN_PROGRESS) or not summary.chunks_total:
            continue  # a parent never split (planning was cut short) has nothing to resume
        have = _recorded_identity(parent.params)
        if have is None or have != want:
            continue
        if request.primary_key is not None and parent.params.get("primary_key") != request.primary_key:
            continue
        return summary
    return None


def _identity(request: DumpImportRequest, settings: PipelineSettings) -> tuple[Any, ...]:
    return (
        locate(request.uri).normalized,
        request.index_uid,
        request.source_index_uid,
        request.chunk_size_bytes or settings.chunk_size_bytes,
        request.on_invalid_document or settings.on_invalid_document,
    )


def _recorded_identity(params: Mapping[str, Any]) -> tuple[Any, ...] | None:
    location = params.get("source_location")
    if location is None:  # planned before the location was recorded
        try:
            location = locate(str(params.get("source_uri", ""))).normalized
        except DumpSourceError:
            return None
    return (
        location,
        params.get("index_uid"),
        params.get("source_index_uid"),
        params.get("chunk_size_bytes"),
        params.get("on_invalid_document"),
    )


def _read_head(ref: DumpRef) -> bytes:
    """The first :data:`HEAD_BYTES` of the (staged) NDJSON."""
    if ref.size == 0:
        return b""
    reader = open_range(ref, 0, min(ref.size, HEAD_BYTES))
    try:
        return bytes(reader.read(HEAD_BYTES))
    finally:
        reader.close()


def _check_documents(request: DumpImportRequest, staged: StagedDump, head: bytes) -> None:
    """Refuse a JSON array (a common export format, not NDJSON) and, unless ``allow_empty``, a
    dump with no documents: empty, or blank within its first MiB when that is all of it. A
    bigger dump that turns out blank is only known once imported (the CLI reports it then)."""
    body = head.removeprefix(_BOM).lstrip()
    if body.startswith(b"["):
        raise ValueError(
            f"{request.uri} is a JSON array, not NDJSON (one document per line); convert it, "
            f"e.g. {_convert_hint(request.uri, staged.kind)}"
        )
    if request.allow_empty or body or staged.ref.size > HEAD_BYTES:
        return
    what = "is empty" if staged.ref.size == 0 else "holds only blank lines"
    if staged.kind == "meilisearch_dump":
        what = f"has no documents in index {staged.index_uid!r} (its documents.jsonl {what})"
    raise ValueError(
        f"{request.uri} {what}: no documents to import; pass --allow-empty if that is expected "
        "(allow_empty: true in Dagster run config)"
    )


def _convert_hint(uri: str, kind: str) -> str:
    name = posixpath.basename(uri.rstrip("/")) or "dump.json"
    stem = name
    for suffix in (".gz", ".json", ".jsonl", ".ndjson"):
        stem = stem.removesuffix(suffix)
    target = shlex.quote(f"{stem or 'dump'}.ndjson")
    if kind == "gzip":
        return f"`gunzip -c {shlex.quote(uri)} | jq -c '.[]' > {target}`"
    return f"`jq -c '.[]' {shlex.quote(uri)} > {target}`"


def _infer_primary_key(ref: DumpRef, head: bytes) -> str:
    """Meilisearch's rule: the one top-level field of the first document whose name ends in ``id``."""
    for line in head.split(b"\n"):
        line = line.strip().removeprefix(_BOM)
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
    else:
        raise ValueError(
            f"{ref.uri}: no document to infer the primary key from; pass --primary-key"
        )
    raise ValueError(f"{ref.uri}: cannot infer the primary key from the first line; pass --primary-key")
