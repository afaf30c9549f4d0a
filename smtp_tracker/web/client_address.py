"""Which address an HTTP request came from, believing proxies only when trusted.

``X-Forwarded-For`` (de facto; the standard form is RFC 7239 ``Forwarded``,
which is not consulted) lists the client and the proxies a request went
through, each appending the address it received the request from.  Anyone can
send the header, so it is believed only when the TCP peer is a trusted proxy,
and then read from the right: the right-most address that is not itself a
trusted proxy is the client (the addresses left of it may be forged).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from aiohttp import hdrs, web

__all__ = ["IPAddress", "IPNetwork", "client_address", "parse_address", "request_client_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_address(text: str) -> IPAddress | None:
    """The IP address in *text*, or ``None`` when there is none.

    Accepts ``192.0.2.1``, ``192.0.2.1:8080``, ``2001:db8::1``,
    ``[2001:db8::1]:8080`` and zone ids (dropped); an IPv4-mapped IPv6 address
    (RFC 4291 §2.5.5.2) becomes the IPv4 address.
    """
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_address(
    peer: str | None,
    forwarded_for: Iterable[str],
    trusted_proxies: Sequence[IPNetwork],
) -> str | None:
    """The client address of a request, as text, or ``None`` when unknown.

    :param peer: the TCP peer address (``request.remote``).
    :param forwarded_for: every ``X-Forwarded-For`` header value, in order.
    :param trusted_proxies: networks whose members may set ``X-Forwarded-For``.
    :returns: the peer when it is not trusted (or there is no header); else the
        right-most forwarded address that is not trusted; the left-most one
        when all are trusted; ``None`` when the peer is not an IP address or
        the chain has a malformed entry right of the client (it cannot be
        believed past that point).
    """
    if peer is None:
        return None
    current = parse_address(peer)
    if current is None:
        return None
    if not trusted_proxies or not _trusted(current, trusted_proxies):
        return str(current)
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        if not hop.strip():
            continue
        ip = parse_address(hop)
        if ip is None:
            return None
        current = ip
        if not _trusted(ip, trusted_proxies):
            break
    return str(current)


def request_client_address(
    request: web.BaseRequest, trusted_proxies: Sequence[IPNetwork]
) -> str | None:
    """The client address of an aiohttp *request*: :func:`client_address` of its TCP
    peer and its ``X-Forwarded-For`` headers.

    :param trusted_proxies: networks whose members may set ``X-Forwarded-For``.
    :returns: the address as text, or ``None`` when unknown (see :func:`client_address`).
    """
    return client_address(
        request.remote, request.headers.getall(hdrs.X_FORWARDED_FOR, ()), trusted_proxies
    )


def _trusted(ip: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in networks)
