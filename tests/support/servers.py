"""Small TCP servers on loopback for tests that need an upstream with one odd habit."""

from __future__ import annotations

import socket
import threading


class LoopbackServer:
    """Listens on 127.0.0.1 (a free port) and hands each accepted connection to
    ``handle``, one after another on one thread, until ``close``."""

    def __init__(self, backlog: int = 128) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError("a LoopbackServer subclass says what a connection gets")

    def close(self) -> None:
        self.sock.close()


class ThreadedLoopbackServer(LoopbackServer):
    """A LoopbackServer that serves each connection on a thread of its own (``serve``),
    for servers that hold a connection open while the next one arrives."""

    def handle(self, conn: socket.socket) -> None:
        threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError("a ThreadedLoopbackServer subclass says what a connection gets")
