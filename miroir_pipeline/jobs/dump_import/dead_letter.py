"""The dead-letter file of a chunk under the ``skip`` policy: every invalid line, with its dump,
line number, byte offset and reason, so nothing is dropped silently."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from miroir_pipeline.queue.contract import LeaseLost

__all__ = ["DeadLetter", "DeadLetterMissing"]

_COPY_BLOCK = 1 << 20


class DeadLetterMissing(RuntimeError):
    """A resumed chunk's dead-letter file holds less than its committed progress says: the
    worker does not see the file earlier attempts wrote (``dead_letter_dir`` not shared)."""


class DeadLetter:
    """Per-chunk dead-letter NDJSON file, resumed at the size the last progress recorded.

    Each attempt writes a fresh file (the committed prefix copied, then moved over the name):
    an earlier attempt that lost its lease but has not noticed yet keeps writing into the file
    it opened, which is no longer the chunk's, so its records never mix with the new owner's.
    """

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
        fresh = path.with_name(f"{path.name}.{secrets.token_hex(4)}.partial")
        self._fh: BinaryIO = open(fresh, "wb")  # noqa: SIM115 - closed in close()
        try:
            if committed_bytes:
                with open(path, "rb") as earlier:
                    left = committed_bytes
                    while left:
                        block = earlier.read(min(left, _COPY_BLOCK))
                        if not block:  # cut short since it was measured: never spin on it
                            raise DeadLetterMissing(
                                f"dead-letter file {path} shrank below the chunk's committed "
                                f"{committed_bytes} bytes while this attempt copied it; the chunk "
                                "is retried"
                            )
                        self._fh.write(block)
                        left -= len(block)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            os.replace(fresh, path)
        except BaseException:
            self._fh.close()
            fresh.unlink(missing_ok=True)
            raise
        self._inode = os.fstat(self._fh.fileno()).st_ino
        self.size = committed_bytes

    def write(self, record: Mapping[str, Any]) -> None:
        data = orjson.dumps(record) + b"\n"
        self._fh.write(data)
        self.size += len(data)

    def sync(self) -> None:
        """Make the records durable before a commit points at them, and check the file is still
        the chunk's: another attempt taking the chunk over puts its own file under the name."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        try:
            current = self.path.stat().st_ino
        except FileNotFoundError:
            current = None
        if current != self._inode:
            raise LeaseLost(
                f"dead-letter file {self.path} was taken over by another attempt of this chunk, "
                "so this worker's lease has ended; stopped writing"
            )

    def close(self) -> None:
        self._fh.close()
