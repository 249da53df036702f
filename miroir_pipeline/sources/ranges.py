"""Read one chunk's ``[start, end)`` bytes of a dump: the hot path of every import worker.

Readers report absolute dump offsets, so a reader's position can be stored as a resume
cursor directly.
"""

from __future__ import annotations

import io
from collections.abc import Generator
from typing import Any, NamedTuple

import pyarrow as pa

from miroir_pipeline.sources.resolve import DumpRef, DumpSourceError, access_error

__all__ = ["BLOCK_SIZE", "LineBlock", "iter_line_blocks", "open_range"]

#: Read size for dump bytes: big enough that per-call overhead vanishes, even on object stores.
BLOCK_SIZE = 8 * 1024 * 1024


class _RangeRaw(io.RawIOBase):
    """Raw reader confined to ``[start, end)`` of a pyarrow random-access file.

    Positions (``tell``/``seek``) are absolute offsets in the dump.
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
        raise access_error(ref.uri, exc) from None
    return io.BufferedReader(_RangeRaw(source, start, end), buffer_size=block_size)


class LineBlock(NamedTuple):
    """Bytes read at dump offset ``at``, of which ``data[:end]`` are whole lines (the rest is read
    again with the next block). When ``overlong`` is set, ``data`` is the head of one line longer
    than the limit, and ``end`` is how far that line reaches (past its newline): none of it can
    be routed."""

    data: bytes
    at: int
    end: int
    overlong: bool = False


def iter_line_blocks(
    ref: DumpRef, start: int, end: int, block_size: int = BLOCK_SIZE, max_line: int = 100 << 20
) -> Generator[LineBlock, None, None]:
    """Line-aligned blocks of ``[start, end)`` (``start`` at a line start): every read begins at
    a line start, so the caller routes ``data[:end]`` in place, with no joining of a carried
    partial line and no copy of the block. The range's last line may lack its newline. A line
    longer than ``block_size`` is read whole in a bigger block; one longer than ``max_line`` is
    skipped (an ``overlong`` block) up to its newline. The partial line at the end of each read
    is read again: on average half a document per block, nothing for ~1 KiB documents in 4 MiB
    reads, about 1/8 more bytes read for 1 MiB documents."""
    _check_range(ref, start, end)
    with ref.filesystem.open_input_file(ref.path) as source:
        pos = start
        while pos < end:
            size = min(block_size, end - pos)
            while True:
                data = _read_at(source, ref, size, pos)
                cut = data.rfind(b"\n") + 1
                if not cut and pos + len(data) == end:
                    cut = len(data)  # the range's last line, without a newline
                # A line of exactly max_line bytes may end in CR LF: one more byte finds its LF.
                crlf = len(data) == max_line + 1 and data.endswith(b"\r")
                if cut or len(data) > max_line + crlf:
                    break
                size = min(size * 2, end - pos, max_line + 1 + crlf)
            if cut:
                yield LineBlock(data, pos, cut)
                pos += cut
                continue
            # A line over the limit: find where it ends without holding it.
            skip = len(data)
            while pos + skip < end:
                more = _read_at(source, ref, min(block_size, end - pos - skip), pos + skip)
                nl = more.find(b"\n")
                if nl >= 0:
                    skip += nl + 1
                    break
                skip += len(more)
            yield LineBlock(data[:256], pos, skip, overlong=True)
            pos += skip


def _read_at(source: pa.NativeFile, ref: DumpRef, size: int, pos: int) -> bytes:
    """``size`` bytes at ``pos``; the range was measured when the import was planned, so fewer
    bytes mean the dump shrank under us (a short read would otherwise be retried forever)."""
    data = source.read_at(size, pos)
    if len(data) < size:
        raise DumpSourceError(
            f"dump {ref.uri!r} ended at byte {pos + len(data)}, before the expected {pos + size}; "
            "was it truncated or replaced while importing? Restore the dump for the chunk's "
            "retry, or cancel this import and import the new file"
        )
    return bytes(data)
