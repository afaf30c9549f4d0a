"""The objection registry in the store, its CLI, and the objection page's form tokens."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from smtp_tracker.store import DB_FILENAME, SqliteDatabase, consent
from smtp_tracker.web.public.optout import make_form_token, verify_form_token


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    SqliteDatabase.open(tmp_path / "data").close()
    connection = sqlite3.connect(tmp_path / "data" / DB_FILENAME, isolation_level=None)
    yield connection  # type: ignore[misc]
    connection.close()


def test_states_are_set_looked_up_in_every_form_and_replaced(conn: sqlite3.Connection) -> None:
    consent.set_states(
        conn,
        [("<Bob@Example.NET>", "denied"), ("jürgen@bücher.example", "granted")],
        source="test",
    )
    assert consent.states_of(
        conn, ["bob@example.net", "BOB@example.net", "jürgen@xn--bcher-kva.example", "x@y.z"]
    ) == {
        "bob@example.net": "denied",
        "BOB@example.net": "denied",
        "jürgen@xn--bcher-kva.example": "granted",
    }
    consent.set_states(conn, [("bob@example.net", "granted")], source="later")
    entry = consent.get_entry(conn, "BOB@EXAMPLE.NET")
    assert entry is not None
    assert (entry.address, entry.state, entry.source) == ("bob@example.net", "granted", "later")
    with pytest.raises(ValueError, match="not an address"):
        consent.set_states(conn, [("no-at-sign", "denied")], source="test")
    with pytest.raises(ValueError, match="not a consent state"):
        consent.set_states(conn, [("a@b.c", "maybe")], source="test")  # type: ignore[list-item]


def test_csv_forms_and_their_errors() -> None:
    plain = "a@x.org\n\n# a comment\nB@X.org\n"
    assert list(consent.parse_csv(plain, default_state="denied")) == [
        ("a@x.org", "denied"),
        ("b@x.org", "denied"),
    ]
    exported = (
        "address,state,at,source\nc@x.org,granted,2026-01-01T00:00:00Z,cli\nd@x.org,denied,,\n"
    )
    assert list(consent.parse_csv(exported)) == [("c@x.org", "granted"), ("d@x.org", "denied")]
    with pytest.raises(ValueError, match="line 2: no state"):
        list(consent.parse_csv("\nb@x.org\n"))
    with pytest.raises(ValueError, match="line 3: 'oops' is not an address"):
        list(consent.parse_csv("a@x.org\n\noops\n", default_state="denied"))


def test_forget_removes_objection_links_and_consent_but_keeps_an_objection(
    conn: sqlite3.Connection,
) -> None:
    consent.set_states(conn, [("deny@x.org", "denied"), ("ok@x.org", "granted")], source="t")
    consent.add_optout_link(conn, "T" * 22 + "A", "t1", ["deny@x.org", "other@x.org"])
    consent.add_optout_link(conn, "U" * 22 + "A", "t2", ["ok@x.org"])
    assert consent.forget_address(conn, "DENY@x.org") == {"optout_links": 1, "consent": 0}
    assert consent.forget_address(conn, "ok@x.org") == {"optout_links": 1, "consent": 1}
    assert consent.states_of(conn, ["deny@x.org", "ok@x.org"]) == {"deny@x.org": "denied"}
    assert conn.execute("SELECT count(*) FROM optout_links").fetchone() == (0,)


def test_an_objection_spends_its_form_token_once(conn: sqlite3.Connection) -> None:
    token = "T" * 22 + "A"
    consent.add_optout_link(conn, token, "t1", ["a@x.org", "b@x.org"])
    assert consent.object_via_link(conn, token, 5, "n1") is None  # no such recipient
    assert consent.object_via_link(conn, "V" * 22 + "A", 0, "n1") is None  # no such link
    assert consent.object_via_link(conn, token, 1, "n1") == "b@x.org"
    assert consent.object_via_link(conn, token, 0, "n1") is None  # replayed
    assert consent.states_of(conn, ["a@x.org", "b@x.org"]) == {"b@x.org": "denied"}


def test_form_tokens_bind_the_link_the_key_and_the_time() -> None:
    key, other_key = b"k" * 32, b"o" * 32
    token, other = "T" * 22 + "A", "U" * 22 + "A"
    form = make_form_token(key, token, now=1_000_000)
    nonce = form.split(".")[0]
    assert verify_form_token(key, token, form, now=1_000_000 + 10) == nonce
    assert verify_form_token(key, other, form, now=1_000_010) is None
    assert verify_form_token(other_key, token, form, now=1_000_010) is None
    assert verify_form_token(key, token, form, now=1_000_000 + consent.FORM_TTL_S + 1) is None
    nonce_, issued, mac = form.split(".")
    assert verify_form_token(key, token, f"{nonce_}x.{issued}.{mac}", now=1_000_010) is None
    assert verify_form_token(key, token, f"{nonce_}.{int(issued) + 1}.{mac}", now=1_000_010) is None
    assert verify_form_token(key, token, "garbage", now=1_000_010) is None


def lookup_steps(conn: sqlite3.Connection, addresses: list[str]) -> int:
    """SQLite virtual-machine steps of one relay look-up (a count, not a time)."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 1)
    try:
        consent.states_of(conn, addresses)
    finally:
        conn.set_progress_handler(None, 1)
    return steps


def test_importing_100000_addresses_and_the_lookup_stays_an_index_probe(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    SqliteDatabase.open(data_dir).close()
    recipients = ["someone@example.com", "Person.50000@Example.ORG", "nobody@example.net"]
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    try:
        consent.set_states(
            conn, [(f"small{i}@example.org", "denied") for i in range(100)], source="t"
        )
        small = lookup_steps(conn, recipients)
    finally:
        conn.close()
    csv_file = tmp_path / "objections.csv"
    csv_file.write_text("".join(f"person.{i}@example.org\n" for i in range(100_000)))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "smtp_tracker",
            "consent",
            "import",
            str(csv_file),
            "--state",
            "denied",
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "imported 100000 addresses" in result.stdout
    assert "100100 denied" in result.stdout
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    try:
        assert consent.count_entries(conn) == {"denied": 100_100, "granted": 0}
        assert consent.states_of(conn, recipients) == {"Person.50000@Example.ORG": "denied"}
        plan = " ".join(
            str(row[-1])
            for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT address, state FROM consent WHERE address IN (?, ?)",
                ("a@b.c", "d@e.f"),
            )
        )
        assert "USING PRIMARY KEY" in plan and "SCAN" not in plan, plan
        large = lookup_steps(conn, recipients)
    finally:
        conn.close()
    # a b-tree probe: a thousand times the entries cost a few more levels, not a scan
    assert large <= small * 2, (small, large)


def test_a_reload_keeps_and_applies_the_objection_link() -> None:
    """SIGHUP rebuilt the disclosure without the objection link: it vanished from mail."""
    from smtp_tracker.config import build_config
    from smtp_tracker.reload import prepare

    running = build_config({"disclosure_optout_link": True}, {})
    plan = prepare(running, running, tls_reloadable=False, classify=False)
    assert plan.disclosure.optout_link and plan.restart_keys == ()
    changed = build_config(
        {"disclosure_optout_link": True, "disclosure_optout_text": "Stop measuring me"}, {}
    )
    plan = prepare(running, changed, tls_reloadable=False, classify=False)
    assert (plan.disclosure.optout_link, plan.disclosure.optout_text) == (
        True,
        "Stop measuring me",
    )
    assert plan.restart_keys == ()


def test_the_page_names_one_recipient_whole_and_several_cut() -> None:
    from smtp_tracker.web.public.optout import masked

    assert masked(["bob@example.net"]) == ["bob@example.net"]
    assert masked(["ivy@example.com", "jack@example.org"]) == [
        "i***@example.com",
        "j***@example.org",
    ]
    assert masked(["ivy@a.example", "ian@a.example", "i@a.example"]) == [
        "iv***@a.example",
        "ia***@a.example",
        "i@a.example",
    ]
