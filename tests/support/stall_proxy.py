"""A loopback TCP proxy that can stop forwarding without closing anything: the fault of a
half-open connection (a peer gone behind a dead NAT entry or firewall), where a request is
sent and no answer, and no error, ever comes back."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

__all__ = ["StallProxy"]


class StallProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target`` until :meth:`stall`; then bytes in either
    direction are held (connections stay open). :meth:`close` drops every connection."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="stall-proxy-accept", daemon=True).start()

    def stall(self) -> None:
        self._flowing.clear()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        with self._lock:
            for sock in [self._listener, *self._sockets]:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()

    def __enter__(self) -> StallProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            self._flowing.wait()
            if self._closed.is_set():
                return
            try:
                dst.sendall(data)
            except OSError:
                return
