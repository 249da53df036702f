"""Read one chunk's ``[start, end)`` bytes of a dump: the hot path of every import worker.

Readers report absolute dump offsets, so a reader's position can be stored as a resume
cursor directly.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from miroir_pipeline.sources.resolve import DumpRef, DumpSourceError, access_error

__all__ = ["BLOCK_SIZE", "iter_range_blocks", "open_range"]

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
