"""A TCP proxy that cuts a connection after the broker answered but before the
client hears it: the fault that makes a retried submit dangerous."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

HEADERS = 0x1  # HTTP/2 frame type of a response's headers


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to ``target``. While ``armed``, the first
    response headers from the broker close both sides instead of passing."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.armed = threading.Event()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            close_sockets(src, dst)

    def _answers(self, upstream: socket.socket, client: socket.socket) -> None:
        """Broker to client, frame by frame, watching for response headers."""
        buffer = b""
        try:
            while data := upstream.recv(65536):
                buffer += data
                while len(buffer) >= 9:
                    length = struct.unpack(">I", b"\0" + buffer[:3])[0]
                    kind, stream = buffer[3], struct.unpack(">I", buffer[5:9])[0] & 0x7FFFFFFF
                    if len(buffer) < 9 + length:
                        break
                    frame, buffer = buffer[: 9 + length], buffer[9 + length :]
                    if kind == HEADERS and stream and self.armed.is_set():
                        self.armed.clear()
                        self.cuts += 1
                        raise OSError("cut")
                    client.sendall(frame)
        except OSError:
            pass
        finally:
            close_sockets(upstream, client)

    def close(self) -> None:
        self._listener.close()


def close_sockets(*sockets: socket.socket) -> None:
    """Shut down first: a plain close leaves a peer blocked in recv() unaware."""
    for s in sockets:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()
