"""The ports feddiff listens on, one process per port: a port another process holds stops a start with one
line that names the flag and the address, before anything else is set up."""

from __future__ import annotations

import errno
import socket

from fedcore.errors import CannotListen


def split_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' (HOST may be '[::1]') as (host without brackets, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def refusal(flag: str, address: str, error: OSError) -> CannotListen:
    if error.errno == errno.EADDRINUSE:
        return CannotListen(f"{flag} {address}: address already in use (another process listens there)")
    return CannotListen(f"{flag} {address}: cannot listen there: {error.strerror or error}")


def check_distinct(ports: dict[str, int]) -> None:
    """CannotListen when two of one process's listeners (flag -> port; 0 and negative ports pick or turn off
    their own) are given the same port."""
    first: dict[int, str] = {}
    for flag, port in ports.items():
        if port > 0 and port in first:
            raise CannotListen(f"{flag} {port}: the same port as {first[port]}; each listener needs its own port")
        first.setdefault(port, flag)


def check_free(flag: str, host: str, port: int) -> None:
    """CannotListen when `port` (0 = any free one, negative = off: nothing to check) cannot be listened on at
    `host` by a process that does not share ports, as every feddiff listener is (gRPC's `so_reuseport` off).

    The check binds a socket of its own and closes it again: it runs before the servers are built, so that the
    refusal is the process's only output (gRPC's core logs a line of its own when its bind fails)."""
    if port <= 0:
        return
    address = f"{host}:{port}"
    try:
        candidates = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CannotListen(f"{flag} {address}: cannot listen there: {e.strerror}") from None
    for family, kind, proto, _, sockaddr in candidates:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC and http.server do: connections of an earlier process in TIME_WAIT do not hold the port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as e:
                raise refusal(flag, address, e) from None
