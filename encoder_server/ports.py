"""Listening sockets, bound before the model loads.

A port clash must surface in the first second, naming the port and its flag,
not after minutes of loading weights, and never as a traceback. And a second
server on a port already in use must fail rather than share it: gRPC sets
``SO_REUSEPORT`` by default, so two servers on one port each got half the
connections, and clients reached two different models at random.
"""

from __future__ import annotations

import errno
import socket


class PortInUse(OSError):
    """A port could not be bound; the message names the address, the flag and what to do."""


def describe_bind_error(host: str, port: int, flag: str, exc: BaseException | None = None) -> PortInUse:
    """The error to show when ``host:port`` (set by ``flag``) cannot be bound."""
    where = f"{host}:{port}"
    if exc is None or (isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE):
        why = "the address is already in use (another flux2-encoder, or another program)"
        fix = f"stop that program or choose another {flag}"
    elif isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL:
        why = "this machine has no such address"
        fix = "use an address of this machine in the host flag, or 0.0.0.0 for all of them"
    elif isinstance(exc, OSError) and exc.errno == errno.EACCES:
        why = "permission denied (ports below 1024 need privileges)"
        fix = f"choose a port above 1024 with {flag}"
    else:
        why = str(exc)
        fix = f"check {flag} and the host flag"
    return PortInUse(f"cannot listen on {where} ({flag}): {why}; {fix}")


def listen_socket(host: str, port: int, flag: str) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening, for aiohttp to serve on.

    ``port`` 0 picks a free port. ``SO_REUSEADDR`` only (a restart may reuse a
    port in TIME_WAIT), never ``SO_REUSEPORT``. Raises :class:`PortInUse`.
    """
    bare = host.strip("[]")
    try:
        infos = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortInUse(f"cannot listen on {host}:{port} ({flag}): unknown host ({exc})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise describe_bind_error(host, port, flag, exc) from None
    sock.setblocking(False)
    return sock
