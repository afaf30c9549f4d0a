"""Client address resolution: X-Forwarded-For believed only from trusted proxies."""

from __future__ import annotations

import ipaddress

import pytest

from smtp_tracker.web.client_address import client_address, parse_address

TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:ffff::/48")]


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        # untrusted peer: the header is ignored, whatever it says
        ("203.0.113.5", ["198.51.100.1"], "203.0.113.5"),
        ("203.0.113.5", [], "203.0.113.5"),
        # trusted peer: right-most untrusted entry
        ("10.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", ["1.1.1.1, 198.51.100.1, 10.9.9.9"], "198.51.100.1"),
        ("10.0.0.1", ["1.1.1.1", "198.51.100.1,10.9.9.9"], "198.51.100.1"),  # repeated header
        ("10.0.0.1", ["2001:db8::7, 2001:db8:ffff::1"], "2001:db8::7"),
        ("10.0.0.1", ["[2001:db8::7]:4711"], "2001:db8::7"),
        ("10.0.0.1", ["198.51.100.1:4711"], "198.51.100.1"),
        ("10.0.0.1", ["::ffff:198.51.100.1"], "198.51.100.1"),
        # trusted peer and no header, or only trusted entries: the furthest known
        ("10.0.0.1", [], "10.0.0.1"),
        ("10.0.0.1", ["10.2.2.2, 10.3.3.3"], "10.2.2.2"),
        ("10.0.0.1", [" , "], "10.0.0.1"),
        # a malformed entry right of the client: cannot be believed
        ("10.0.0.1", ["198.51.100.1, unknown"], None),
        ("10.0.0.1", ["not an address"], None),
        # the peer itself
        ("::ffff:10.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        (None, ["198.51.100.1"], None),
        ("/run/sock", [], None),
    ],
)
def test_client_address(peer: str | None, xff: list[str], expected: str | None) -> None:
    assert client_address(peer, xff, TRUSTED) == expected


def test_no_trusted_proxies_means_the_peer() -> None:
    assert client_address("10.0.0.1", ["198.51.100.1"], []) == "10.0.0.1"


def test_parse_address() -> None:
    assert str(parse_address(" 192.0.2.1 ")) == "192.0.2.1"
    assert str(parse_address("fe80::1%eth0")) == "fe80::1"
    assert parse_address("example.com") is None
    assert parse_address("") is None
