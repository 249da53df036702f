"""Dump sources: resolve a dump URI, read it by byte range, stage compressed dumps (DESIGN §5, §9).

Every URI goes through :mod:`pyarrow.fs` (plain local path, ``file://``, ``s3://``, ``gs://``,
``hdfs://``), so local and remote dumps share one code path. :func:`resolve_dump` is the
gate that refuses bad input before any job is queued: a URI outside the allowed roots, a
missing file, a directory or an unreadable file. :func:`open_range` is the hot-path reader
of one chunk's ``[start, end)`` bytes. :func:`stage_dump` turns gzip'd NDJSON and
Meilisearch ``.dump`` archives into a plain NDJSON file that can be split by byte range.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import posixpath
import re
import secrets
import shutil
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Literal
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

__all__ = [
    "BLOCK_SIZE",
    "DumpRef",
    "DumpSourceError",
    "StagedDump",
    "iter_range_blocks",
    "open_range",
    "resolve_dump",
    "stage_dump",
]

#: Read size for dump bytes: big enough that per-call overhead vanishes, even on object stores.
BLOCK_SIZE = 8 * 1024 * 1024

_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GZIP_MAGIC = b"\x1f\x8b"
_TAR_MAGIC_OFFSET = 257
_INDEX_MEMBER_RE = re.compile(
    r"^indexes/(?P<uid>[A-Za-z0-9_-]{1,400})/(?P<file>documents\.jsonl|metadata\.json|settings\.json)$"
)
_MAX_JSON_MEMBER = 64 * 1024 * 1024
_SUPPORTED_DUMP_VERSIONS = ("V6",)

DumpKind = Literal["ndjson", "gzip", "meilisearch_dump"]


class DumpSourceError(ValueError):
    """A dump that cannot be used; the message names the URI and what to do about it."""


@dataclass(frozen=True)
class DumpRef:
    """A resolved, readable dump file.

    ``uri`` is canonical: the real path (symlinks and ``..`` resolved) for local files, the
    URI as given for remote ones. ``filesystem`` and ``path`` are what pyarrow opens.
    """

    uri: str
    filesystem: pafs.FileSystem = field(compare=False, repr=False)
    path: str
    size: int


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


# --- resolving ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Location:
    is_local: bool
    path: str  # real path for local files, filesystem path for remote ones
    normalized: str  # what allowed roots are compared against


def _locate(uri: str, what: str = "dump") -> _Location:
    """Split a URI into local/remote and its normalised form, without touching the network."""
    if not uri or not uri.strip():
        raise DumpSourceError(
            f"{what} URI is empty; pass a path or a URI such as s3://bucket/dump.jsonl"
        )
    if not _SCHEME_RE.match(uri):
        real = os.path.realpath(uri)
        return _Location(True, real, real)
    parts = urlsplit(uri)
    if parts.password is not None:
        raise DumpSourceError(
            f"{what} URI for {parts.scheme}://{parts.hostname or ''}{parts.path} carries a password; "
            "URIs are stored in the jobs table and shown in Dagster, so give credentials "
            "through the environment (e.g. AWS_ACCESS_KEY_ID / GOOGLE_APPLICATION_CREDENTIALS)"
        )
    if parts.fragment:
        raise DumpSourceError(f"{what} URI {uri!r} has a #fragment; remove it")
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DumpSourceError(
                f"{what} URI {uri!r} names host {parts.netloc!r}; file:// URIs must be local "
                "(file:///absolute/path)"
            )
        real = os.path.realpath(unquote(parts.path))
        return _Location(True, real, real)
    segments = unquote(parts.path).split("/")
    if any(seg in (".", "..") for seg in segments):
        raise DumpSourceError(
            f"{what} URI {uri!r} contains '.' or '..' path segments; object stores keep them "
            "literally, so write the plain path"
        )
    path = posixpath.normpath("/" + unquote(parts.path)) if parts.path else "/"
    normalized = f"{scheme}://{parts.netloc}{path}"
    if parts.query:
        normalized += "?" + parts.query
    return _Location(False, path, normalized)


def _within(loc: _Location, root: _Location) -> bool:
    if loc.is_local != root.is_local:
        return False
    if loc.is_local:
        return os.path.commonpath([root.path, loc.path]) == root.path
    base, _, root_query = root.normalized.partition("?")
    target, _, query = loc.normalized.partition("?")
    if query != root_query:  # query options (e.g. endpoint_override) must match the root's
        return False
    base = base.rstrip("/")
    return target == base or target.startswith(base + "/")


def _check_roots(uri: str, loc: _Location, allowed_roots: Sequence[str] | None) -> None:
    if allowed_roots is None:
        return
    roots = [allowed_roots] if isinstance(allowed_roots, str) else list(allowed_roots)
    if not roots:
        raise DumpSourceError(
            f"dump {uri!r} refused: no dump roots are allowed (the allowed-roots list is empty); "
            "configure the directories or URI prefixes dumps may be read from"
        )
    for root in roots:
        if _within(loc, _locate(root, what="allowed root")):
            return
    raise DumpSourceError(
        f"dump {uri!r} is outside the allowed dump roots {roots}; move the dump under one of "
        "them or add its location to the allowed roots"
    )


def _errno_of(exc: BaseException) -> int | None:
    code = getattr(exc, "errno", None)
    return code if isinstance(code, int) else None


def _access_error(uri: str, exc: BaseException) -> DumpSourceError:
    code = _errno_of(exc)
    if code in (errno.EACCES, errno.EPERM) or isinstance(exc, PermissionError):
        return DumpSourceError(
            f"dump {uri!r} cannot be read: permission denied; make the file and its directories "
            f"readable by the user the workers run as (uid {os.geteuid()})"
        )
    if code == errno.ENOENT or isinstance(exc, FileNotFoundError):
        return DumpSourceError(f"dump {uri!r} does not exist; check the path or URI")
    return DumpSourceError(f"dump {uri!r} cannot be read: {exc}; check the URI and credentials")


def resolve_dump(uri: str, allowed_roots: Sequence[str] | None) -> DumpRef:
    """Check a dump URI and return a :class:`DumpRef` to read it.

    ``allowed_roots`` are directories or URI prefixes; ``None`` means no restriction, while
    an empty list allows nothing. Local paths are compared after ``realpath`` (no escape by
    ``..`` or symlinks); remote URIs as prefixes of the normalised URI, on path boundaries.
    """
    loc = _locate(uri)
    _check_roots(uri, loc, allowed_roots)
    try:
        if loc.is_local:
            filesystem: pafs.FileSystem = pafs.LocalFileSystem()
            path = loc.path
        else:
            filesystem, path = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path)
    except (OSError, pa.ArrowException) as exc:
        raise _access_error(uri, exc) from None
    if info.type == pafs.FileType.NotFound:
        raise DumpSourceError(f"dump {uri!r} does not exist; check the path or URI")
    if info.type == pafs.FileType.Directory:
        raise DumpSourceError(
            f"dump {uri!r} is a directory; pass the NDJSON file (or .dump archive) inside it"
        )
    if info.type != pafs.FileType.File:
        raise DumpSourceError(f"dump {uri!r} is not a regular file ({info.type!r})")
    try:
        with filesystem.open_input_file(path) as probe:
            probe.read(0)
    except (OSError, pa.ArrowException) as exc:
        raise _access_error(uri, exc) from None
    return DumpRef(
        uri=loc.path if loc.is_local else uri, filesystem=filesystem, path=path, size=int(info.size)
    )


# --- reading ------------------------------------------------------------------------------


class _RangeRaw(io.RawIOBase):
    """Raw reader confined to ``[start, end)`` of a pyarrow random-access file.

    Positions (``tell``/``seek``) are absolute offsets in the dump, so a reader's position
    can be stored as a resume cursor directly.
    """

    def __init__(self, source: pa.NativeFile, start: int, end: int) -> None:
        super().__init__()
        self._source = source
        self.start = start
        self.end = end
        self._pos = start
        source.seek(start)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.end - self._pos)
        if want <= 0:
            return 0
        view = memoryview(buffer).cast("B")
        got = int(self._source.readinto(view[:want]))
        self._pos += got
        return got

    def readall(self) -> bytes:
        # RawIOBase.readall would loop in 8 KiB steps; read the rest of the range at once.
        data = bytes(self._source.read(self.end - self._pos)) if self._pos < self.end else b""
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END:
            target = self.end + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if not self.start <= target <= self.end:
            raise ValueError(
                f"offset {target} is outside this reader's range [{self.start}, {self.end})"
            )
        if target != self._pos:
            self._source.seek(target)
            self._pos = target
        return target

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()


def _check_range(ref: DumpRef, start: int, end: int) -> None:
    if not 0 <= start <= end <= ref.size:
        raise ValueError(
            f"byte range [{start}, {end}) is outside dump {ref.uri!r} of {ref.size} bytes"
        )


def open_range(
    ref: DumpRef, start: int, end: int, block_size: int = BLOCK_SIZE
) -> io.BufferedReader:
    """A buffered binary reader of bytes ``[start, end)`` of the dump.

    Reads the underlying file in ``block_size`` blocks; ``read``, ``readline``, ``readinto``,
    ``peek`` and iteration work as on any binary file and stop at ``end``. ``tell()`` and
    ``seek()`` use absolute dump offsets within ``[start, end]``. Close it (or use ``with``).
    """
    _check_range(ref, start, end)
    try:
        source = ref.filesystem.open_input_file(ref.path)
    except (OSError, pa.ArrowException) as exc:
        raise _access_error(ref.uri, exc) from None
    return io.BufferedReader(_RangeRaw(source, start, end), buffer_size=block_size)


def iter_range_blocks(
    ref: DumpRef, start: int, end: int, block_size: int = BLOCK_SIZE
) -> Iterator[bytes]:
    """Yield bytes ``[start, end)`` of the dump as consecutive blocks of up to ``block_size``."""
    _check_range(ref, start, end)
    with ref.filesystem.open_input_file(ref.path) as source:
        pos = start
        while pos < end:
            block = source.read_at(min(block_size, end - pos), pos)
            if not block:
                raise DumpSourceError(
                    f"dump {ref.uri!r} ended at byte {pos}, before the expected {end}; "
                    "was it truncated or replaced while importing?"
                )
            pos += len(block)
            yield block


# --- staging ------------------------------------------------------------------------------


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
    def open(cls, staging_dir: str) -> _StagingDir:
        loc = _locate(staging_dir, what="staging dir")
        try:
            if loc.is_local:
                fs: pafs.FileSystem = pafs.LocalFileSystem()
                path = loc.path
            else:
                fs, path = pafs.FileSystem.from_uri(staging_dir)
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
        if self.is_local:
            return path
        base = self.display.rstrip("/")
        return base + "/" + posixpath.basename(path)

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
            if isinstance(exc, OSError) and _errno_of(exc) == errno.ENOSPC:
                raise self.no_space(attempted, needed) from None
            if isinstance(exc, (OSError, pa.ArrowException)):
                raise DumpSourceError(
                    f"staging into {self.display!r} failed after {written} bytes: {exc}"
                ) from None
            raise
        return written


def _stream_blocks(
    stream: IO[bytes] | pa.NativeFile, block_size: int = BLOCK_SIZE
) -> Iterator[bytes]:
    while True:
        block = stream.read(block_size)
        if not block:
            return
        yield bytes(block)


def _staged_name(source: DumpRef, index_uid: str | None) -> str:
    digest = hashlib.sha256(f"{source.uri}\0{index_uid or ''}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(source.path))[:60] or "dump"
    return f"{stem}-{digest}.jsonl"


def _source_stamp(source: DumpRef) -> dict[str, Any]:
    info = source.filesystem.get_file_info(source.path)
    return {"source_uri": source.uri, "source_size": source.size, "source_mtime_ns": info.mtime_ns}


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
) -> StagedDump:
    """Make a dump splittable by byte range; return where its NDJSON is.

    Plain NDJSON/JSONL is used in place. Gzip'd NDJSON is decompressed, and a Meilisearch
    ``.dump`` (tar.gz, v6 layout) has one index's ``documents.jsonl`` extracted, into
    ``staging_dir`` — streaming, in bounded memory. ``index_uid`` picks the index of a
    ``.dump``; it may be omitted when the dump holds exactly one. A complete staged copy of
    the same source (same size and mtime) is reused rather than rebuilt.
    """
    source = resolve_dump(uri, allowed_roots)
    kind = _sniff(source)
    if kind == "ndjson":  # plain NDJSON carries no index of its own; the caller's uid applies
        return StagedDump(source, None, None, uri, kind="ndjson", index_uid=index_uid)

    staging = _StagingDir.open(staging_dir)
    final = staging.join(_staged_name(source, index_uid))
    marker = final + ".complete"
    stamp = _source_stamp(source)
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
    ref = DumpRef(
        uri=staging.uri_of(final),
        filesystem=staging.filesystem,
        path=final,
        size=int(recorded["staged_size"]),
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
            staging.write(final, _guard_read(source, _stream_blocks(stream)), needed=None)
    except _CorruptSource as exc:
        raise DumpSourceError(
            f"dump {source.uri!r} is not valid gzip ({exc.detail}); check that the file is complete"
        ) from None


class _CorruptSource(Exception):
    """Reading (not writing) failed: kept apart so a corrupt input is not blamed on the disk."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _guard_read(source: DumpRef, blocks: Iterator[bytes]) -> Iterator[bytes]:
    while True:
        try:
            block = next(blocks)
        except StopIteration:
            return
        except (OSError, pa.ArrowException, tarfile.TarError, EOFError) as exc:
            raise _CorruptSource(str(exc)) from None
        yield block


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


def _stage_meilisearch_dump(
    source: DumpRef, staging: _StagingDir, final: str, index_uid: str | None
) -> dict[str, Any]:
    """Stream a v6 ``.dump`` once, extracting only the chosen index's three members.

    Member names are matched against fixed patterns and never used as output paths, so a
    crafted name (``../x``, absolute paths) cannot write outside the staging dir; links are
    refused.
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
                        if uid and re.fullmatch(r"[A-Za-z0-9_-]{1,400}", uid):
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
                    staging.write(
                        final, _guard_read(source, _stream_blocks(handle)), needed=member.size
                    )
                    documents_done = True
    except _CorruptSource as exc:
        staging.remove_quietly(final)
        raise DumpSourceError(
            f"dump {source.uri!r} is not a readable tar.gz archive ({exc.detail}); "
            "check that the file is complete"
        ) from None
    except (tarfile.TarError, OSError, pa.ArrowException, EOFError) as exc:
        staging.remove_quietly(final)
        raise DumpSourceError(
            f"dump {source.uri!r} is not a readable tar.gz archive ({exc}); "
            "check that the file is complete"
        ) from None
    except DumpSourceError:
        staging.remove_quietly(final)
        raise

    problem: str | None = None
    if version is None:
        problem = "has no top-level metadata.json, so it is not a Meilisearch dump"
    elif chosen is None:
        problem = "holds no index"
    elif not documents_done:
        found = ", ".join(seen) or "none"
        problem = (
            f"has no documents for index {chosen!r} (indexes found: {found}); pass one of them"
        )
    elif not index_meta_seen:
        problem = f"has no indexes/{chosen}/metadata.json"
    if problem is not None:
        staging.remove_quietly(final)
        raise DumpSourceError(f"dump {source.uri!r} {problem}")
    return {
        "primary_key": primary_key,
        "settings": settings,
        "index_uid": chosen,
        "unapplied_update_files": unapplied,
    }
