"""Process-wide drain flag: set on SIGTERM; a running chunk hands itself back at the next
batch boundary instead of starting new work (its heartbeat keeps running until then)."""

import threading

DRAIN = threading.Event()


class ChunkHandedBack(RuntimeError):
    """The chunk was released to the queue because this process is shutting down."""
