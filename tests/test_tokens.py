"""Tracking ids and pixel URLs."""

from __future__ import annotations

import base64
import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtp_tracker.tokens import is_well_formed_token, new_tracking_id, pixel_url


def test_new_tracking_id_shape() -> None:
    ids = {new_tracking_id() for _ in range(1000)}
    assert len(ids) == 1000
    for tid in ids:
        assert len(tid) == 23
        assert is_well_formed_token(tid)
        assert not tid.startswith("-")  # never taken for a command-line option
        assert len(base64.urlsafe_b64decode(tid + "=")) == 17


@given(st.binary(min_size=17, max_size=17))
def test_every_136_bit_value_not_starting_with_a_dash_is_well_formed(raw: bytes) -> None:
    token = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    assert is_well_formed_token(token) == (not token.startswith("-"))


@pytest.mark.parametrize(
    "value",
    [
        "",
        "short",
        secrets.token_urlsafe(17) + "A",  # 24 characters
        secrets.token_urlsafe(16),  # 22 characters: the old form
        "AAAAAAAAAAAAAAAAAAAAAAB",  # last character would carry non-zero padding bits
        "-AAAAAAAAAAAAAAAAAAAAAA",  # would read as an option
        "AAAAAAAAAAAAAAAAAAAAA/A",  # standard, not URL-safe, alphabet
        "AAAAAAAAAAAAAAAAAAAAA=A",
        "../../../../etc/passwdAA",
        "AAAAAAAAAAAAAAAAAAAAAAA\n",
    ],
)
def test_malformed_tokens(value: str) -> None:
    assert not is_well_formed_token(value)


def test_pixel_url() -> None:
    tid = new_tracking_id()
    expected = f"https://track.example.com:8443/o/{tid}.gif"
    assert pixel_url("https://track.example.com:8443", tid) == expected
    assert pixel_url("https://track.example.com:8443/", tid) == expected
    assert pixel_url("https://example.com/t/", tid) == f"https://example.com/t/o/{tid}.gif"
    with pytest.raises(ValueError, match="not a tracking id"):
        pixel_url("https://example.com", "../x")
