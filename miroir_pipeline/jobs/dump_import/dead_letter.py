"""The dead-letter file of a chunk under the ``skip`` policy: every invalid line, with its dump,
line number, byte offset and reason, so nothing is dropped silently."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import orjson

__all__ = ["DeadLetter", "DeadLetterMissing"]


class DeadLetterMissing(RuntimeError):
    """A resumed chunk's dead-letter file holds less than its committed progress says: the
    worker does not see the file earlier attempts wrote (``dead_letter_dir`` not shared)."""


class DeadLetter:
    """Per-chunk dead-letter NDJSON file, truncated on resume to what the last progress recorded."""

    def __init__(self, path: Path, committed_bytes: int) -> None:
        self.path = path
        found = path.stat().st_size if path.exists() else 0
        if found < committed_bytes:
            # Padding up to the committed size would leave NUL bytes where the records were.
            raise DeadLetterMissing(
                f"dead-letter file {path} holds {found} bytes, but the chunk's committed "
                f"progress has {committed_bytes}: this worker does not see the file earlier "
                "attempts wrote. Put dead_letter_dir on a volume every worker mounts (or "
                "restore the file there); the chunk is retried"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: BinaryIO = open(path, "ab+")  # noqa: SIM115 - closed in close()
        self._fh.truncate(committed_bytes)
        self._fh.seek(committed_bytes)
        self.size = committed_bytes

    def write(self, record: Mapping[str, Any]) -> None:
        data = orjson.dumps(record) + b"\n"
        self._fh.write(data)
        self.size += len(data)

    def sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()
