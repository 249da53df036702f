"""Split work into chunks: dump byte ranges on line boundaries, shard-id ranges.

:func:`split_dump` reads only a small window after each nominal cut point, so its cost
grows with the number of chunks, not with the dump's size; :attr:`SplitResult.bytes_read`
reports how much it read (the split benchmark uses it).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from miroir_pipeline.sources.resolve import DumpRef, DumpSourceError

__all__ = ["ByteRange", "SplitResult", "split_dump", "split_shards"]

#: First read when looking for the newline after a cut point; doubled up to the cap.
WINDOW_BYTES = 64 * 1024
MAX_WINDOW_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, order=True)
class ByteRange:
    """Half-open byte range ``[start, end)`` of a dump; always whole lines."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"invalid byte range [{self.start}, {self.end})")

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SplitResult:
    """Ranges that tile ``[0, size)`` of a dump, and the bytes read to find them."""

    ranges: list[ByteRange]
    bytes_read: int


def split_dump(ref: DumpRef, chunk_size: int) -> SplitResult:
    """Cut a dump into ranges of about ``chunk_size`` bytes, each ending just after a ``\\n``.

    Each cut is the first newline at or after ``start + chunk_size - 1``, found by reading a
    64 KiB window that doubles until a newline (or the end of the file) turns up. So ranges
    are never empty, never overlap, and cover the file exactly; a line longer than
    ``chunk_size`` becomes one oversized range; a last line without ``\\n`` stays in the
    last range; CRLF files split after the ``\\n``. An empty file gives no ranges.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of bytes, got {chunk_size!r}")
    size = ref.size
    if size == 0:
        return SplitResult([], 0)
    ranges: list[ByteRange] = []
    bytes_read = 0
    start = 0
    try:
        with ref.filesystem.open_input_file(ref.path) as f:
            while start < size:
                probe = start + chunk_size - 1  # a newline here ends a chunk of exactly chunk_size
                if probe >= size - 1:
                    ranges.append(ByteRange(start, size))
                    break
                cut = size
                window = WINDOW_BYTES
                while probe < size:
                    block = f.read_at(min(window, size - probe), probe)
                    if not block:
                        raise DumpSourceError(
                            f"dump {ref.uri!r} ended at byte {probe}, before its recorded size "
                            f"{size}; was it truncated or replaced while splitting?"
                        )
                    bytes_read += len(block)
                    newline = block.find(b"\n")
                    if newline >= 0:
                        cut = probe + newline + 1
                        break
                    probe += len(block)
                    window = min(window * 2, MAX_WINDOW_BYTES)
                ranges.append(ByteRange(start, cut))
                start = cut
    except (OSError, pa.ArrowException) as exc:
        raise DumpSourceError(
            f"dump {ref.uri!r} could not be read while splitting: {exc}"
        ) from None
    return SplitResult(ranges, bytes_read)


def split_shards(shards_old: int, shards_per_chunk: int) -> list[range]:
    """Cut the shard-id space ``[0, shards_old)`` into consecutive ranges of ``shards_per_chunk``."""
    for name, value in (("shards_old", shards_old), ("shards_per_chunk", shards_per_chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return [
        range(lo, min(lo + shards_per_chunk, shards_old))
        for lo in range(0, shards_old, shards_per_chunk)
    ]
