"""KeyTable, SigningTable and key files, read as OpenDKIM reads them."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from smtp_tracker.dkim import DkimKeyError, load_key, load_keyring, parse_key
from smtp_tracker.errors import ConfigError
from tests.dkim.conftest import ed25519_pem, ed25519_seed, rsa_pem


def _public_der(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("pkcs8", [False, True], ids=["pkcs1", "pkcs8"])
def test_rsa_pem_in_both_forms(rsa_key: rsa.RSAPrivateKey, pkcs8: bool) -> None:
    key = parse_key(rsa_pem(rsa_key, pkcs8=pkcs8), domain="example.com", selector="s", source="f")
    assert (key.algorithm, key.bits, key.key_type) == ("rsa-sha256", 2048, "rsa")
    assert key.dns_record() == b"v=DKIM1; k=rsa; p=" + base64.b64encode(_public_der(rsa_key))


@pytest.mark.parametrize("form", ["pem", "seed", "seed-and-public"])
def test_ed25519_in_every_form(ed_key: ed25519.Ed25519PrivateKey, form: str) -> None:
    raw_public = ed_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    data = {
        "pem": ed25519_pem(ed_key),
        "seed": ed25519_seed(ed_key),
        "seed-and-public": base64.b64encode(base64.b64decode(ed25519_seed(ed_key)) + raw_public),
    }[form]
    key = parse_key(data, domain="example.com", selector="ed", source="f")
    assert (key.algorithm, key.bits) == ("ed25519-sha256", 256)
    assert key.dns_record() == b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw_public)


def test_a_64_octet_ed25519_key_whose_halves_differ_is_refused(
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    data = base64.b64encode(base64.b64decode(ed25519_seed(ed_key)) + b"\x00" * 32)
    with pytest.raises(DkimKeyError, match="not a private key"):
        parse_key(data, domain="example.com", selector="ed", source="f")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"hello", "not a private key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a private key"),
        (
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "DKIM signs with RSA or Ed25519",
        ),
        (
            rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
            "encrypted",
        ),
    ],
    ids=["garbage", "bad-pem", "ec-key", "encrypted"],
)
def test_keys_that_cannot_sign(data: bytes, message: str) -> None:
    with pytest.raises(DkimKeyError, match=message) as caught:
        parse_key(data, domain="example.com", selector="s", source="f")
    assert "\n" not in str(caught.value)


def test_a_key_file_error_names_the_file_and_never_its_content(tmp_path: Path) -> None:
    path = tmp_path / "k.private"
    path.write_bytes(b"-----BEGIN RSA PRIVATE KEY-----\nc2VjcmV0\n-----END RSA PRIVATE KEY-----\n")
    with pytest.raises(DkimKeyError) as caught:
        load_key(path, domain="example.com", selector="s")
    assert str(caught.value).startswith(f"{path}: ")
    assert "c2VjcmV0" not in str(caught.value)
    with pytest.raises(DkimKeyError, match="cannot read the key file"):
        load_key(tmp_path / "missing", domain="example.com", selector="s")


def test_key_table_loads_every_key(key_table: Path) -> None:
    warnings: list[str] = []
    keyring = load_keyring(key_table, warnings=warnings)
    assert sorted(keyring.names) == ["ed", "rsa"]
    assert keyring.find("EXAMPLE.com", "SEL") is not None
    assert keyring.find("example.com", "ed") is not None
    assert keyring.find("example.org", "sel") is None
    assert warnings == []


def test_key_table_relative_paths_are_from_its_directory(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    (tmp_path / "k.pem").write_bytes(rsa_pem(rsa_key))
    (tmp_path / "k.pem").chmod(0o640)
    table = tmp_path / "KeyTable"
    table.write_text("k example.com:sel:./k.pem\n")
    assert load_keyring(f"file:{table}").find("example.com", "sel") is not None


def _seed_key(first: int) -> ed25519.Ed25519PrivateKey:
    """An Ed25519 key whose seed's base64 starts with ``A`` (first=0) or ``/`` (first=0xFC)."""
    return ed25519.Ed25519PrivateKey.from_private_bytes(bytes([first]) + bytes(range(1, 32)))


@pytest.mark.parametrize("first", [0x00, 0xFC], ids=["plain", "starts-with-slash"])
def test_inline_key_in_the_key_table(tmp_path: Path, first: int) -> None:
    # One base64 seed in 64 starts with "/", which OpenDKIM's rule reads as a path.
    seed = ed25519_seed(_seed_key(first)).decode().strip()
    assert seed.startswith("/") == (first == 0xFC)
    table = tmp_path / "KeyTable"
    table.write_text(f"k example.com:ed:{seed}\n")
    key = load_keyring(table).find("example.com", "ed")
    assert key is not None and key.source == f"{table}:1"


def test_a_missing_key_file_named_like_base64_is_still_a_missing_file(tmp_path: Path) -> None:
    assert len("/etc/opendkim/keys/example/selector1") % 4 == 0  # reads as base64
    table = tmp_path / "KeyTable"
    table.write_text("k example.com:sel:/etc/opendkim/keys/example/selector1\n")
    with pytest.raises(ConfigError, match="keys/example/selector1: cannot read the key file"):
        load_keyring(table)


def test_a_key_readable_by_others_is_a_warning(key_table: Path) -> None:
    (key_table.parent / "keys" / "sel.private").chmod(0o644)
    warnings: list[str] = []
    load_keyring(key_table, warnings=warnings)
    assert warnings == [
        f"{key_table.parent / 'keys' / 'sel.private'}: the private key is readable by others; "
        f"run: chmod o-rwx {key_table.parent / 'keys' / 'sel.private'}"
    ]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("k example.com:sel", "expected 'keyname domain:selector:keyfile'"),
        ("k", "expected 'keyname domain:selector:keyfile'"),
        ("k %:sel:/dev/null", "a '%' domain"),
        ("k exa mple.com:sel:/x", "is not a domain and selector"),
        ("k example.com:sel:/nonexistent/key", "/nonexistent/key: cannot read the key file"),
        ("k example.com:sel:/dev/null", "/dev/null: not a private key"),
        ("k example.com:sel:bm90IGEga2V5", "not a private key"),
    ],
)
def test_each_bad_key_table_line_is_one_problem_with_its_line(
    key_table: Path, line: str, problem: str
) -> None:
    key_table.write_text(key_table.read_text() + "\n" + line + "\n")
    with pytest.raises(ConfigError) as caught:
        load_keyring(key_table)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"{key_table}:5: ")
    assert problem in caught.value.problems[0]


def test_every_problem_at_once(key_table: Path) -> None:
    key_table.write_text(key_table.read_text() + "rsa example.org:x:/dev/null\nbad\n")
    with pytest.raises(ConfigError) as caught:
        load_keyring(key_table)
    assert [p.split(": ", 1)[0] for p in caught.value.problems] == [
        f"{key_table}:4",
        f"{key_table}:5",
    ]


def test_a_key_table_without_keys_or_file(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="names no key"):
        load_keyring(tmp_path / "empty")
    with pytest.raises(ConfigError, match="cannot read the table"):
        load_keyring(tmp_path / "missing")
    with pytest.raises(ConfigError, match="only flat files"):
        load_keyring("db:/etc/opendkim/keys.db")


def test_signing_table_plain_lookup_order(key_table: Path, tmp_path: Path) -> None:
    table = tmp_path / "SigningTable"
    table.write_text("*  ed\n.example.com rsa\nboss@example.com ed\nexample.com rsa\n")
    keyring = load_keyring(key_table, table)
    assert keyring.key_names_for("boss@example.com") == ["ed", "rsa", "ed"]
    assert keyring.key_names_for("anyone@mail.example.com") == ["rsa", "ed"]
    assert keyring.key_names_for("x@example.org") == ["ed"]


def test_signing_table_refile_wildcards(key_table: Path, tmp_path: Path) -> None:
    table = tmp_path / "SigningTable"
    table.write_text("*@example.com rsa\n*@*.example.com ed\n")
    keyring = load_keyring(key_table, f"refile:{table}")
    assert keyring.key_names_for("A@Example.com") == ["rsa"]
    assert keyring.key_names_for("b@news.example.com") == ["ed"]
    assert keyring.key_names_for("b@example.org") == []


def test_signing_table_problems(key_table: Path, tmp_path: Path) -> None:
    table = tmp_path / "SigningTable"
    table.write_text("*@example.com\n*@example.com nokey\n*@example.com rsa\n")
    warnings: list[str] = []
    with pytest.raises(ConfigError) as caught:
        load_keyring(key_table, table, warnings=warnings)
    assert caught.value.problems == (
        f"{table}:1: expected 'pattern keyname', got '*@example.com'",
        f"{table}:2: key name 'nokey' is not in the KeyTable",
    )


def test_a_key_no_signing_table_line_uses_is_a_warning(key_table: Path, tmp_path: Path) -> None:
    table = tmp_path / "SigningTable"
    table.write_text("*@example.com rsa\n")
    warnings: list[str] = []
    load_keyring(key_table, f"refile:{table}", warnings=warnings)
    assert warnings == [f"{key_table}: key name 'ed' is used by no SigningTable line"]
