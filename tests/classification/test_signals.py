"""Signals, not one winning rule (issue 19, item 1): real fetches by time since the relay.

The table crosses the seconds since the relay (0 s, 4 s, 29 s, 31 s, 1 h; the
default window is 30 s) with real User-Agents (and addresses where the list
matters).  What identifies the client (a reader-triggered image proxy, a mail
client, Apple's proxy, a script, a gateway) decides however soon it comes; the
window downgrades only a generic browser.  Each event's stored signals name
every rule that held, the seconds and the lists hit, and give the verdict back.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from smtp_tracker.classification import Classifier, load_networks
from smtp_tracker.classification.classifier import Signals
from smtp_tracker.store import DB_FILENAME, OpenEvent, SqliteDatabase
from smtp_tracker.store.queries import MessageFilter
from smtp_tracker.store.records import EventContext
from tests.classification.test_rules import (
    APPLE_MPP,
    BARRACUDA,
    CHROME_WINDOWS,
    ELSEWHERE,
    GOOGLE_PROXY,
    HEADLESS_CHROME,
    IPHONE_MAIL,
    OUTLOOK_365,
    RELAYED,
    THUNDERBIRD,
    YAHOO_PROXY,
)
from tests.store.store_helpers import make_record, token

#: Thunderbird 128 (the version of the report in issue 19).
THUNDERBIRD_128 = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.5.0"
GOOGLE_ADDRESS = "66.249.84.22"  # seen with GoogleImageProxy in ESP open events
APPLE_RELAY_ADDRESS = "172.224.226.33"  # iCloud Private Relay egress
EOP_ADDRESS = "40.107.22.12"  # Exchange Online Protection (spf.protection.outlook.com)
CURL = "curl/8.1.2"

TIMES_S = (0.0, 4.0, 29.0, 31.0, 3600.0)
WINDOW = "timing:<30s after relay"

# (name, User-Agent, client address, verdict at 0/4/29 s, verdict at 31 s/1 h, reason early, late)
CLIENTS: list[tuple[str, str, str, str, str, str, str]] = [
    ("gmail-proxy", GOOGLE_PROXY, GOOGLE_ADDRESS, "mail_proxy", "mail_proxy",
     "ua:GoogleImageProxy", "ua:GoogleImageProxy"),
    ("yahoo-proxy", YAHOO_PROXY, "203.0.113.9", "mail_proxy", "mail_proxy",
     "ua:YahooMailProxy", "ua:YahooMailProxy"),
    ("apple-mpp", APPLE_MPP, APPLE_RELAY_ADDRESS, "privacy_proxy", "privacy_proxy",
     "net:apple-mpp", "net:apple-mpp"),
    ("outlook-desktop", OUTLOOK_365, ELSEWHERE, "human", "human",
     "ua:mail-client", "ua:mail-client"),
    ("thunderbird", THUNDERBIRD_128, ELSEWHERE, "human", "human",
     "ua:mail-client", "ua:mail-client"),
    ("iphone-mail", IPHONE_MAIL, "2001:db8::1", "human", "human",
     "ua:mail-client", "ua:mail-client"),
    ("generic-chrome", CHROME_WINDOWS, ELSEWHERE, "scanner", "human", WINDOW, "ua:browser"),
    ("headless-chrome", HEADLESS_CHROME, ELSEWHERE, "scanner", "scanner",
     "ua:headless", "ua:headless"),
    ("curl", CURL, ELSEWHERE, "scanner", "scanner", "ua:http-library", "ua:http-library"),
    ("gateway-agent", BARRACUDA, ELSEWHERE, "scanner", "scanner",
     "ua:security-gateway", "ua:security-gateway"),
    ("gateway-network", CHROME_WINDOWS, EOP_ADDRESS, "scanner", "scanner",
     "net:microsoft-eop", "net:microsoft-eop"),
]  # fmt: skip

TABLE = [
    pytest.param(
        agent,
        address,
        seconds,
        early if seconds < 30 else late,
        early_reason if seconds < 30 else late_reason,
        id=f"{name}-{seconds:g}s",
    )
    for name, agent, address, early, late, early_reason, late_reason in CLIENTS
    for seconds in TIMES_S
]


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier(load_networks(), prefetch_window_s=30)


def fetch(agent: str | None, address: str | None, seconds: float) -> EventContext:
    return EventContext(
        kind="open",
        at=RELAYED + timedelta(seconds=seconds),
        client_address=address,
        user_agent=agent,
        relayed_at=RELAYED,
    )


@pytest.mark.parametrize(("agent", "address", "seconds", "verdict", "reason"), TABLE)
def test_verdict_by_time_since_relay_and_user_agent(
    classifier: Classifier,
    agent: str,
    address: str,
    seconds: float,
    verdict: str,
    reason: str,
) -> None:
    judged = classifier(fetch(agent, address, seconds))
    assert (judged.verdict, judged.reason) == (verdict, reason)
    signals = Signals.from_json(judged.signals)
    assert signals is not None
    assert signals.elapsed_s == seconds
    assert signals.rules[0] == reason
    assert (WINDOW in signals.rules) == (seconds < 30)  # the window is a signal, early or not
    assert classifier.verdict_of(signals) == (verdict, reason)


def test_signals_keep_every_rule_that_held_and_the_lists_hit(classifier: Classifier) -> None:
    judged = classifier(fetch(GOOGLE_PROXY, GOOGLE_ADDRESS, 4))
    assert json.loads(judged.signals or "") == {
        "rules": ["ua:GoogleImageProxy", "net:google", WINDOW, "ua:browser"],
        "elapsed_s": 4.0,
        "networks": ["google"],
    }
    # the lists found at record time stand in for an address the store did not keep
    hashed = EventContext(
        kind="open",
        at=RELAYED + timedelta(hours=1),
        client_address="3f" * 32,
        user_agent=CHROME_WINDOWS,
        relayed_at=RELAYED,
        networks=frozenset({"microsoft-eop"}),
    )
    assert classifier(hashed)[:2] == ("scanner", "net:microsoft-eop")
    assert Signals.from_json("not json") is None and Signals.from_json(None) is None


def test_a_gmail_open_seconds_after_the_relay_counts_as_opened(tmp_path: Path) -> None:
    """The report of issue 19, through the store: Gmail's proxy 4 s after the relay, Thunderbird."""
    with SqliteDatabase.open(tmp_path, classifier=Classifier(load_networks())) as db:
        db.record_message(make_record(0))
        relayed = make_record(0).relayed_at
        db.record_opens(
            [
                OpenEvent(
                    tracking_id=token(0),
                    at=relayed + timedelta(seconds=4),
                    ip=GOOGLE_ADDRESS,
                    user_agent=GOOGLE_PROXY,
                ),
                OpenEvent(
                    tracking_id=token(0),
                    at=relayed + timedelta(seconds=9),
                    ip=ELSEWHERE,
                    user_agent=THUNDERBIRD_128,
                ),
            ]
        )
        detail = db.query_message(token(0))
        assert detail is not None
        assert [(o.verdict, o.verdict_reason) for o in detail.opens] == [
            ("mail_proxy", "ua:GoogleImageProxy"),
            ("human", "ua:mail-client"),
        ]
        assert detail.summary.opened and detail.summary.opened_via == "pixel"
        assert [row.opened for row in db.query_stats()] == [1]
        assert [m.tracking_id for m in db.query_messages(MessageFilter(opened=True)).items] == [
            token(0)
        ]
    with sqlite3.connect(tmp_path / DB_FILENAME) as conn:
        stored = [json.loads(r[0]) for r in conn.execute("SELECT signals FROM opens ORDER BY id")]
    assert stored[0]["rules"][0] == "ua:GoogleImageProxy" and stored[0]["elapsed_s"] == 4.0
    assert stored[1] == {
        "rules": ["ua:mail-client", WINDOW, "ua:browser"],
        "elapsed_s": 9.0,
        "networks": [],
    }


def test_thunderbird_the_table_uses_is_a_mail_client(classifier: Classifier) -> None:
    assert classifier(fetch(THUNDERBIRD, ELSEWHERE, 1))[:2] == ("human", "ua:mail-client")
