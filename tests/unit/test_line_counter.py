"""Line numbers of invalid and refused documents: exact, and found from the nearest known
position rather than by reading the dump again from its first byte (the nodes report refusals
a window behind the router, so lookups go back and forth)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from miroir_pipeline.jobs.dump_import import process
from miroir_pipeline.sources import resolve_dump


def test_lookups_going_back_count_from_the_nearest_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [b'{"id":%d}' % i for i in range(20_000)]
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / "d.ndjson"
    path.write_bytes(data)
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)

    read: list[tuple[int, int]] = []
    real = process.open_range

    def spy(ref: Any, start: int, end: int) -> Any:  # records what each lookup reads
        read.append((start, end))
        return real(ref, start, end)

    monkeypatch.setattr(process, "open_range", spy)
    counter = process._LineCounter(resolve_dump(str(path), [str(tmp_path)]))
    # The reader moves on block by block from a known place; a refusal comes back behind it.
    assert counter.line_at(starts[1000]) == 1001
    at = starts[1000]
    for first in range(1000, 19_000, 1000):
        end = starts[first + 1000]
        counter.advance(at, end, 1000)
        at = end
    read.clear()
    for n in (15_500, 4_200, 12_001, 19_999, 1):
        assert counter.line_at(starts[n - 1]) == n
    assert sum(end - start for start, end in read) < 3 * (starts[1001] - starts[0]), read
