"""Binding the broker's ports, each failure one line that names the port.

Both ports are tried before either is bound, so a busy one stops the start
with nothing bound, and without the lines gRPC logs for a port it cannot bind.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, start_http_server

GRPC_PORT = "--port (BROKER_PORT)"
METRICS_PORT = "--metrics-port (BROKER_METRICS_PORT)"
_HOST = "--host (BROKER_HOST)"


class CannotListen(OSError):
    """A port the broker cannot bind; the message names it and what to do."""


def ensure_free(host: str, port: int, flag: str) -> None:
    """Raise CannotListen unless ``host:port`` can be bound now (for port 0:
    unless ``host`` is no address of this machine)."""
    where = f"cannot listen on {host}:{port}"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise CannotListen(f"{where}: {error.strerror}; check {_HOST}") from None
    failures: list[OSError] = []
    for family, kind, proto, _name, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise CannotListen(
                        f"{where}: the port is in use (another broker?); "
                        f"stop what holds it or choose another {flag}"
                    ) from None
                failures.append(error)
    if failures and len(failures) == len(addresses):
        raise CannotListen(f"{where}: {failures[0].strerror}; check {_HOST} and {flag}")


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> Any:
    """Start the /metrics endpoint on its own thread; return its HTTP server."""
    try:
        http, _thread = start_http_server(port, host, registry)
    except OSError as error:
        where = f"cannot listen on {host}:{port}"
        raise CannotListen(f"{where}: {error.strerror}; check {METRICS_PORT}") from None
    return http


def bind_grpc(
    server: grpc.aio.Server, host: str, port: int, tls: tuple[bytes, bytes, bytes | None] | None
) -> int:
    """Bind the gRPC port, over TLS when ``tls`` gives (certificate, key,
    client CA); return the port (the one chosen, for port 0). With a client
    CA, a client must show a certificate that CA signed."""
    address = f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            cert, key, client_ca = tls
            credentials = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=client_ca, require_client_auth=bool(client_ca)
            )
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # taken since ensure_free tried it
        bound = 0
    if bound == 0:
        raise CannotListen(f"cannot listen on {host}:{port}; check {_HOST} and {GRPC_PORT}")
    return bound
