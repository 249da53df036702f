"""Shutdown as an explicit context: whoever runs chunks (a worker, a CLI, a test) owns a
:class:`Shutdown` and passes it down to the chunk pipeline, which hands its chunk back at the next
batch boundary once a drain was requested."""

from __future__ import annotations

import threading

__all__ = ["ChunkHandedBack", "Shutdown"]


class Shutdown:
    """A drain request shared by one runner and the chunks it runs (never process-global)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def request(self, reason: str = "this worker is shutting down") -> None:
        """Ask running chunks to hand themselves back and the runner to stop claiming."""
        self.reason = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking early on a drain request; True if requested."""
        return self._event.wait(timeout)

    def clear(self) -> None:
        self.reason = ""
        self._event.clear()


class ChunkHandedBack(RuntimeError):
    """The chunk was released to the queue at its cursor because its runner is shutting down."""
