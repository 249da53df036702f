"""The dead-letter file of a chunk under the ``skip`` policy: every invalid line, with its dump,
line number, byte offset and reason, so nothing is dropped silently."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import orjson

__all__ = ["DeadLetter"]


class DeadLetter:
    """Per-chunk dead-letter NDJSON file, truncated on resume to what the last progress recorded."""

    def __init__(self, path: Path, committed_bytes: int) -> None:
        self.path = path
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
