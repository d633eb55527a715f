"""The ports feddiff listens on, one process per port: a port another process holds stops a start with one
line that names the flag and the address, before anything else is set up."""

from __future__ import annotations

import errno
import socket
from typing import Any

from fedcore.errors import CannotListen


def split_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' (HOST may be '[::1]') as (host without brackets, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def refusal(flag: str, address: str, error: OSError, *, held: str = "", default: bool = False) -> CannotListen:
    """The one line a port that cannot be listened on ends a start with; `held`: the address another process
    holds, when it is not `address` itself; `default`: the flag was not given (the message says so)."""
    named, hint = (f"{flag} {address} (the default)", f"; pass {flag} to choose another port") if default else (f"{flag} {address}", "")
    if error.errno == errno.EADDRINUSE:
        where = f"another process listens on {held}" if held else "another process listens there"
        return CannotListen(f"{named}: address already in use ({where}){hint}")
    return CannotListen(f"{named}: cannot listen there: {error.strerror or error}{hint}")


def check_distinct(ports: dict[str, int]) -> None:
    """CannotListen when two of one process's listeners (flag -> port; 0 and negative ports pick or turn off
    their own) are given the same port."""
    first: dict[int, str] = {}
    for flag, port in ports.items():
        if port > 0 and port in first:
            raise CannotListen(f"{flag} {port}: the same port as {first[port]}; each listener needs its own port")
        first.setdefault(port, flag)


LOOPBACKS = ("127.0.0.1", "::1")
WILDCARDS = ("", "0.0.0.0", "::")


def is_localhost(host: str) -> bool:
    """'localhost' and the names under '.localhost' (RFC 6761): the loopback addresses, both families."""
    return host.lower().rstrip(".") == "localhost" or host.lower().rstrip(".").endswith(".localhost")


SocketAddress = tuple[int, tuple[Any, ...]]  # (address family, the sockaddr `bind` takes)


def addresses_of(host: str, port: int) -> tuple[list[SocketAddress], list[SocketAddress]]:
    """The socket addresses (family, sockaddr) a listener on HOST:PORT takes, as (resolved, implied).

    Resolved: every address the name resolves to. Implied: those gRPC listens on beyond them, which another
    process must not hold either, or clients of this listener reach that process instead: both loopbacks for a
    localhost name (gRPC resolves it to both, whatever /etc/hosts says, as do clients), and a wildcard host's
    dual-stack '::' (gRPC listens there first and falls back to IPv4 alone when another process holds an IPv6
    address of the port). socket.gaierror when the name does not resolve."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    resolved: list[SocketAddress] = [(int(family), tuple(sockaddr)) for family, _, _, _, sockaddr in infos]
    extra = list(LOOPBACKS) if is_localhost(host) else ["::"] if host in WILDCARDS else []
    implied: list[SocketAddress] = []
    for ip in extra:
        family = int(socket.AF_INET6 if ":" in ip else socket.AF_INET)
        sockaddr: tuple[Any, ...] = (ip, port, 0, 0) if family == socket.AF_INET6 else (ip, port)
        if (family, sockaddr) not in resolved:
            implied.append((family, sockaddr))
    return resolved, implied


def _held(sockaddr: tuple[Any, ...], implied: bool) -> str:
    """Where another process holds the port, in a refusal's words."""
    host = str(sockaddr[0])
    if implied and host == "::":  # the IPv4 wildcard bound before it: an IPv6 address holds it
        return f"an IPv6 address of port {sockaddr[1]}"
    return f"[{host}]:{sockaddr[1]}" if ":" in host else f"{host}:{sockaddr[1]}"


def _probe(family: int, sockaddr: tuple[Any, ...]) -> OSError | None:
    """Bind a socket of our own to `sockaddr` and close it again; the error, None when it binds."""
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:  # a family this host lacks (no IPv6)
        return e
    with probe:
        # As gRPC and http.server do: connections of an earlier process in TIME_WAIT do not hold the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as e:
            return e
    return None


def check_free(flag: str, host: str, port: int, *, default: bool = False) -> None:
    """CannotListen when `port` (0 = any free one, negative = off: nothing to check) cannot be listened on at
    `host` by a process that does not share ports, as every feddiff listener is (gRPC's `so_reuseport` off):
    when another process holds it on any address the listener takes (`addresses_of`: a localhost name's two
    loopbacks, a wildcard's both families), or when none of the addresses can be bound at all. An address
    this host cannot have (::1 without IPv6) is skipped, as gRPC skips it. `default`: the flag was not given.

    The check binds sockets of its own and closes them again: it runs before the servers are built, so that the
    refusal is the process's only output (gRPC's core logs a line of its own when its bind fails)."""
    if port <= 0:
        return
    address = f"{host}:{port}"
    try:
        resolved, implied = addresses_of(host, port)
    except socket.gaierror as e:
        raise CannotListen(f"{flag} {address}: cannot listen there: {e.strerror}") from None
    first_error: OSError | None = None
    bound = 0
    for family, sockaddr in resolved + implied:
        error = _probe(family, sockaddr)
        if error is not None and error.errno == errno.EADDRINUSE:
            held = _held(sockaddr, (family, sockaddr) in implied) if len(resolved) + len(implied) > 1 or sockaddr[0] != host else ""
            raise refusal(flag, address, error, held=held, default=default) from None
        if error is None:
            bound += 1
        elif (family, sockaddr) in resolved:
            first_error = first_error or error
    if bound == 0 and first_error is not None:
        raise refusal(flag, address, first_error, default=default)
