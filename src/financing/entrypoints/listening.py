"""Where the servers listen: an unspecified address takes IPv4 and IPv6 alike.

The reference's Go listeners, on `0.0.0.0:8080`, `[::]:8080` or `:8080`, take
connections on every address of the host, of both families. asyncio binds
`::` to IPv6 alone and `0.0.0.0` to IPv4 alone: a deployment carried over
with `[::]:8080` refused every IPv4 client (probes, proxies on 127.0.0.1),
while `financing health-check`, which asks `::1`, said healthy.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any

# What a host without IPv6 says when asked for an IPv6 socket or its `::`.
_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def unspecified(host: str) -> bool:
    """Whether `host` is the unspecified address, however written (`::`, `::0`,
    `0:0:0:0:0:0:0:0`, `0.0.0.0`)."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a name
        return False


def wildcard_socket(host: str, port: int) -> socket.socket | None:
    """For an unspecified `host`, one bound socket that takes IPv4 and IPv6 connections;
    None for any other host, or where the host has no IPv6 (then IPv4 alone is
    listened on, as asked). OSError when the port is taken."""
    if not unspecified(host) or not socket.has_ipv6:
        return None
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError as error:
        if error.errno in _NO_IPV6:
            return None
        raise
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    except OSError as error:
        sock.close()
        if error.errno in _NO_IPV6:
            return None
        raise
    sock.setblocking(False)
    return sock


def listening_at(host: str, port: int) -> dict[str, Any]:
    """What an asyncio (or grpclib) server is started with to listen on `host:port`: the
    socket of `wildcard_socket` for an unspecified host, else the host and port."""
    sock = wildcard_socket(host, port)
    return {"host": host, "port": port} if sock is None else {"sock": sock}


def shown(host: str, port: int) -> str:
    """`host:port` as a client writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
