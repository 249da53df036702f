"""The dead-letter file across attempts of one chunk: resumed at the committed size, and an
attempt that lost its lease (still running, not yet aware) never writes into the new owner's
file."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from miroir_pipeline.jobs.dump_import.dead_letter import DeadLetter, DeadLetterMissing
from miroir_pipeline.queue.contract import LeaseLost


def _lines(path: Path) -> list[int]:
    return [orjson.loads(x)["line"] for x in path.read_bytes().splitlines()]


def test_resume_drops_what_was_written_after_the_last_commit(tmp_path: Path) -> None:
    path = tmp_path / "c.ndjson"
    first = DeadLetter(path, 0)
    first.write({"line": 1})
    first.sync()
    committed = first.size
    first.write({"line": 2})  # never committed: the worker died here
    first.sync()
    first.close()
    again = DeadLetter(path, committed)
    again.write({"line": 3})
    again.sync()
    again.close()
    assert _lines(path) == [1, 3]
    assert path.stat().st_size == again.size
    assert [p.name for p in tmp_path.iterdir()] == ["c.ndjson"], "no partial file left behind"


def test_an_attempt_that_lost_its_lease_cannot_write_into_the_new_owners_file(tmp_path: Path) -> None:
    path = tmp_path / "c.ndjson"
    stale = DeadLetter(path, 0)
    stale.write({"line": 1})
    stale.sync()
    committed = stale.size  # the stale attempt's last commit; then it stalls past its lease

    owner = DeadLetter(path, committed)
    owner.write({"line": 5})
    owner.sync()
    stale.write({"line": 7})  # thawed, before its heartbeat notices
    with pytest.raises(LeaseLost, match="taken over by another attempt"):
        stale.sync()
    owner.write({"line": 9})
    owner.sync()
    owner.close()
    stale.close()
    assert _lines(path) == [1, 5, 9]
    assert path.stat().st_size == owner.size, "the owner's committed size describes the file"
    resumed = DeadLetter(path, owner.size)
    resumed.close()
    assert _lines(path) == [1, 5, 9]


def test_a_file_shorter_than_committed_is_refused_not_padded(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "c.ndjson"
    with pytest.raises(DeadLetterMissing, match=r"holds 0 bytes, but the chunk's committed progress has 40"):
        DeadLetter(path, 40)
    assert not path.exists()
