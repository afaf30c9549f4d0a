"""The objection registry over a PostgreSQL store: the same functions, the relay honours it.

A private PostgreSQL cluster (``tests.support.postgres``; skipped with the
reason when PostgreSQL is not installed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smtp_tracker.cli import main as cli_main
from smtp_tracker.store import backends, consent
from tests.consent.helpers import PIXEL, send
from tests.support.relay import tracking_over_tls
from tests.support.upstream import UpstreamServer

TOKEN = "T" * 22 + "A"


async def test_the_registry_over_postgresql(pg_dsn: str, tmp_path: Path) -> None:
    from smtp_tracker.store.postgresql import PgDatabase

    PgDatabase.open(pg_dsn).close()  # the schema
    registry = backends.open_registry(store=pg_dsn, data_dir=tmp_path)
    try:
        written = await registry.set_states(
            [("Bob@Example.NET", "denied"), ("a@x.org", "granted"), ("bob@example.net", "denied")],
            source="test",
        )
        assert written == 3
        assert await registry.states(["BOB@example.net", "a@x.org", "c@x.org"]) == {
            "BOB@example.net": "denied",
            "a@x.org": "granted",
        }
        await registry.add_optout_link(TOKEN, "tid", ["a@x.org", "b_c@x.org"])
        await registry.add_optout_link(TOKEN, "tid", ["a@x.org"])  # kept once
        link = await registry.find_optout_link(TOKEN)
        assert link is not None and link.recipients == ("a@x.org", "b_c@x.org")
        assert await registry.object_via_link(TOKEN, 1, "nonce-1") == "b_c@x.org"
        assert await registry.object_via_link(TOKEN, 0, "nonce-1") is None  # replayed
    finally:
        await registry.aclose()
    with PgDatabase.open(pg_dsn) as database:
        conn = database.connection
        assert [(e.address, e.state) for e in consent.iter_entries(conn)] == [
            ("a@x.org", "granted"),
            ("b_c@x.org", "denied"),
            ("bob@example.net", "denied"),
        ]
        assert [e.address for e in consent.iter_entries(conn, state="denied", page_rows=1)] == [
            "b_c@x.org",
            "bob@example.net",
        ]
        # "_" is no wildcard: bxc is not b_c
        assert consent.forget_address(conn, "bxc@x.org") == {"optout_links": 0, "consent": 0}
        assert consent.forget_address(conn, "a@x.org") == {"optout_links": 1, "consent": 1}
        consent.set_states(conn, [(f"p{i}@x.org", "denied") for i in range(20_000)], source="t")
        assert consent.count_entries(conn) == {"denied": 20_002, "granted": 0}


async def test_the_relay_honours_objections_in_a_postgresql_store(
    pg_dsn: str,
    relay_factory: Any,
    upstream: UpstreamServer,
    cert_pem_path: Path,
    key_pem_path: Path,
    tmp_path: Path,
) -> None:
    """The registry used to be opened in DATA_DIR/tracker.sqlite3 whatever the store:
    with PostgreSQL every message was consent-unavailable, none tracked."""
    assert cli_main(["consent", "deny", "zoe@example.com", "--store", pg_dsn]) == 0
    app = await relay_factory(store=pg_dsn, **tracking_over_tls(cert_pem_path, key_pem_path))
    denied = await send(app, upstream, "pg denied", ["zoe@example.com"])
    allowed = await send(app, upstream, "pg allowed", ["yann@example.com"])
    assert PIXEL.search(denied.data) is None
    assert PIXEL.search(allowed.data) is not None
    assert app.tracker.not_tracked_reasons == {"consent-denied": 1}


async def test_forget_and_link_pruning_clean_the_consent_side_on_postgresql(pg_dsn: str) -> None:
    """As on SQLite: forget removes the objection links naming the address and a
    grant but keeps an objection; pruning links removes old objection links."""
    from datetime import UTC, datetime, timedelta

    from smtp_tracker.store.postgresql import PgDatabase

    with PgDatabase.open(pg_dsn) as database:
        conn = database.connection
        conn.execute("DELETE FROM optout_links")
        conn.execute("DELETE FROM consent")
        consent.set_states(conn, [("ann@x.org", "granted"), ("dan@x.org", "denied")], source="t")
        consent.add_optout_link(conn, "F" * 22 + "A", "tid-ann", ["ann@x.org"])
        consent.add_optout_link(conn, "F" * 22 + "B", "tid-dan", ["dan@x.org"])
        database.forget_recipient("ann@x.org")
        database.forget_recipient("dan@x.org")
        assert [(e.address, e.state) for e in consent.iter_entries(conn)] == [
            ("dan@x.org", "denied")
        ]
        assert conn.execute("SELECT count(*) FROM optout_links").fetchone()[0] == 0
        consent.add_optout_link(conn, "F" * 22 + "C", "tid-eve", ["eve@x.org"])
        assert database.prune_links_batch(now=datetime.now(UTC) + timedelta(days=1)) == 0
        later = datetime.now(UTC) + timedelta(days=1826)
        assert database.prune_links_batch(now=later) == 1
        assert conn.execute("SELECT count(*) FROM optout_links").fetchone()[0] == 0
