"""Read a Meilisearch ``.dump`` archive (tar.gz, v6 layout) in one streaming pass.

A dump holds top-level ``metadata.json`` (the dump version), per index
``indexes/<uid>/{metadata.json,settings.json,documents.jsonl}``, and
``tasks/update_files/*`` (document batches enqueued but not yet applied). Only the chosen
index is read; its ``documents.jsonl`` is handed to the caller as a stream, never buffered.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import pyarrow as pa

from miroir_pipeline.sources.resolve import DumpRef, DumpSourceError

__all__ = ["DocumentsSink", "MeiliDumpIndex", "read_meilisearch_dump"]

_INDEX_MEMBER_RE = re.compile(
    r"^indexes/(?P<uid>[A-Za-z0-9_-]{1,400})/(?P<file>documents\.jsonl|metadata\.json|settings\.json)$"
)
_INDEX_UID_RE = re.compile(r"[A-Za-z0-9_-]{1,400}")
_MAX_JSON_MEMBER = 64 * 1024 * 1024
_SUPPORTED_DUMP_VERSIONS = ("V6",)

#: Receives the chosen index's ``documents.jsonl`` member and its size in bytes.
DocumentsSink = Callable[[IO[bytes], int], None]


@dataclass(frozen=True)
class MeiliDumpIndex:
    """What a ``.dump`` says about the index whose documents were handed over."""

    index_uid: str
    primary_key: str | None
    settings: dict[str, Any] | None
    #: Non-empty ``tasks/update_files/*``: batches that are NOT in ``documents.jsonl``, so a
    #: caller must report them (or refuse the dump) rather than lose them silently.
    unapplied_update_files: tuple[str, ...]


def _read_json_member(tar: tarfile.TarFile, member: tarfile.TarInfo, source: DumpRef) -> Any:
    if member.size > _MAX_JSON_MEMBER:
        raise DumpSourceError(
            f"dump {source.uri!r}: member {member.name!r} is {member.size} bytes, too big for "
            "a metadata file; this is not a Meilisearch dump"
        )
    handle = tar.extractfile(member)
    if handle is None:
        raise DumpSourceError(f"dump {source.uri!r}: member {member.name!r} is not a file")
    try:
        return json.loads(handle.read())
    except ValueError as exc:
        raise DumpSourceError(
            f"dump {source.uri!r}: member {member.name!r} is not valid JSON ({exc})"
        ) from None


def _member_name(member: tarfile.TarInfo) -> str:
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/") if member.isdir() else name


def read_meilisearch_dump(
    source: DumpRef, index_uid: str | None, write_documents: DocumentsSink
) -> MeiliDumpIndex:
    """Stream a v6 ``.dump`` once, reading only the chosen index's three members.

    ``index_uid`` picks the index; ``None`` accepts a dump holding exactly one. The index's
    ``documents.jsonl`` is passed to ``write_documents`` while the archive is being read.
    Member names are matched against fixed patterns and never used as paths, so a crafted
    name (``../x``, absolute paths) cannot direct output anywhere; links are refused. Any
    problem with the archive raises :class:`DumpSourceError`; exceptions raised by
    ``write_documents`` propagate unchanged, except OS and pyarrow errors, which are
    reported as an unreadable archive.
    """
    chosen = index_uid
    seen: list[str] = []
    version: str | None = None
    primary_key: str | None = None
    settings: dict[str, Any] | None = None
    index_meta_seen = False
    unapplied: list[str] = []
    documents_done = False

    def note_index(uid: str) -> None:
        if uid not in seen:
            seen.append(uid)
        if index_uid is None and len(seen) > 1:
            raise DumpSourceError(
                f"dump {source.uri!r} holds more than one index ({', '.join(seen)}, …); "
                "pass the index uid to import"
            )

    try:
        with (
            source.filesystem.open_input_stream(source.path, compression="gzip") as stream,
            tarfile.open(fileobj=stream, mode="r|") as tar,
        ):
            for member in tar:
                name = _member_name(member)
                if name == "metadata.json":
                    meta = _read_json_member(tar, member, source)
                    version = meta.get("dumpVersion") if isinstance(meta, dict) else None
                    if version not in _SUPPORTED_DUMP_VERSIONS:
                        raise DumpSourceError(
                            f"dump {source.uri!r} has dumpVersion {version!r}; only "
                            f"{', '.join(_SUPPORTED_DUMP_VERSIONS)} dumps (Meilisearch ≥ 1.0) "
                            "are supported — load it into a current Meilisearch and dump again"
                        )
                    continue
                if name.startswith("tasks/update_files/") and member.isfile() and member.size:
                    unapplied.append(name)
                    continue
                match = _INDEX_MEMBER_RE.match(name)
                if match is None:
                    if name.startswith("indexes/") and name.count("/") >= 1:
                        uid = name.split("/")[1]
                        if uid and _INDEX_UID_RE.fullmatch(uid):
                            note_index(uid)
                    continue
                uid = match["uid"]
                note_index(uid)
                if chosen is None:
                    chosen = uid
                if uid != chosen:
                    continue
                if not member.isfile():
                    raise DumpSourceError(
                        f"dump {source.uri!r}: member {member.name!r} is a link or special "
                        "file, not a regular file; refusing to follow it"
                    )
                kind = match["file"]
                if kind == "metadata.json":
                    meta = _read_json_member(tar, member, source)
                    pk = meta.get("primaryKey") if isinstance(meta, dict) else None
                    primary_key = pk if isinstance(pk, str) else None
                    index_meta_seen = True
                elif kind == "settings.json":
                    data = _read_json_member(tar, member, source)
                    settings = data if isinstance(data, dict) else None
                else:
                    handle = tar.extractfile(member)
                    assert handle is not None  # isfile() checked above
                    write_documents(handle, member.size)
                    documents_done = True
    except (tarfile.TarError, OSError, pa.ArrowException, EOFError) as exc:
        raise DumpSourceError(
            f"dump {source.uri!r} is not a readable tar.gz archive ({exc}); "
            "check that the file is complete"
        ) from None

    if version is None:
        raise _problem(source, "has no top-level metadata.json, so it is not a Meilisearch dump")
    if chosen is None:
        raise _problem(source, "holds no index")
    if not documents_done:
        found = ", ".join(seen) or "none"
        raise _problem(
            source,
            f"has no documents for index {chosen!r} (indexes found: {found}); pick the index to "
            "read with --source-index (source_index_uid in Dagster run config), and the index "
            "to write with --index",
        )
    if not index_meta_seen:
        raise _problem(source, f"has no indexes/{chosen}/metadata.json")
    return MeiliDumpIndex(
        index_uid=chosen,
        primary_key=primary_key,
        settings=settings,
        unapplied_update_files=tuple(unapplied),
    )


def _problem(source: DumpRef, problem: str) -> DumpSourceError:
    return DumpSourceError(f"dump {source.uri!r} {problem}")
