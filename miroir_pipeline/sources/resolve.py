"""Resolve a dump URI to a readable file, refusing bad input before any job is queued.

Every URI goes through :mod:`pyarrow.fs` (plain local path, ``file://``, ``s3://``, ``gs://``,
``hdfs://``), so local and remote dumps share one code path. :func:`resolve_dump` refuses a
URI outside the allowed roots, a missing file, a directory or an unreadable file.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

__all__ = [
    "DumpRef",
    "DumpSourceError",
    "Location",
    "access_error",
    "errno_of",
    "locate",
    "resolve_dump",
    "resolve_planned_dump",
]

_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


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
    #: Modification time when resolved, where the filesystem reports one: with ``size``, what
    #: tells the file a plan was made on from another file later put under the same name.
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Location:
    """A URI split into local/remote, without touching the network."""

    is_local: bool
    path: str  # real path for local files, filesystem path for remote ones
    normalized: str  # what allowed roots are compared against


def locate(uri: str, what: str = "dump") -> Location:
    """Split a URI into local/remote and its normalised form, without touching the network.

    ``what`` names the URI's role in error messages (``dump``, ``staging dir``, ...).
    """
    if not uri or not uri.strip():
        raise DumpSourceError(
            f"{what} URI is empty; pass a path or a URI such as s3://bucket/dump.jsonl"
        )
    if not _SCHEME_RE.match(uri):
        real = os.path.realpath(uri)
        return Location(True, real, real)
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
        return Location(True, real, real)
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
    return Location(False, path, normalized)


def _within(loc: Location, root: Location) -> bool:
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


def _check_roots(uri: str, loc: Location, allowed_roots: Sequence[str] | None) -> None:
    if allowed_roots is None:
        return
    roots = [allowed_roots] if isinstance(allowed_roots, str) else list(allowed_roots)
    if not roots:
        raise DumpSourceError(
            f"dump {uri!r} refused: no dump roots are allowed (the allowed-roots list is empty); "
            "configure the directories or URI prefixes dumps may be read from "
            "(MIROIR_ALLOWED_ROOTS, comma-separated)"
        )
    for root in roots:
        if _within(loc, locate(root, what="allowed root")):
            return
    if loc.is_local:
        example = os.path.dirname(loc.path)
    else:
        parts = urlsplit(uri)
        folder = posixpath.dirname(parts.path).rstrip("/")
        example = f"{parts.scheme}://{parts.netloc}{folder}/"
    raise DumpSourceError(
        f"dump {uri!r} is outside the allowed dump roots {roots}; move the dump under one of "
        "them or add its location to the allowed roots: MIROIR_ALLOWED_ROOTS, comma-separated "
        f"(e.g. MIROIR_ALLOWED_ROOTS={example})"
    )


def errno_of(exc: BaseException) -> int | None:
    """The ``errno`` an exception carries, if any (pyarrow errors often have one)."""
    code = getattr(exc, "errno", None)
    return code if isinstance(code, int) else None


def access_error(uri: str, exc: BaseException) -> DumpSourceError:
    """Turn a failure to open or stat a dump into a message that says what to fix."""
    code = errno_of(exc)
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
    loc = locate(uri)
    _check_roots(uri, loc, allowed_roots)
    try:
        if loc.is_local:
            filesystem: pafs.FileSystem = pafs.LocalFileSystem()
            path = loc.path
        else:
            filesystem, path = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path)
    except (OSError, pa.ArrowException) as exc:
        raise access_error(uri, exc) from None
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
        raise access_error(uri, exc) from None
    return DumpRef(
        uri=loc.path if loc.is_local else uri,
        filesystem=filesystem,
        path=path,
        size=int(info.size),
        mtime_ns=info.mtime_ns,
    )


def resolve_planned_dump(uri: str, size: int | None, line_starts: Sequence[int]) -> DumpRef:
    """The dump a chunk was planned on, refused when the file under that name no longer fits
    the plan: a path that resolves elsewhere now (the roots were checked on the real path), another
    size (``None`` for chunks planned before it was recorded), or a byte of
    ``line_starts`` (the chunk's cursor and end) that no longer begins a line, so the chunk's
    range would cut lines. A dump fixed in place without moving a line still fits: that is how
    an operator repairs a bad line and retries its chunk."""
    ref = resolve_dump(uri, None)
    if ref.uri != uri and not _SCHEME_RE.match(uri):
        # Planning checked the allowed roots on this real path; a symlink put on the way since
        # would lead the worker to a file nobody checked.
        raise DumpSourceError(
            f"dump {uri!r} now resolves to {ref.uri!r}: a symlink on its path changed since this "
            "import was planned, and workers read only the real path planning checked against "
            "the allowed roots. Restore the path, or cancel the import and plan it again"
        )
    if size is not None and ref.size != size:
        raise _changed(uri, f"planned {size} bytes, now {ref.size}")
    try:
        with ref.filesystem.open_input_file(ref.path) as f:
            for at in line_starts:
                if 0 < at < ref.size and f.read_at(1, at - 1) != b"\n":
                    raise _changed(uri, f"byte {at} no longer begins a line")
    except (OSError, pa.ArrowException) as exc:
        raise access_error(uri, exc) from None
    return ref


def _changed(uri: str, what: str) -> DumpSourceError:
    return DumpSourceError(
        f"dump {uri!r} changed since this import was planned ({what}), so its chunks' byte "
        "ranges no longer fit it. Put the planned file back to finish this import, or cancel it "
        "and import the new file"
    )
