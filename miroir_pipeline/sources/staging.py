"""Stage compressed dumps as plain NDJSON so they can be split and read by byte range.

Gzip'd NDJSON is decompressed, and a Meilisearch ``.dump`` has one index's
``documents.jsonl`` extracted, into a staging dir on any pyarrow filesystem — streaming,
in bounded memory, written atomically. A full disk is reported with the bytes needed and
left, and the partial file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import re
import secrets
import shutil
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from miroir_pipeline.sources.meili_dump import read_meilisearch_dump
from miroir_pipeline.sources.ranges import BLOCK_SIZE
from miroir_pipeline.sources.resolve import (
    DumpRef,
    DumpSourceError,
    access_error,
    errno_of,
    locate,
    resolve_dump,
)

__all__ = ["DumpKind", "StagedDump", "StagedRemoval", "mark_staged_used", "remove_unused_staged", "stage_dump"]

_GZIP_MAGIC = b"\x1f\x8b"
_TAR_MAGIC_OFFSET = 257

DumpKind = Literal["ndjson", "gzip", "meilisearch_dump"]


@dataclass(frozen=True)
class StagedDump:
    """A dump ready to split: ``ref`` is plain NDJSON (the source itself, or a staged copy).

    ``primary_key`` and ``settings`` come from a Meilisearch ``.dump`` (``None`` otherwise);
    ``reused`` says a complete staged copy from an earlier call was used as is.
    """

    ref: DumpRef
    primary_key: str | None
    settings: dict[str, Any] | None
    source_uri: str
    kind: DumpKind = "ndjson"
    index_uid: str | None = None
    reused: bool = False
    #: Non-empty ``tasks/update_files/*`` of a ``.dump``: document batches Meilisearch had
    #: enqueued but not yet applied when it dumped. They are NOT in ``documents.jsonl``, so a
    #: caller must report them (or refuse the dump) rather than lose them silently.
    unapplied_update_files: tuple[str, ...] = ()


def _sniff(ref: DumpRef) -> DumpKind:
    """Tell plain NDJSON, gzip'd NDJSON and a tar.gz Meilisearch dump apart by content."""
    if ref.size == 0:
        return "ndjson"
    with ref.filesystem.open_input_file(ref.path) as f:
        head = f.read(_TAR_MAGIC_OFFSET + 8)
    name = ref.path.lower()
    archive_name = name.endswith((".dump", ".tar.gz", ".tgz"))
    if head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar":
        raise DumpSourceError(
            f"dump {ref.uri!r} is an uncompressed tar archive; Meilisearch dumps are tar.gz — "
            "pass the .dump file Meilisearch wrote, or gzip the tar"
        )
    if head[:2] != _GZIP_MAGIC:
        if archive_name or name.endswith(".gz"):
            raise DumpSourceError(
                f"dump {ref.uri!r} is named like a gzip file but is not gzip-compressed; "
                "check that the file is complete and not corrupted"
            )
        return "ndjson"
    try:
        with ref.filesystem.open_input_stream(ref.path, compression="gzip") as stream:
            inner = stream.read(_TAR_MAGIC_OFFSET + 8)
    except (OSError, pa.ArrowException) as exc:
        raise DumpSourceError(f"dump {ref.uri!r} is not valid gzip: {exc}") from None
    if inner[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "meilisearch_dump"
    if archive_name:
        raise DumpSourceError(
            f"dump {ref.uri!r} is gzip-compressed but holds no tar archive, so it is not a "
            "Meilisearch .dump; rename it to .jsonl.gz if it is gzip'd NDJSON"
        )
    return "gzip"


@dataclass
class _StagingDir:
    """Where staged files go: any pyarrow filesystem, with disk-space reporting when local."""

    display: str
    filesystem: pafs.FileSystem
    path: str
    is_local: bool

    @classmethod
    def open(cls, staging_dir: str, *, create: bool = True) -> _StagingDir:
        loc = locate(staging_dir, what="staging dir")
        try:
            if loc.is_local:
                fs: pafs.FileSystem = pafs.LocalFileSystem()
                path = loc.path
            else:
                fs, path = pafs.FileSystem.from_uri(staging_dir)
            if create:
                fs.create_dir(path, recursive=True)
        except (OSError, pa.ArrowException) as exc:
            raise DumpSourceError(
                f"staging dir {staging_dir!r} cannot be created or used: {exc}; point it at a "
                "writable directory with room for the uncompressed dump"
            ) from None
        return cls(staging_dir, fs, path, loc.is_local)

    def join(self, name: str) -> str:
        return (
            posixpath.join(self.path, name) if not self.is_local else os.path.join(self.path, name)
        )

    def uri_of(self, path: str) -> str:
        """The URI workers open ``path`` by: the staging dir's own, with its options (a query
        such as ``?endpoint_override=…&scheme=http``) kept after the file's name."""
        if self.is_local:
            return path
        parts = urlsplit(self.display)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + posixpath.basename(path)))

    def free_bytes(self) -> int | None:
        if not self.is_local:
            return None
        try:
            return shutil.disk_usage(self.path).free
        except OSError:
            return None

    def remove_quietly(self, path: str) -> None:
        with contextlib.suppress(OSError, pa.ArrowException):
            self.filesystem.delete_file(path)

    def no_space(self, attempted: int, needed: int | None) -> DumpSourceError:
        """``attempted``: bytes written plus the block that did not fit (a lower bound)."""
        free = self.free_bytes()
        need = (
            f"needs {needed} bytes" if needed is not None else f"needs at least {attempted} bytes"
        )
        left = f" but only {free} bytes are left there" if free is not None else ""
        return DumpSourceError(
            f"staging dir {self.display!r} is full: staging the dump {need}{left}; "
            "the partial file was removed — free space or point the staging dir at a bigger volume"
        )

    def write(self, final: str, blocks: Iterable[bytes], needed: int | None) -> int:
        """Write ``blocks`` to ``final`` atomically (temp file + move); return bytes written.

        On any failure the partial file is removed; a full disk becomes a
        :class:`DumpSourceError` naming this directory and the bytes needed and left.
        """
        if needed is not None:
            free = self.free_bytes()
            if free is not None and needed > free:
                raise self.no_space(0, needed)
        tmp = f"{final}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        written = attempted = 0
        try:
            with self.filesystem.open_output_stream(tmp) as out:
                for block in blocks:
                    attempted = written + len(block)
                    out.write(block)
                    written = attempted
            self.filesystem.move(tmp, final)
        except BaseException as exc:
            self.remove_quietly(tmp)
            if isinstance(exc, OSError) and errno_of(exc) == errno.ENOSPC:
                raise self.no_space(attempted, needed) from None
            if isinstance(exc, (OSError, pa.ArrowException)):
                raise DumpSourceError(
                    f"staging into {self.display!r} failed after {written} bytes: {exc}"
                ) from None
            raise
        return written


class _CorruptSource(Exception):
    """Reading (not writing) failed: kept apart so a corrupt input is not blamed on the disk."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _source_blocks(stream: IO[bytes] | pa.NativeFile) -> Iterator[bytes]:
    """Read ``stream`` to its end in ``BLOCK_SIZE`` blocks; read errors become ``_CorruptSource``."""
    while True:
        try:
            block = stream.read(BLOCK_SIZE)
        except (OSError, pa.ArrowException, tarfile.TarError, EOFError) as exc:
            raise _CorruptSource(str(exc)) from None
        if not block:
            return
        yield bytes(block)


#: Bytes at the end of a source hashed into its identity: they hold the gzip trailer (CRC-32 and
#: length of the last member), so a rewrite of the same size within the mtime's resolution shows.
_TAIL_BYTES = 64 * 1024


def _staged_name(source: DumpRef, stamp: dict[str, Any], index_uid: str | None) -> str:
    """One name per source *content* (URI, size, mtime, tail) and index: a changed dump under the
    same name stages beside the copy an unfinished import of the old one still reads."""
    identity = json.dumps([index_uid or "", stamp], sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(source.path))[:60] or "dump"
    return f"{stem}-{digest}.jsonl"


def _source_stamp(source: DumpRef) -> dict[str, Any]:
    tail = min(source.size, _TAIL_BYTES)
    try:
        with source.filesystem.open_input_file(source.path) as f:
            end = bytes(f.read_at(tail, source.size - tail))
    except (OSError, pa.ArrowException) as exc:
        raise access_error(source.uri, exc) from None
    return {
        "source_uri": source.uri,
        "source_size": source.size,
        "source_mtime_ns": source.mtime_ns,
        "source_tail_sha256": hashlib.sha256(end).hexdigest(),
    }


def _reuse(
    staging: _StagingDir, final: str, marker: str, stamp: dict[str, Any], index_uid: str | None
) -> dict[str, Any] | None:
    """The marker of a complete staged copy of this very source, or ``None``."""
    try:
        with staging.filesystem.open_input_stream(marker) as f:
            recorded = json.loads(f.read())
        info = staging.filesystem.get_file_info(final)
    except (OSError, pa.ArrowException, ValueError):
        return None
    if not isinstance(recorded, dict):
        return None
    if any(recorded.get(k) != v for k, v in stamp.items()):
        return None
    if recorded.get("requested_index_uid") != index_uid:
        return None
    if info.type != pafs.FileType.File or info.size != recorded.get("staged_size"):
        return None
    return recorded


def stage_dump(
    uri: str,
    staging_dir: str,
    allowed_roots: Sequence[str] | None,
    *,
    index_uid: str | None = None,
    pick_index: bool = False,
) -> StagedDump:
    """Make a dump splittable by byte range; return where its NDJSON is.

    Plain NDJSON/JSONL is used in place. Gzip'd NDJSON is decompressed, and a Meilisearch
    ``.dump`` (tar.gz, v6 layout) has one index's ``documents.jsonl`` extracted, into
    ``staging_dir``. ``index_uid`` picks the index of a ``.dump``; it may be omitted when
    the dump holds exactly one. ``pick_index`` says the caller asked for that index
    explicitly, so a dump that holds no index (NDJSON, gzip'd or not) is refused rather than
    the choice ignored. A complete staged copy of the same source (same size, mtime and last
    64 KiB) is reused rather than rebuilt.
    """
    source = resolve_dump(uri, allowed_roots)
    kind = _sniff(source)
    if pick_index and kind != "meilisearch_dump":
        what = "gzip'd NDJSON" if kind == "gzip" else "plain NDJSON"
        raise DumpSourceError(
            f"dump {uri!r} is {what}, which holds no index to pick: a source index "
            "(--source-index) applies only to a Meilisearch .dump archive; drop it and name the "
            "target index alone"
        )
    if kind == "ndjson":  # plain NDJSON carries no index of its own; the caller's uid applies
        return StagedDump(source, None, None, uri, kind="ndjson", index_uid=index_uid)

    staging = _StagingDir.open(staging_dir)
    stamp = _source_stamp(source)
    final = staging.join(_staged_name(source, stamp, index_uid))
    marker = final + ".complete"
    recorded = _reuse(staging, final, marker, stamp, index_uid)
    if recorded is None:
        staging.remove_quietly(marker)
        if kind == "gzip":
            _stage_gzip(source, staging, final)
            recorded = {"primary_key": None, "settings": None, "index_uid": index_uid}
        else:
            recorded = _stage_meilisearch_dump(source, staging, final, index_uid)
        recorded.update(stamp)
        recorded["requested_index_uid"] = index_uid
        recorded["kind"] = kind
        recorded["staged_size"] = staging.filesystem.get_file_info(final).size
        payload = json.dumps(recorded, sort_keys=True).encode()
        try:
            staging.write(marker, [payload], needed=len(payload))
        except DumpSourceError:
            staging.remove_quietly(final)  # without its marker the copy would never be reused
            raise
        reused = False
    else:
        reused = True
        _touch(staging, marker)
    ref = DumpRef(
        uri=staging.uri_of(final),
        filesystem=staging.filesystem,
        path=final,
        size=int(recorded["staged_size"]),
        mtime_ns=staging.filesystem.get_file_info(final).mtime_ns,
    )
    return StagedDump(
        ref=ref,
        primary_key=recorded.get("primary_key"),
        settings=recorded.get("settings"),
        source_uri=uri,
        kind=kind,
        index_uid=recorded.get("index_uid"),
        reused=reused,
        unapplied_update_files=tuple(recorded.get("unapplied_update_files") or ()),
    )


def _stage_gzip(source: DumpRef, staging: _StagingDir, final: str) -> None:
    try:
        with source.filesystem.open_input_stream(source.path, compression="gzip") as stream:
            staging.write(final, _source_blocks(stream), needed=None)
    except _CorruptSource as exc:
        raise DumpSourceError(
            f"dump {source.uri!r} is not valid gzip ({exc.detail}); check that the file is complete"
        ) from None


def _stage_meilisearch_dump(
    source: DumpRef, staging: _StagingDir, final: str, index_uid: str | None
) -> dict[str, Any]:
    """Extract one index's ``documents.jsonl`` to ``final``; return what goes in the marker."""

    def write_documents(handle: IO[bytes], size: int) -> None:
        staging.write(final, _source_blocks(handle), needed=size)

    try:
        index = read_meilisearch_dump(source, index_uid, write_documents)
    except _CorruptSource as exc:
        staging.remove_quietly(final)
        raise DumpSourceError(
            f"dump {source.uri!r} is not a readable tar.gz archive ({exc.detail}); "
            "check that the file is complete"
        ) from None
    except DumpSourceError:
        staging.remove_quietly(final)
        raise
    return {
        "primary_key": index.primary_key,
        "settings": index.settings,
        "index_uid": index.index_uid,
        "unapplied_update_files": list(index.unapplied_update_files),
    }


#: What a staged copy is named (``_staged_name``), its marker, and a write cut short.
_COPY = re.compile(r".+-[0-9a-f]{16}\.jsonl")
_PARTIAL = re.compile(r".+\.partial-\d+-[0-9a-f]{8}")
_MARKER_SUFFIX = ".complete"


def mark_staged_used(staged: StagedDump) -> None:
    """Record that a staged copy is about to be named by new job rows, so a concurrent prune
    leaves it (planning calls it just before it writes them; a plain NDJSON dump is a no-op)."""
    if staged.kind == "ndjson":
        return
    ref = staged.ref
    local = isinstance(ref.filesystem, pafs.LocalFileSystem)
    _touch(_StagingDir(ref.uri, ref.filesystem, posixpath.dirname(ref.path), local), ref.path + _MARKER_SUFFIX)


def _touch(staging: _StagingDir, marker: str) -> None:
    """Record that a staged copy was used again, so a prune leaves it for a while longer."""
    with contextlib.suppress(OSError, pa.ArrowException):
        if staging.is_local:
            os.utime(marker)
        else:  # object stores have no utime: the same bytes, written again
            with staging.filesystem.open_input_stream(marker) as f:
                payload = f.read()
            staging.write(marker, [payload], needed=None)


@dataclass
class StagedRemoval:
    """What :func:`remove_unused_staged` deleted (paths) and kept."""

    removed: list[str]
    bytes_freed: int = 0
    kept_in_use: int = 0
    kept_recent: int = 0
    #: Why the staging dir could not be cleaned (not listed at all, or a file not deleted).
    error: str | None = None


def remove_unused_staged(staging_dir: str, in_use: Iterable[str], idle_s: float) -> StagedRemoval:
    """Delete staged copies (with their markers) that no job names and nobody staged or reused
    for ``idle_s`` seconds, and writes cut short (``.partial-*``) as old. A staging dir that
    does not exist holds nothing to delete (it is not created).

    ``in_use``: the URIs jobs name (``data_uri``); a copy is matched by its file name, which
    holds a digest of its source's identity, so a URI spelled another way still keeps it. The
    idle time is what keeps a copy a planning is reusing right now (it touches the marker)
    before its rows exist. Files not named like a staged copy are never touched.
    """
    staging = _StagingDir.open(staging_dir, create=False)
    keep = {posixpath.basename(u.rstrip("/")) for u in in_use}
    cutoff_ns = int((time.time() - idle_s) * 1e9)
    try:
        infos = staging.filesystem.get_file_info(pafs.FileSelector(staging.path, recursive=False, allow_not_found=True))
    except (OSError, pa.ArrowException) as exc:
        raise DumpSourceError(f"staging dir {staging_dir!r} cannot be listed: {exc}") from None
    files = {posixpath.basename(i.path): i for i in infos if i.type == pafs.FileType.File}
    out = StagedRemoval(removed=[])

    def idle(*names: str) -> bool:
        """Unused for the idle time, read again now: a planning may have reused it since the
        listing (it touches the marker)."""
        paths = [files[n].path for n in names if n in files]
        try:
            stamps = [i.mtime_ns for i in staging.filesystem.get_file_info(paths) if i.type == pafs.FileType.File]
        except (OSError, pa.ArrowException):
            return False
        return len(stamps) == len(paths) and all(m is not None and m < cutoff_ns for m in stamps)

    def remove(name: str) -> None:
        info = files[name]
        try:
            staging.filesystem.delete_file(info.path)
        except FileNotFoundError:
            return
        except (OSError, pa.ArrowException) as exc:  # the others are still tried
            out.error = f"staged file {staging.uri_of(info.path)!r} cannot be deleted: {exc}"
            return
        out.removed.append(staging.uri_of(info.path))
        out.bytes_freed += info.size or 0

    for name in sorted(files):
        if _PARTIAL.fullmatch(name):
            if idle(name):
                remove(name)
            continue
        copy = name[: -len(_MARKER_SUFFIX)] if name.endswith(_MARKER_SUFFIX) else name
        marker = copy + _MARKER_SUFFIX
        if not _COPY.fullmatch(copy) or marker not in files or (name != copy and copy in files):
            continue  # not a staged copy (ours carry a marker), or a marker handled with its copy
        if copy in keep:
            out.kept_in_use += 1
        elif not idle(copy, marker):
            out.kept_recent += 1
        else:
            for n in (marker, copy):  # the marker first: a copy without one is never reused
                if n in files:
                    remove(n)
    return out
