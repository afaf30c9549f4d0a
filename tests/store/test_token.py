"""Tracking ids and pixel URLs."""

from __future__ import annotations

import base64
import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtp_tracker.store import is_well_formed_token, new_tracking_id, pixel_url


def test_new_tracking_id_shape() -> None:
    ids = {new_tracking_id() for _ in range(1000)}
    assert len(ids) == 1000
    for tid in ids:
        assert len(tid) == 22
        assert is_well_formed_token(tid)
        assert len(base64.urlsafe_b64decode(tid + "==")) == 16


@given(st.binary(min_size=16, max_size=16))
def test_every_128_bit_value_is_well_formed(raw: bytes) -> None:
    assert is_well_formed_token(base64.urlsafe_b64encode(raw).rstrip(b"=").decode())


@pytest.mark.parametrize(
    "value",
    [
        "",
        "short",
        secrets.token_urlsafe(16) + "A",  # 23 characters
        "AAAAAAAAAAAAAAAAAAAAAB",  # last character would carry non-zero padding bits
        "AAAAAAAAAAAAAAAAAAAA/A",  # standard, not URL-safe, alphabet
        "AAAAAAAAAAAAAAAAAAAA=A",
        "../../../../etc/passwdA",
        "AAAAAAAAAAAAAAAAAAAAAA\n",
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
