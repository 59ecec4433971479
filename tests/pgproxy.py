"""A TCP proxy in front of a database that a test can cut and restore: the
broker's PostgreSQL going away and coming back, without touching PostgreSQL."""

from __future__ import annotations

import socket
import threading

from tests.faults import close_sockets


class CuttableProxy:
    """Forwards 127.0.0.1:<port> to ``target`` ("host:port").

    ``cut()`` closes every forwarded connection and stops listening, so new
    connections are refused; ``restore()`` listens on the same port again.
    ``dsn(dsn)`` rewrites a ``postgresql://`` DSN to go through the proxy.
    """

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.port = 0
        self.restore()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def dsn(self, dsn: str) -> str:
        """``dsn`` with its host and port replaced by the proxy's."""
        scheme, rest = dsn.split("://", 1)
        netloc, _, tail = rest.partition("/")
        user = netloc.rsplit("@", 1)[0] + "@" if "@" in netloc else ""
        return f"{scheme}://{user}{self.address}/{tail}"

    def restore(self) -> None:
        """Accept connections (again, on the same port)."""
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.create_server(("127.0.0.1", self.port))
            self.port = listener.getsockname()[1]
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Close every connection and refuse new ones until ``restore()``."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, set()
        if listener is not None:
            close_sockets(listener)
        close_sockets(*sockets)

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                close_sockets(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    close_sockets(client, upstream)
                    return
                self._open |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open -= {src, dst}
            close_sockets(src, dst)
