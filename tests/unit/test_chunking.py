"""Dump and shard splitting: ranges tile the dump on line boundaries, cheaply."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from miroir_pipeline.sources import DumpRef, resolve_dump
from miroir_pipeline.sources.split import ByteRange, SplitResult, split_dump, split_shards


def _ref(path: Path, content: bytes) -> DumpRef:
    path.write_bytes(content)
    return resolve_dump(str(path), None)


def _pieces(content: bytes, result: SplitResult) -> list[bytes]:
    return [content[r.start : r.end] for r in result.ranges]


def _assert_tiles(content: bytes, result: SplitResult, chunk_size: int) -> None:
    ranges = result.ranges
    assert (not ranges) == (not content)
    if not ranges:
        return
    assert ranges[0].start == 0
    assert ranges[-1].end == len(content)
    for a, b in itertools.pairwise(ranges):
        assert a.end == b.start
    for r in ranges:
        assert r.end > r.start
        assert r.end == len(content) or content[r.end - 1 : r.end] == b"\n"
    for r in ranges[:-1]:
        assert r.size >= chunk_size


def test_empty_file_gives_no_chunks(tmp_path: Path) -> None:
    assert split_dump(_ref(tmp_path / "d.jsonl", b""), 100) == SplitResult([], 0)


def test_smaller_than_one_chunk_is_one_chunk(tmp_path: Path) -> None:
    content = b'{"id":1}\n{"id":2}\n'
    result = split_dump(_ref(tmp_path / "d.jsonl", content), 1 << 20)
    assert result.ranges == [ByteRange(0, len(content))]
    assert result.bytes_read == 0


def test_cuts_move_to_just_after_the_next_newline(tmp_path: Path) -> None:
    content = b"aaa\nbbbbbbb\ncc\nd\neeeeeeeeee\n"
    result = split_dump(_ref(tmp_path / "d.jsonl", content), 5)
    assert _pieces(content, result) == [b"aaa\nbbbbbbb\n", b"cc\nd\n", b"eeeeeeeeee\n"]


def test_newline_exactly_at_chunk_end_cuts_there(tmp_path: Path) -> None:
    content = b"abc\n" * 4
    result = split_dump(_ref(tmp_path / "d.jsonl", content), 4)
    assert result.ranges == [ByteRange(i, i + 4) for i in range(0, 16, 4)]


def test_missing_trailing_newline_keeps_last_line(tmp_path: Path) -> None:
    content = b"one\ntwo\nthree-without-newline"
    result = split_dump(_ref(tmp_path / "d.jsonl", content), 3)
    assert _pieces(content, result) == [b"one\n", b"two\n", b"three-without-newline"]


def test_line_longer_than_a_chunk_is_one_oversized_chunk(tmp_path: Path) -> None:
    long_line = b"x" * 300_000 + b"\n"  # longer than the first 64 KiB search window
    content = b"a\n" + long_line + b"b\n"
    result = split_dump(_ref(tmp_path / "d.jsonl", content), 10)
    assert _pieces(content, result) == [b"a\n" + long_line, b"b\n"]
    _assert_tiles(content, result, 10)


def test_crlf_is_cut_after_the_lf(tmp_path: Path) -> None:
    content = b"".join(b'{"id":%d}\r\n' % i for i in range(100))
    result = split_dump(_ref(tmp_path / "d.jsonl", content), 50)
    assert len(result.ranges) > 1
    for piece in _pieces(content, result):
        assert piece.endswith(b"\r\n")
    _assert_tiles(content, result, 50)


def test_invalid_chunk_size_is_refused(tmp_path: Path) -> None:
    ref = _ref(tmp_path / "d.jsonl", b"a\n")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="chunk_size"):
            split_dump(ref, bad)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(st.integers(min_value=0, max_value=300), max_size=60),
    trailing_newline=st.booleans(),
    chunk_size=st.integers(min_value=1, max_value=2000),
)
def test_ranges_tile_the_file_on_line_boundaries(
    lines: list[int], trailing_newline: bool, chunk_size: int
) -> None:
    body = [b"%d" % i + b"y" * n for i, n in enumerate(lines)]
    content = b"\n".join(body) + (b"\n" if trailing_newline and body else b"")
    with tempfile.TemporaryDirectory() as tmp:
        result = split_dump(_ref(Path(tmp) / "d.jsonl", content), chunk_size)
    _assert_tiles(content, result, chunk_size)
    # Every line lands in exactly one range, whole.
    rebuilt = [line for piece in _pieces(content, result) for line in piece.split(b"\n") if line]
    assert rebuilt == [line for line in content.split(b"\n") if line]
    for r in result.ranges:
        assert r.start == 0 or content[r.start - 1 : r.start] == b"\n"


def test_split_reads_windows_not_the_file(tmp_path: Path) -> None:
    """A 4 GiB sparse dump with a newline every MiB: splitting reads a few MiB, not 4 GiB."""
    path = tmp_path / "sparse.jsonl"
    size = 4 << 30
    step = 1 << 20
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset in range(step - 1, size, step):
            os.pwrite(fd, b"\n", offset)
    finally:
        os.close(fd)
    ref = resolve_dump(str(path), None)
    chunk = 256 << 20
    result = split_dump(ref, chunk)
    assert len(result.ranges) == 16
    assert all(r.end % step == 0 for r in result.ranges)
    assert result.ranges[-1].end == size
    # Each cut needs at most ~1 MiB of windows (64K + 128K + ... until the next newline).
    assert result.bytes_read <= len(result.ranges) * 2 * step
    assert result.bytes_read < size // 100


@pytest.mark.parametrize(
    ("shards", "per_chunk", "expected"),
    [
        (10, 3, [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]),
        (4, 4, [range(0, 4)]),
        (3, 10, [range(0, 3)]),
        (1, 1, [range(0, 1)]),
        (6, 1, [range(i, i + 1) for i in range(6)]),
    ],
)
def test_split_shards(shards: int, per_chunk: int, expected: list[range]) -> None:
    assert split_shards(shards, per_chunk) == expected


@given(st.integers(1, 5000), st.integers(1, 600))
def test_split_shards_covers_every_shard_once(shards: int, per_chunk: int) -> None:
    parts = split_shards(shards, per_chunk)
    assert [s for r in parts for s in r] == list(range(shards))
    assert all(0 < len(r) <= per_chunk for r in parts)


@pytest.mark.parametrize(("shards", "per_chunk"), [(0, 4), (4, 0), (-1, 1), (True, 1)])
def test_split_shards_refuses_nonpositive(shards: int, per_chunk: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        split_shards(shards, per_chunk)


def test_byte_range_validates() -> None:
    assert ByteRange(3, 10).size == 7
    with pytest.raises(ValueError):
        ByteRange(5, 4)
