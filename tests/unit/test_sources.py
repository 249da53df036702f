"""Dump sources: bad URIs are refused up front, ranges read exactly,
compressed dumps are staged in bounded memory, and a full disk is reported clearly."""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from miroir_pipeline.sources import (
    DumpRef,
    DumpSourceError,
    iter_line_blocks,
    open_range,
    resolve_dump,
    stage_dump,
)
from miroir_pipeline.sources import staging as sources

DOCS = b"".join(b'{"id":%d,"title":"doc %d"}\n' % (i, i) for i in range(1000))


@pytest.fixture
def dump(tmp_path: Path) -> Path:
    root = tmp_path / "dumps"
    root.mkdir()
    path = root / "docs.jsonl"
    path.write_bytes(DOCS)
    return path


# --- resolving ------------------------------------------------------------------------------


def test_resolve_local_path_file_uri_and_relative(
    dump: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = resolve_dump(str(dump), None)
    assert ref.uri == str(dump.resolve())
    assert ref.path == str(dump.resolve())
    assert ref.size == len(DOCS)
    assert isinstance(ref.filesystem, pafs.LocalFileSystem)
    assert resolve_dump(dump.as_uri(), None) == ref
    monkeypatch.chdir(dump.parent.parent)
    assert resolve_dump("dumps/../dumps/docs.jsonl", None) == ref


def test_dump_ref_excludes_filesystem_from_eq_and_repr(dump: Path) -> None:
    ref = resolve_dump(str(dump), None)
    other = DumpRef(ref.uri, pafs.LocalFileSystem(), ref.path, ref.size, ref.mtime_ns)
    assert ref == other
    assert "filesystem" not in repr(ref)
    with pytest.raises(AttributeError):
        ref.size = 3  # type: ignore[misc]


def test_allowed_roots_accept_inside(dump: Path) -> None:
    root = str(dump.parent)
    assert resolve_dump(str(dump), [root]).size == len(DOCS)
    assert resolve_dump(str(dump), [dump.parent.as_uri()]).size == len(DOCS)
    assert resolve_dump(str(dump), ["s3://bucket/x", root + "/"]).size == len(DOCS)
    assert resolve_dump(str(dump), root).size == len(DOCS)  # a lone string is one root


def test_allowed_roots_refuse_outside_and_dotdot(dump: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.jsonl"
    outside.write_bytes(b'{"id":1}\n')
    root = str(dump.parent)
    for uri in (str(outside), f"{root}/../secret.jsonl", outside.as_uri()):
        with pytest.raises(DumpSourceError) as info:
            resolve_dump(uri, [root])
        assert "outside the allowed dump roots" in str(info.value)
        assert repr(uri) in str(info.value)


def test_allowed_roots_respect_path_boundaries(tmp_path: Path) -> None:
    (tmp_path / "dumps").mkdir()
    evil = tmp_path / "dumps-evil"
    evil.mkdir()
    (evil / "d.jsonl").write_bytes(b"{}\n")
    with pytest.raises(DumpSourceError, match="outside the allowed"):
        resolve_dump(str(evil / "d.jsonl"), [str(tmp_path / "dumps")])


def test_symlink_cannot_escape_the_roots(dump: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.jsonl"
    outside.write_bytes(b'{"id":1}\n')
    link = dump.parent / "innocent.jsonl"
    link.symlink_to(outside)
    with pytest.raises(DumpSourceError, match="outside the allowed"):
        resolve_dump(str(link), [str(dump.parent)])
    inside_link = dump.parent / "alias.jsonl"
    inside_link.symlink_to(dump)
    assert resolve_dump(str(inside_link), [str(dump.parent)]).path == str(dump.resolve())
    # A root that is itself a symlink is compared by its real path too.
    root_link = tmp_path / "root-link"
    root_link.symlink_to(dump.parent)
    assert resolve_dump(str(root_link / "docs.jsonl"), [str(root_link)]).size == len(DOCS)


def test_empty_roots_allow_nothing_none_allows_all(dump: Path) -> None:
    with pytest.raises(DumpSourceError, match="no dump roots are allowed"):
        resolve_dump(str(dump), [])
    assert resolve_dump(str(dump), None).size == len(DOCS)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://other-bucket/dumps/d.jsonl",
        "s3://bucket/dumps-evil/d.jsonl",
        "s3://bucket/d.jsonl",
        "gs://bucket/dumps/d.jsonl",
        "s3://bucket/dumps/d.jsonl?endpoint_override=evil.example:9000",
        "/local/dumps/d.jsonl",
    ],
)
def test_remote_roots_are_prefixes_on_boundaries(uri: str) -> None:
    # Refused before pyarrow resolves anything, so no network is needed.
    with pytest.raises(DumpSourceError, match="outside the allowed dump roots"):
        resolve_dump(uri, ["s3://bucket/dumps"])


def test_remote_dot_segments_are_refused() -> None:
    with pytest.raises(DumpSourceError, match=r"'\.\.' path segments"):
        resolve_dump("s3://bucket/dumps/../private/d.jsonl", ["s3://bucket/dumps"])


def test_password_in_uri_is_refused_without_echoing_it() -> None:
    with pytest.raises(DumpSourceError) as info:
        resolve_dump("s3://AKIDEXAMPLE:sup3r-s3cret@bucket/d.jsonl", None)
    assert "sup3r-s3cret" not in str(info.value)
    assert "environment" in str(info.value)


def test_unknown_scheme_names_the_uri() -> None:
    with pytest.raises(DumpSourceError, match=r"nosuch://host/d\.jsonl"):
        resolve_dump("nosuch://host/d.jsonl", None)


def test_missing_file_and_directory(dump: Path) -> None:
    missing = dump.parent / "nope.jsonl"
    with pytest.raises(DumpSourceError, match=r"does not exist") as info:
        resolve_dump(str(missing), [str(dump.parent)])
    assert str(missing) in str(info.value)
    with pytest.raises(DumpSourceError, match="does not exist"):
        resolve_dump(str(dump.parent / "no-dir" / "x.jsonl"), None)
    with pytest.raises(DumpSourceError, match="is a directory"):
        resolve_dump(str(dump.parent), None)
    with pytest.raises(DumpSourceError, match="empty"):
        resolve_dump("", None)


_AS_NOBODY = """
import os, sys
# Import first: the interpreter's stdlib may sit under a root-only home directory.
from miroir_pipeline.sources import DumpSourceError, resolve_dump
os.setgroups([]); os.setgid(65534); os.setuid(65534)
for path in sys.argv[1:]:
    try:
        ref = resolve_dump(path, None)
        print("OK", ref.size)
    except DumpSourceError as exc:
        print("ERR", exc)
"""


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="miroir-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for sub in path.rglob("*"):
            if sub.is_dir() and not sub.is_symlink():
                sub.chmod(0o755)
        shutil.rmtree(path)


def test_permission_denied_is_reported(world_dir: Path) -> None:
    readable = world_dir / "ok.jsonl"
    readable.write_bytes(b"{}\n")
    readable.chmod(0o644)
    unreadable = world_dir / "locked.jsonl"
    unreadable.write_bytes(b"{}\n")
    unreadable.chmod(0o000)
    closed = world_dir / "closed"
    closed.mkdir()
    (closed / "inner.jsonl").write_bytes(b"{}\n")
    closed.chmod(0o600)  # no x: nothing inside can be reached
    paths = [str(readable), str(unreadable), str(closed / "inner.jsonl")]
    if os.geteuid() == 0:
        # Root reads through chmod 000, so check as user nobody in a child process.
        proc = subprocess.run(
            [sys.executable, "-c", _AS_NOBODY, *paths],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        lines = proc.stdout.splitlines()
    else:
        lines = []
        for path in paths:
            try:
                lines.append(f"OK {resolve_dump(path, None).size}")
            except DumpSourceError as exc:
                lines.append(f"ERR {exc}")
    assert lines[0] == "OK 3"
    for line, path in zip(lines[1:], paths[1:], strict=True):
        assert line.startswith("ERR"), line
        assert "permission denied" in line
        assert repr(path) in line


# --- reading ranges -------------------------------------------------------------------------


def test_open_range_reads_exactly_the_range(dump: Path) -> None:
    ref = resolve_dump(str(dump), None)
    start = DOCS.index(b"\n", 100) + 1
    end = DOCS.index(b"\n", 5000) + 1
    with open_range(ref, start, end) as reader:
        assert reader.tell() == start
        assert reader.read() == DOCS[start:end]
        assert reader.read() == b""
        assert reader.tell() == end
    with open_range(ref, start, end, block_size=7) as reader:
        lines = list(reader)
    assert b"".join(lines) == DOCS[start:end]
    assert all(line.endswith(b"\n") for line in lines)


def test_open_range_readline_stops_at_end_and_seeks_absolute(dump: Path) -> None:
    ref = resolve_dump(str(dump), None)
    with open_range(ref, 10, 20) as reader:
        assert reader.readline() == DOCS[10:20]  # the line continues, but the range does not
        reader.seek(15)
        assert reader.tell() == 15
        assert reader.read(3) == DOCS[15:18]
        reader.seek(0, io.SEEK_END)
        assert reader.tell() == 20
        with pytest.raises(ValueError, match="outside this reader's range"):
            reader.seek(5)
    with pytest.raises(ValueError, match="outside dump"):
        open_range(ref, 0, ref.size + 1)
    with open_range(ref, 0, ref.size) as reader:
        buf = bytearray(ref.size + 100)
        n = reader.readinto(buf)
        assert bytes(buf[:n]) == DOCS


def test_iter_line_blocks_reads_whole_lines_where_they_lie(dump: Path) -> None:
    ref = resolve_dump(str(dump), None)
    start = DOCS.index(b"\n", 3) + 1
    stop = DOCS.index(b"\n", 10_000) + 1
    blocks = list(iter_line_blocks(ref, start, stop, block_size=4096))
    pos = start
    for block in blocks:
        assert block.at == pos and not block.overlong
        assert block.data == DOCS[pos : pos + len(block.data)], "bytes as they are in the dump"
        assert len(block.data) <= 4096 and block.data[: block.end].endswith(b"\n")
        pos += block.end
    assert pos == stop and len(blocks) > 2
    assert list(iter_line_blocks(ref, 5, 5)) == []


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=30),
    last_newline=st.booleans(),
    block_size=st.integers(min_value=1, max_value=120),
    slack=st.integers(min_value=0, max_value=150),
)
@example(lengths=[5, 0], last_newline=True, block_size=5, slack=0)  # a line exactly at the limit
@example(lengths=[9, 2], last_newline=False, block_size=4, slack=4)  # one over, then the last line
def test_property_iter_line_blocks_covers_the_range_and_skips_only_overlong_lines(
    lengths: list[int], last_newline: bool, block_size: int, slack: int
) -> None:
    """Routable blocks and skipped lines tile the range exactly; a line is skipped exactly when
    it is longer than the limit (the range's last line, without a newline, may instead be handed
    over whole for the router to refuse)."""
    max_line = block_size + slack
    lines = [bytes([97 + i % 26]) * n for i, n in enumerate(lengths)]
    data = b"\n".join(lines) + (b"\n" if last_newline else b"")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_bytes(data)
        ref = resolve_dump(str(path), [tmp])
        pos = 0
        skipped = []
        for block in iter_line_blocks(ref, 0, len(data), block_size=block_size, max_line=max_line):
            assert block.at == pos and block.end > 0
            if block.overlong:
                assert block.data == data[pos : pos + len(block.data)][:256]
                skipped.append(data[pos : pos + block.end])
            else:
                assert block.data == data[pos : pos + len(block.data)]
                piece = block.data[: block.end]
                assert piece.endswith(b"\n") or pos + block.end == len(data)
            pos += block.end
        assert pos == len(data)
    complete = lines if last_newline else lines[:-1]
    want = [line + b"\n" for line in complete if len(line) > max_line]
    if skipped and not skipped[-1].endswith(b"\n"):
        assert not last_newline and len(lines[-1]) > max_line
        skipped.pop()
    assert skipped == want


@pytest.mark.parametrize("block_size", [4, 16, 64])
def test_a_crlf_line_exactly_at_the_limit_is_read_not_skipped(tmp_path: Path, block_size: int) -> None:
    """The limit is on the document: a line of exactly ``max_line`` bytes is handed over whether
    it ends in LF or CR LF; one byte more is skipped when it cannot fit in a read (in a block
    read whole, the router refuses it by its length)."""
    max_line = 20
    exact, over = b"a" * max_line, b"b" * (max_line + 1)
    data = exact + b"\r\n" + over + b"\r\n" + b"c\r\n"
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    ref = resolve_dump(str(path), [str(tmp_path)])
    routed, skipped = [], []
    for block in iter_line_blocks(ref, 0, len(data), block_size=block_size, max_line=max_line):
        (skipped if block.overlong else routed).append(data[block.at : block.at + block.end])
    handed = b"".join(routed).split(b"\r\n")[:-1]
    assert handed == ([exact, b"c"] if skipped else [exact, over, b"c"])
    assert skipped == ([over + b"\r\n"] if block_size <= max_line else [])


def test_truncated_dump_is_reported_while_reading(dump: Path) -> None:
    ref = resolve_dump(str(dump), None)
    dump.write_bytes(DOCS[:100])
    with pytest.raises(DumpSourceError, match="truncated"):
        list(iter_line_blocks(ref, 0, ref.size))


def test_dump_shrinking_mid_line_is_reported_not_retried_forever(tmp_path: Path) -> None:
    """A short read that ends inside a line (the dump was cut under a running chunk) must end
    in an error naming the offset, not in re-reading the same partial line again and again."""
    path = tmp_path / "shrink.ndjson"
    path.write_bytes(b'{"id":1}\n{"id":2,"pad":"' + b"a" * 100 + b'"}\n')
    ref = resolve_dump(str(path), None)
    with open(path, "r+b") as fh:
        fh.truncate(40)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            list(iter_line_blocks(ref, 9, ref.size, block_size=16, max_line=1000))
            outcome.append(None)
        except BaseException as exc:  # handed to the asserting thread
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert outcome, "iter_line_blocks kept re-reading a dump that shrank mid-line"
    assert isinstance(outcome[0], DumpSourceError)
    assert "ended at byte 40" in str(outcome[0]) and "truncated or replaced" in str(outcome[0])


# --- staging --------------------------------------------------------------------------------


def test_plain_ndjson_is_used_in_place(dump: Path, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staged = stage_dump(str(dump), str(staging), [str(dump.parent)])
    assert staged.ref == resolve_dump(str(dump), None)
    assert staged.kind == "ndjson"
    assert staged.primary_key is None and staged.settings is None
    assert staged.source_uri == str(dump)
    assert not staging.exists() or not any(staging.iterdir())


def test_gzip_staging_round_trip_and_reuse(tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl.gz"
    # Two gzip members, as `cat a.gz b.gz` produces.
    src.write_bytes(gzip.compress(DOCS[:5000]) + gzip.compress(DOCS[5000:]))
    staging = tmp_path / "staging"
    first = stage_dump(str(src), str(staging), None)
    assert first.kind == "gzip"
    assert not first.reused
    assert Path(first.ref.path).read_bytes() == DOCS
    assert first.ref.size == len(DOCS)
    assert Path(first.ref.path).parent == staging.resolve()
    assert first.source_uri == str(src)
    mtime = os.stat(first.ref.path).st_mtime_ns

    again = stage_dump(str(src), str(staging), None)
    assert again.reused
    assert again.ref == first.ref
    assert os.stat(again.ref.path).st_mtime_ns == mtime

    # A changed source is staged afresh, beside the copy an unfinished import may still read.
    src.write_bytes(gzip.compress(DOCS[:777]))
    third = stage_dump(str(src), str(staging), None)
    assert not third.reused
    assert third.ref.path != first.ref.path
    assert Path(third.ref.path).read_bytes() == DOCS[:777]
    assert Path(first.ref.path).read_bytes() == DOCS
    assert sorted(p.name for p in staging.iterdir()) == sorted(
        name for ref in (first.ref, third.ref) for name in (Path(ref.path).name, Path(ref.path).name + ".complete")
    )


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_unused_staged_copies_are_removed_and_named_or_recent_ones_kept(tmp_path: Path) -> None:
    """Prune's side of staging: a copy no job names and unused for the idle time goes with its
    marker, as does a write cut short; a named copy, a recently reused one (reuse touches its
    marker) and files not named like staged ones stay."""
    staging = tmp_path / "staging"
    copies = {}
    for name, docs in (("named", DOCS[:3000]), ("unused", DOCS[:4000]), ("reused", DOCS[:5000])):
        src = tmp_path / f"{name}.jsonl.gz"
        src.write_bytes(gzip.compress(docs))
        copies[name] = stage_dump(str(src), str(staging), None)
    (staging / "notes.txt").write_text("an operator's file")
    (staging / "events-2026120405543012.jsonl").write_text("named like a copy, but no marker\n")
    partial = staging / "x-0123456789abcdef.jsonl.partial-42-deadbeef"
    partial.write_bytes(b"{}")
    for f in staging.iterdir():
        _age(f, 7200)
    assert stage_dump(str(tmp_path / "reused.jsonl.gz"), str(staging), None).reused  # touches its marker

    named = copies["named"].ref.uri
    unused = Path(copies["unused"].ref.path)
    sizes = sum(f.stat().st_size for f in (unused, Path(str(unused) + ".complete"), partial))
    out = sources.remove_unused_staged(str(staging), {named, "/dumps/plain.ndjson"}, 3600)
    assert sorted(out.removed) == sorted([str(unused), str(unused) + ".complete", str(partial)])
    assert out.bytes_freed == sizes
    assert (out.kept_in_use, out.kept_recent) == (1, 1)
    left = sorted(f.name for f in staging.iterdir())
    assert left == sorted(["notes.txt", "events-2026120405543012.jsonl", *(n for k in ("named", "reused") for n in (Path(copies[k].ref.path).name, Path(copies[k].ref.path).name + ".complete"))])
    # The kept copy is still reused as is; the removed one is staged again when asked for.
    assert stage_dump(str(tmp_path / "named.jsonl.gz"), str(staging), None).reused
    assert not stage_dump(str(tmp_path / "unused.jsonl.gz"), str(staging), None).reused
    # A staging dir that does not exist holds nothing to delete, and is not created.
    missing = tmp_path / "no-staging-yet"
    assert sources.remove_unused_staged(str(missing), set(), 3600).removed == []
    assert not missing.exists()


def test_gzip_rewritten_with_the_same_size_and_mtime_is_staged_afresh(tmp_path: Path) -> None:
    """A rewrite within the mtime's resolution, to the same size, is still another dump: its
    gzip trailer (CRC-32) differs, and the staged copy of the first must not be reused."""
    src = tmp_path / "docs.jsonl.gz"
    first_docs = DOCS[:3000]
    second_docs = first_docs.replace(b'"id"', b'"ID"', 1)
    assert len(second_docs) == len(first_docs)
    # Stored (level 0) gzip: the same length in, the same length out.
    first_gz, second_gz = (gzip.compress(d, compresslevel=0, mtime=0) for d in (first_docs, second_docs))
    assert len(first_gz) == len(second_gz)
    src.write_bytes(first_gz)
    stamp = src.stat()
    first = stage_dump(str(src), str(tmp_path / "staging"), None)
    src.write_bytes(second_gz)
    os.utime(src, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    second = stage_dump(str(src), str(tmp_path / "staging"), None)
    assert not second.reused
    assert Path(second.ref.path).read_bytes() == second_docs
    assert Path(first.ref.path).read_bytes() == first_docs


def test_gzip_staging_streams_in_bounded_memory(tmp_path: Path) -> None:
    line = b'{"id":"x","body":"' + b"z" * 200 + b'"}\n'
    src = tmp_path / "big.jsonl.gz"
    with gzip.open(src, "wb", compresslevel=1) as out:
        for _ in range(64):
            out.write(line * 5000)  # ~68 MB uncompressed in total
    tracemalloc.start()
    try:
        staged = stage_dump(str(src), str(tmp_path / "staging"), None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert staged.ref.size == len(line) * 5000 * 64
    assert peak < 40 * 1024 * 1024, peak


def test_corrupt_gzip_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl.gz"
    src.write_bytes(gzip.compress(DOCS)[:-40])
    staging = tmp_path / "staging"
    with pytest.raises(DumpSourceError, match="not valid gzip") as info:
        stage_dump(str(src), str(staging), None)
    assert str(src) in str(info.value)
    assert list(staging.iterdir()) == []
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(b'{"id":1}\n')
    with pytest.raises(DumpSourceError, match="not gzip-compressed"):
        stage_dump(str(fake), str(staging), None)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _build_dump(
    path: Path,
    indexes: dict[str, tuple[bytes, str | None]],
    *,
    version: str = "V6",
    extra: list[tarfile.TarInfo] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Write a tar.gz in Meilisearch's v6 dump layout (members prefixed with ./ as Meilisearch does)."""
    with tarfile.open(path, "w:gz") as tar:
        meta = {"dumpVersion": version, "dbVersion": "1.21.0", "dumpDate": "2025-01-01T00:00:00Z"}
        _add(tar, "./metadata.json", json.dumps(meta).encode())
        _add(tar, "./instance_uid.uuid", b"00000000-0000-0000-0000-000000000000")
        _add(tar, "./keys.jsonl", b"")
        _add(tar, "./tasks/queue.jsonl", b"")
        for uid, (docs, pk) in indexes.items():
            d = tarfile.TarInfo(f"./indexes/{uid}")
            d.type = tarfile.DIRTYPE
            d.mode = 0o755
            tar.addfile(d)
            index_meta = {"uid": uid, "primaryKey": pk, "createdAt": "x", "updatedAt": "y"}
            _add(tar, f"./indexes/{uid}/metadata.json", json.dumps(index_meta).encode())
            _add(
                tar,
                f"./indexes/{uid}/settings.json",
                json.dumps({"searchableAttributes": ["*"], "uid": uid}).encode(),
            )
            _add(tar, f"./indexes/{uid}/documents.jsonl", docs)
        for info in extra or []:
            tar.addfile(info)
        for name, data in (extra_files or {}).items():
            _add(tar, name, data)


def test_meilisearch_dump_staging_extracts_one_index(tmp_path: Path) -> None:
    src = tmp_path / "2025.dump"
    books = b'{"isbn":"b1"}\n{"isbn":"b2"}\n'
    _build_dump(src, {"books": (books, "isbn"), "movies": (DOCS, "id")})
    staging = tmp_path / "staging"
    staged = stage_dump(str(src), str(staging), [str(tmp_path)], index_uid="movies")
    assert staged.kind == "meilisearch_dump"
    assert staged.index_uid == "movies"
    assert staged.primary_key == "id"
    assert staged.settings == {"searchableAttributes": ["*"], "uid": "movies"}
    assert Path(staged.ref.path).read_bytes() == DOCS
    assert staged.ref.size == len(DOCS)
    assert staged.source_uri == str(src)

    other = stage_dump(str(src), str(staging), None, index_uid="books")
    assert Path(other.ref.path).read_bytes() == books
    assert other.primary_key == "isbn"
    assert other.ref.path != staged.ref.path

    again = stage_dump(str(src), str(staging), None, index_uid="movies")
    assert again.reused and again.ref == staged.ref
    assert again.primary_key == "id" and again.settings == staged.settings


def test_unapplied_update_files_are_reported(tmp_path: Path) -> None:
    src = tmp_path / "busy.dump"
    _build_dump(
        src,
        {"movies": (DOCS, "id")},
        extra_files={
            "tasks/update_files/7.jsonl": b'{"id":99999}\n',
            "tasks/update_files/8.jsonl": b"",
        },
    )
    staged = stage_dump(str(src), str(tmp_path / "staging"), None)
    assert staged.unapplied_update_files == ("tasks/update_files/7.jsonl",)
    again = stage_dump(str(src), str(tmp_path / "staging"), None)
    assert again.reused and again.unapplied_update_files == staged.unapplied_update_files
    clean = tmp_path / "clean.dump"
    _build_dump(clean, {"movies": (DOCS, "id")})
    assert stage_dump(str(clean), str(tmp_path / "staging"), None).unapplied_update_files == ()


def test_dump_with_several_indexes_needs_an_index_uid(tmp_path: Path) -> None:
    src = tmp_path / "multi.dump"
    _build_dump(src, {"books": (b"{}\n", "isbn"), "movies": (DOCS, "id")})
    staging = tmp_path / "staging"
    with pytest.raises(DumpSourceError, match="more than one index") as info:
        stage_dump(str(src), str(staging), None)
    assert "books" in str(info.value) and "movies" in str(info.value)
    with pytest.raises(DumpSourceError, match="no documents for index 'films'") as info:
        stage_dump(str(src), str(staging), None, index_uid="films")
    assert "books, movies" in str(info.value)
    assert list(staging.iterdir()) == []


def test_single_index_dump_is_taken_without_uid(tmp_path: Path) -> None:
    src = tmp_path / "one.dump"
    _build_dump(src, {"movies": (DOCS, None)})
    staged = stage_dump(str(src), str(tmp_path / "staging"), None)
    assert staged.index_uid == "movies"
    assert staged.primary_key is None
    assert Path(staged.ref.path).read_bytes() == DOCS


def test_old_dump_version_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "old.dump"
    _build_dump(src, {"movies": (DOCS, "id")}, version="V5")
    with pytest.raises(DumpSourceError, match="dumpVersion 'V5'"):
        stage_dump(str(src), str(tmp_path / "staging"), None)


def test_not_a_meilisearch_dump(tmp_path: Path) -> None:
    src = tmp_path / "random.tar.gz"
    with tarfile.open(src, "w:gz") as tar:
        _add(tar, "hello.txt", b"hi")
    with pytest.raises(DumpSourceError, match=r"no top-level metadata\.json"):
        stage_dump(str(src), str(tmp_path / "staging"), None)
    notar = tmp_path / "notar.dump"
    notar.write_bytes(gzip.compress(DOCS))
    with pytest.raises(DumpSourceError, match="holds no tar archive"):
        stage_dump(str(notar), str(tmp_path / "staging"), None)


def test_tar_path_traversal_writes_nothing_outside(tmp_path: Path) -> None:
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    src = work / "evil.dump"
    _build_dump(
        src,
        {"movies": (DOCS, "id")},
        extra_files={
            "../../escaped.jsonl": b"x\n",
            "/tmp/miroir-absolute-escape.jsonl": b"x\n",
            "indexes/../../../escaped-docs/documents.jsonl": b"x\n",
        },
    )
    staging = work / "staging"
    staged = stage_dump(str(src), str(staging), None)
    assert Path(staged.ref.path).read_bytes() == DOCS
    assert not (tmp_path / "escaped.jsonl").exists()
    assert not Path("/tmp/miroir-absolute-escape.jsonl").exists()
    assert not (tmp_path / "escaped-docs").exists()
    assert sorted(p.name for p in staging.iterdir()) == sorted(
        [Path(staged.ref.path).name, Path(staged.ref.path).name + ".complete"]
    )


def test_symlinked_documents_member_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "link.dump"
    link = tarfile.TarInfo("./indexes/movies/documents.jsonl")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    with tarfile.open(src, "w:gz") as tar:
        _add(tar, "./metadata.json", json.dumps({"dumpVersion": "V6"}).encode())
        _add(tar, "./indexes/movies/metadata.json", json.dumps({"primaryKey": "id"}).encode())
        tar.addfile(link)
    staging = tmp_path / "staging"
    with pytest.raises(DumpSourceError, match="link or special file"):
        stage_dump(str(src), str(staging), None)
    assert list(staging.iterdir()) == []


def test_truncated_dump_archive_leaves_no_partial(tmp_path: Path) -> None:
    src = tmp_path / "cut.dump"
    big = b"".join(
        b'{"id":%d,"pad":"%s"}\n' % (i, os.urandom(64).hex().encode()) for i in range(20000)
    )
    _build_dump(src, {"movies": (big, "id")})
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    staging = tmp_path / "staging"
    with pytest.raises(DumpSourceError, match=r"not a readable tar\.gz archive"):
        stage_dump(str(src), str(staging), None)
    assert list(staging.iterdir()) == []


# --- a full staging disk ---------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs; skipped when mounting is not permitted (see the fallback test)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip("mount -t tmpfs not permitted here; the ENOSPC fake test covers the path")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30, check=False)


def _noise_jsonl(n_bytes: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n_bytes:
        out += b'{"id":%d,"pad":"%s"}\n' % (i, os.urandom(48).hex().encode())
        i += 1
    return bytes(out)


def test_gzip_staging_into_a_full_disk(tmp_path: Path, tiny_disk: Path) -> None:
    src = tmp_path / "docs.jsonl.gz"
    src.write_bytes(gzip.compress(_noise_jsonl(3 * 1024 * 1024), compresslevel=1))
    with pytest.raises(DumpSourceError) as info:
        stage_dump(str(src), str(tiny_disk), None)
    message = str(info.value)
    assert str(tiny_disk) in message
    assert "is full" in message and "needs at least" in message and "bytes are left" in message
    assert list(tiny_disk.iterdir()) == []  # partial file removed


def test_dump_member_larger_than_free_space_is_refused_up_front(
    tmp_path: Path, tiny_disk: Path
) -> None:
    docs = _noise_jsonl(2 * 1024 * 1024)
    src = tmp_path / "big.dump"
    _build_dump(src, {"movies": (docs, "id")})
    with pytest.raises(DumpSourceError) as info:
        stage_dump(str(src), str(tiny_disk), None)
    message = str(info.value)
    assert str(tiny_disk) in message
    assert f"needs {len(docs)} bytes" in message and "bytes are left" in message
    assert list(tiny_disk.iterdir()) == []


class _FullDiskFileSystem:
    """A fake for ENOSPC where no tmpfs can be mounted: delegates to the local filesystem but
    its output streams raise OSError(ENOSPC) after ``limit`` bytes, like a full disk."""

    def __init__(self, limit: int) -> None:
        self._local = pafs.LocalFileSystem()
        self._limit = limit

    def open_output_stream(self, path: str) -> Any:
        limit = self._limit
        local = self._local.open_output_stream(path)

        class _Stream:
            written = 0

            def __enter__(self) -> _Stream:
                return self

            def __exit__(self, *exc: object) -> None:
                local.close()

            def write(self, data: bytes) -> int:
                if self.written + len(data) > limit:
                    raise OSError(errno.ENOSPC, "No space left on device")
                self.written += len(data)
                return int(local.write(data))

        return _Stream()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._local, name)


def test_enospc_fake_removes_the_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs everywhere (no mount needed): a fake filesystem raises ENOSPC mid-write."""
    staging_path = tmp_path / "staging"
    real_open = sources._StagingDir.open

    def fake_open(staging_dir: str) -> sources._StagingDir:
        real = real_open(staging_dir)
        return sources._StagingDir(real.display, _FullDiskFileSystem(100_000), real.path, True)  # type: ignore[arg-type]

    monkeypatch.setattr(sources._StagingDir, "open", staticmethod(fake_open))
    src = tmp_path / "docs.jsonl.gz"
    src.write_bytes(gzip.compress(DOCS * 10))
    with pytest.raises(DumpSourceError, match="is full") as info:
        stage_dump(str(src), str(staging_path), None)
    assert str(staging_path) in str(info.value)
    assert list(staging_path.iterdir()) == []


@pytest.mark.parametrize(
    ("staging_dir", "expected"),
    [
        ("s3://bucket/staging", "s3://bucket/staging/dump-1.jsonl"),
        ("s3://bucket/staging/", "s3://bucket/staging/dump-1.jsonl"),
        (
            "s3://bucket/staging?endpoint_override=127.0.0.1:9&scheme=http",
            "s3://bucket/staging/dump-1.jsonl?endpoint_override=127.0.0.1:9&scheme=http",
        ),
    ],
    ids=["plain", "trailing-slash", "with-options"],
)
def test_a_staged_copy_in_a_remote_staging_dir_is_named_by_a_uri_workers_can_open(staging_dir: str, expected: str) -> None:
    """The URI written into every chunk keeps the staging dir's options (a MinIO endpoint,
    say) after the file's name; appended after them, the name became part of the last option
    and no worker could open the copy."""
    staged = sources._StagingDir(staging_dir, pafs.LocalFileSystem(), "bucket/staging", False)
    uri = staged.uri_of("bucket/staging/dump-1.jsonl")
    assert uri == expected
    if "endpoint_override" in uri:  # with an endpoint, opening it makes no request
        _fs, path = pafs.FileSystem.from_uri(uri)
        assert path == "bucket/staging/dump-1.jsonl"
