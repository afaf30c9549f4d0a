"""``ip_policy``: what of a client address the store keeps (full, truncate, hash, none).

On both backends; the hash key is ``DATA_DIR/ip-hash.key`` on either (PostgreSQL's
hosts each read their own copy), so the hash tests open the store as ``serve`` does
(:func:`smtp_tracker.store.backends.open_store`).  The key file's own tests and the
policy's pure functions involve no store.
"""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtp_tracker.errors import StoreError
from smtp_tracker.store import AddressPolicy, IpPolicy, OpenEvent, backends
from smtp_tracker.store.address import (
    HASH_KEY_FILENAME,
    _truncate_ipv4,
    load_or_create_hash_key,
)

from .store_helpers import T0, make_record, token

ADDRESSES = ["192.0.2.77", "2001:db8:abcd:12::1", "::ffff:198.51.100.9", "not-an-ip", None]


async def stored_ips(
    open_store: Any, policy: IpPolicy, addresses: list[str | None]
) -> list[str | None]:
    """Record one open per address under *policy* in the store ``open_store(**options)``
    opens and read back what was kept."""
    async with await open_store(ip_policy=policy) as store:
        if not await store.is_known_token(token(1)):
            await store.record_message(make_record(1))
        before = await store.find_message(token(1))
        assert before is not None
        hits = [OpenEvent(tracking_id=token(1), at=T0, ip=a, user_agent=None) for a in addresses]
        assert await store.record_opens(hits) == len(addresses)
        after = await store.find_message(token(1))
        assert after is not None
        return [o.ip for o in after.opens[len(before.opens) :]]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("full", ["192.0.2.77", "2001:db8:abcd:12::1", "198.51.100.9", None, None]),
        ("truncate", ["192.0.2.0/24", "2001:db8:abcd::/48", "198.51.100.0/24", None, None]),
        ("none", [None, None, None, None, None]),
    ],
)
async def test_policy_stores_what_it_promises(
    policy: IpPolicy, expected: list[str | None], open_store: Any
) -> None:
    assert await stored_ips(open_store, policy, ADDRESSES) == expected


@pytest.fixture
def serve_store(backend: str, request: pytest.FixtureRequest) -> Any:
    """``serve_store(data_dir)``: an ``open_store(**options)`` for *data_dir*, opening the
    test's store as ``serve`` does (SQLite in *data_dir*; or the test's one PostgreSQL
    database, its hash key in *data_dir*)."""
    dsn = None if backend == "sqlite" else request.getfixturevalue("pg_dsn")

    def for_data_dir(data_dir: Path) -> Any:
        async def open_store(**options: Any) -> Any:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # as serve's start does
            return await backends.open_store(store=dsn, data_dir=data_dir, **options)

        return open_store

    return for_data_dir


async def test_hash_is_keyed_stable_and_not_the_address(tmp_path: Path, serve_store: Any) -> None:
    a, b = serve_store(tmp_path / "a"), serve_store(tmp_path / "b")
    first = await stored_ips(a, "hash", ["192.0.2.77", "192.0.2.78", "192.0.2.77"])
    again = await stored_ips(a, "hash", ["192.0.2.77"])  # reopened: same key
    other_key = await stored_ips(b, "hash", ["192.0.2.77"])
    h77, h78, h77_again = first
    assert h77 is not None and h78 is not None
    assert len(h77) == 64 and int(h77, 16) >= 0
    assert "192.0.2" not in h77
    assert h77 == h77_again == again[0]
    assert h77 != h78
    assert other_key[0] != h77
    key_file = tmp_path / "a" / HASH_KEY_FILENAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


async def test_hash_key_is_created_only_for_the_hash_policy(
    data_dir: Path, serve_store: Any
) -> None:
    await stored_ips(serve_store(data_dir), "truncate", ["192.0.2.1"])
    assert not (data_dir / HASH_KEY_FILENAME).exists()
    await stored_ips(serve_store(data_dir), "hash", ["192.0.2.1"])
    assert (data_dir / HASH_KEY_FILENAME).exists()


def test_hash_key_file_round_trip_and_corruption(tmp_path: Path) -> None:
    path = tmp_path / HASH_KEY_FILENAME
    key = load_or_create_hash_key(path)
    assert len(key) == 32
    assert load_or_create_hash_key(path) == key
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    path.write_text("tooshort\n")
    with pytest.raises(StoreError, match="hex key"):
        load_or_create_hash_key(path)


def test_hash_key_unreadable(tmp_path: Path) -> None:
    path = tmp_path / HASH_KEY_FILENAME
    path.mkdir()  # a directory where the key should be
    with pytest.raises(StoreError, match="cannot read"):
        load_or_create_hash_key(path)


def test_address_policy_validation() -> None:
    with pytest.raises(ValueError, match="ip_policy must be one of"):
        AddressPolicy("everything")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        AddressPolicy("hash")
    policy = AddressPolicy("hash", hash_key=b"k" * 32)
    assert "k" * 32 not in repr(policy)
    assert AddressPolicy("truncate").apply("fe80::1%eth0") == "fe80::/48"


async def test_unknown_policy_is_a_store_error(open_store: Any) -> None:
    with pytest.raises(StoreError, match="ip_policy must be one of"):
        await open_store(ip_policy="some")


@given(
    st.one_of(
        st.ip_addresses(v=4).map(str),
        st.lists(st.text("0123456789 x-", max_size=4), min_size=1, max_size=6).map(".".join),
    )
)
def test_the_ipv4_fast_path_agrees_with_ipaddress(address: str) -> None:
    fast = _truncate_ipv4(address)
    if fast is not None:
        network = ipaddress.ip_network((ipaddress.IPv4Address(address), 24), strict=False)
        assert fast == str(network)
    assert AddressPolicy("truncate").apply(address) == _general_truncate(address)


def _general_truncate(address: str) -> str | None:
    try:
        ip = ipaddress.ip_address(address.strip().split("%", 1)[0])
    except ValueError:
        return None
    return str(ipaddress.ip_network((ip, 24 if ip.version == 4 else 48), strict=False))
