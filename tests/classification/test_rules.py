"""Classification of open and click events: real User-Agents and addresses, timing, network lists.

The User-Agent strings are real, each with where it was seen; the addresses
are from the packaged network lists' own sources (observed GoogleImageProxy
and Private Relay addresses) or documentation ranges (RFC 5737, RFC 3849)
for "anywhere else".
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from smtp_tracker.classification import (
    RULES,
    Classifier,
    NetworkListError,
    import_network_list,
    load_networks,
    packaged_names,
    parse_ip,
    parse_network_list,
)
from smtp_tracker.cli import main
from smtp_tracker.store import SqliteStore
from smtp_tracker.store.records import EventContext, EventKind
from smtp_tracker.web import make_pixel_app, start_site
from tests.support.waiting import wait_until
from tests.web.web_helpers import make_record, token

RELAYED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LATER_S = 3600.0  # an hour after the relay: outside any prefetch window
ELSEWHERE = "198.51.100.7"  # RFC 5737 documentation address, in no list

# -- real User-Agent strings -------------------------------------------------------
#: Apple Mail Privacy Protection (ua-parser/uap-core issue #509).
APPLE_MPP = "Mozilla/5.0"
#: Gmail's image proxy (browscap issue #1108, ua-parser-js issue #494).
GOOGLE_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
#: Yahoo Mail's image proxy (ua-parser-js issue #494).
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
#: The delivery-time prefetch GMass calls Gmail's false opens (gmass.co/blog/false-opens-in-gmail).
EDGE12_PREFETCH = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/42.0.2311.135 Safari/537.36 Edge/12.246 Mozilla/5.0"
)
#: Barracuda's scanner (Braze documentation, bot filtering).
BARRACUDA = "Barracuda Sentinel (EE)"
#: Outlook 2010 on Windows 7 (ua-parser/uap-core issue #29).
OUTLOOK_2010 = (
    "Mozilla/4.0 (compatible; MSIE 7.0; Windows NT 6.1; WOW64; Trident/4.0; SLCC2; .NET CLR "
    "2.0.50727; .NET CLR 3.5.30729; .NET CLR 3.0.30729; InfoPath.3; .NET4.0C; .NET4.0E; "
    "Microsoft Outlook 14.0.7109; ms-office; MSOffice 14)"
)
#: Outlook for Microsoft 365 on Windows ("Microsoft Office/16.0 ... Microsoft Outlook 16.0.x").
OUTLOOK_365 = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.4266; Pro)"
#: Outlook for iOS (nielsbasjes/yauaa issue #224).
OUTLOOK_IOS = "Outlook-iOS/709.2226530.prod.iphone (3.24.1)"
#: Windows Live Mail (ua-parser/uap-python issue #43).
WINDOWS_LIVE_MAIL = (
    "Outlook-Express/7.0 (MSIE 7.0; Windows NT 6.1; Trident/4.0; SLCC2; .NET CLR 2.0.50727; "
    ".NET CLR 3.5.30729; .NET CLR 3.0.30729; Media Center PC 6.0; TmstmpExt)"
)
#: Apple Mail on macOS, MPP off (ua-parser/uap-core issue #528; medama-io/go-useragent #10).
APPLE_MAIL_MACOS = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
)
#: Mail on iPhone, MPP off (biggora/express-useragent issue #78).
IPHONE_MAIL = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 10_1_1 like Mac OS X) AppleWebKit/602.2.14 "
    "(KHTML, like Gecko) Mobile/14B100"
)
#: Thunderbird 115 on Linux (its default User-Agent).
THUNDERBIRD = "Mozilla/5.0 (X11; Linux x86_64; rv:115.0) Gecko/20100101 Thunderbird/115.6.0"
#: Chrome on Android reading webmail (Chrome's reduced User-Agent).
ANDROID_CHROME = (
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Mobile Safari/537.36"
)
#: Firefox on Windows reading webmail.
FIREFOX_WINDOWS = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0"
#: Chrome on Windows (what security gateways often claim to be).
CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)
HEADLESS_CHROME = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "HeadlessChrome/120.0.6099.109 Safari/537.36"
)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"

# (User-Agent, client address, kind, expected verdict, expected reason)
CASES: list[tuple[str | None, str | None, EventKind, str, str]] = [
    # Apple Mail Privacy Protection
    (APPLE_MPP, "172.224.226.33", "open", "privacy_proxy", "net:apple-mpp"),
    (APPLE_MPP, "104.28.103.77", "open", "privacy_proxy", "net:apple-mpp"),
    (APPLE_MPP, "2a04:4e41:275f:1700::1a", "open", "privacy_proxy", "net:apple-mpp"),
    (APPLE_MPP, ELSEWHERE, "open", "privacy_proxy", "ua:apple-mpp"),
    (APPLE_MPP, ELSEWHERE, "click", "unknown", "no-rule"),  # MPP does not follow links
    # Gmail's image proxy (addresses seen with this User-Agent in ESP open events)
    (GOOGLE_PROXY, "66.249.84.22", "open", "mail_proxy", "ua:GoogleImageProxy"),
    (GOOGLE_PROXY, "66.249.93.231", "open", "mail_proxy", "ua:GoogleImageProxy"),
    (GOOGLE_PROXY, "74.125.210.129", "open", "mail_proxy", "ua:GoogleImageProxy"),
    (GOOGLE_PROXY, "66.249.84.22", "click", "scanner", "ua:image-proxy-click"),
    (CHROME_WINDOWS, "66.249.84.22", "open", "scanner", "net:google"),
    (CHROME_WINDOWS, "::ffff:66.102.8.34", "open", "scanner", "net:google"),
    (EDGE12_PREFETCH, "108.177.2.32", "open", "scanner", "ua:prefetch-edge12"),
    (GOOGLEBOT, "66.249.66.1", "open", "scanner", "ua:crawler"),
    # Yahoo Mail's image proxy
    (YAHOO_PROXY, "203.0.113.9", "open", "mail_proxy", "ua:YahooMailProxy"),
    (YAHOO_PROXY, "203.0.113.9", "click", "scanner", "ua:image-proxy-click"),
    # Outlook / Microsoft
    (OUTLOOK_2010, ELSEWHERE, "open", "human", "ua:mail-client"),
    (OUTLOOK_365, ELSEWHERE, "open", "human", "ua:mail-client"),
    (OUTLOOK_IOS, "2001:db8:5::7", "open", "human", "ua:mail-client"),
    (WINDOWS_LIVE_MAIL, ELSEWHERE, "open", "human", "ua:mail-client"),
    (CHROME_WINDOWS, "40.107.22.12", "open", "scanner", "net:microsoft-eop"),
    (CHROME_WINDOWS, "2a01:111:f403:c000::9", "click", "scanner", "net:microsoft-eop"),
    # security gateways and other scanners
    (BARRACUDA, ELSEWHERE, "open", "scanner", "ua:security-gateway"),
    (CHROME_WINDOWS, "209.222.82.10", "click", "scanner", "net:barracuda"),
    (CHROME_WINDOWS, "205.139.110.20", "open", "scanner", "net:mimecast"),
    (None, "91.220.42.9", "open", "scanner", "net:mimecast"),
    ("python-requests/2.32.3", ELSEWHERE, "open", "scanner", "ua:http-library"),
    ("curl/8.1.2", ELSEWHERE, "click", "scanner", "ua:http-library"),
    ("Wget/1.21.3", ELSEWHERE, "open", "scanner", "ua:http-library"),
    ("okhttp/4.10.0", ELSEWHERE, "open", "scanner", "ua:http-library"),
    ("Java/17.0.2", ELSEWHERE, "open", "scanner", "ua:http-library"),
    ("Python/3.9 aiohttp/3.8.1", ELSEWHERE, "open", "scanner", "ua:http-library"),
    ("Go-http-client/1.1", ELSEWHERE, "open", "scanner", "ua:http-library"),
    (HEADLESS_CHROME, ELSEWHERE, "open", "scanner", "ua:headless"),
    # real desktop and mobile clients
    (THUNDERBIRD, ELSEWHERE, "open", "human", "ua:mail-client"),
    (APPLE_MAIL_MACOS, ELSEWHERE, "open", "human", "ua:mail-client"),
    (APPLE_MAIL_MACOS, "172.224.226.33", "open", "human", "ua:mail-client"),
    (IPHONE_MAIL, "2001:db8::1", "open", "human", "ua:mail-client"),
    (ANDROID_CHROME, ELSEWHERE, "open", "human", "ua:browser"),
    (FIREFOX_WINDOWS, ELSEWHERE, "click", "human", "ua:browser"),
    (CHROME_WINDOWS, "104.28.103.77", "click", "human", "ua:browser"),  # Safari-like relay user
    # nothing to judge by
    (None, ELSEWHERE, "open", "unknown", "ua:missing"),
    ("   ", None, "open", "unknown", "ua:missing"),
    ("Internal-Checker/2.0", ELSEWHERE, "open", "unknown", "no-rule"),
    (THUNDERBIRD, "not an address", "open", "human", "ua:mail-client"),
]


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier(load_networks(), prefetch_window_s=30)


def event(
    user_agent: str | None,
    address: str | None,
    *,
    kind: EventKind = "open",
    after_s: float = LATER_S,
) -> EventContext:
    return EventContext(
        kind=kind,
        at=RELAYED + timedelta(seconds=after_s),
        client_address=address,
        user_agent=user_agent,
        relayed_at=RELAYED,
    )


@pytest.mark.parametrize(("user_agent", "address", "kind", "verdict", "reason"), CASES)
def test_real_user_agents_and_addresses(
    classifier: Classifier,
    user_agent: str | None,
    address: str | None,
    kind: EventKind,
    verdict: str,
    reason: str,
) -> None:
    assert classifier(event(user_agent, address, kind=kind))[:2] == (verdict, reason)


def test_every_rule_is_exercised_by_the_table(classifier: Classifier) -> None:
    reasons = {reason for *_, reason in CASES}
    names = {rule.name for rule in RULES}
    assert names - reasons == {"timing:<{prefetch_window_s}s after relay"}  # its own test below
    assert all(rule.source for rule in RULES)


def test_timing_downgrades_only_what_nothing_else_identifies() -> None:
    """The window judges generic browsers and unknown clients; identified ones keep their verdict.

    The time-by-User-Agent table is tests/classification/test_signals.py.
    """
    classifier = Classifier(load_networks(), prefetch_window_s=12)
    soon = "timing:<12s after relay"
    assert classifier(event(FIREFOX_WINDOWS, ELSEWHERE, kind="click", after_s=2))[:2] == (
        "scanner",
        soon,
    )
    assert classifier(event(CHROME_WINDOWS, ELSEWHERE, after_s=-1.5))[:2] == ("scanner", soon)
    assert classifier(event("Internal-Checker/2.0", ELSEWHERE, after_s=11.9))[:2] == (
        "scanner",
        soon,
    )
    assert classifier(event(None, ELSEWHERE, after_s=3))[:2] == ("scanner", soon)
    # at and after the window the client decides
    assert classifier(event(CHROME_WINDOWS, ELSEWHERE, after_s=12))[:2] == ("human", "ua:browser")
    # a mail client and a reader-triggered proxy are readers however soon they come
    assert classifier(event(THUNDERBIRD, ELSEWHERE, after_s=3))[:2] == ("human", "ua:mail-client")
    assert classifier(event(GOOGLE_PROXY, "66.249.84.22", after_s=4))[:2] == (
        "mail_proxy",
        "ua:GoogleImageProxy",
    )
    assert classifier(event(APPLE_MPP, "172.224.226.33", after_s=1))[:2] == (
        "privacy_proxy",
        "net:apple-mpp",
    )
    assert classifier(event("curl/8.1.2", ELSEWHERE, after_s=1))[:2] == (
        "scanner",
        "ua:http-library",
    )


def test_prefetch_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Classifier(load_networks(), prefetch_window_s=0)


def test_a_rule_naming_a_missing_list_is_refused() -> None:
    networks = load_networks()
    del networks["mimecast"]
    with pytest.raises(ValueError, match="mimecast"):
        Classifier(networks)


# -- network lists ------------------------------------------------------------------


def test_packaged_lists_document_source_url_date_and_partiality() -> None:
    lists = load_networks()
    assert set(packaged_names()) == set(lists) >= {"apple-mpp", "google", "microsoft-eop"}
    for network in lists.values():
        assert network.count > 0, network.name
        assert network.header["name"] == network.name
        for field in ("source", "url", "date", "partial"):
            assert network.header.get(field), (network.name, field)
        assert network.origin == "packaged"


def test_list_parsing_merges_and_looks_up_both_versions() -> None:
    text = (
        "# source: test\n# date: 2024-05-01\n"
        "192.0.2.0/25\n192.0.2.128/25  # adjacent: merged with the line above\n"
        "192.0.2.64/26\n"  # inside: merged
        "203.0.113.7\n"  # a bare address is a /32
        "172.224.226.0/27,GB,GB-EN,London,\n"  # Apple's CSV rows
        "2001:db8:100::/40\n\n"
    )
    network = parse_network_list(text, name="t", origin="t.txt")
    assert (network.count, network.source, network.date) == (6, "test", "2024-05-01")
    inside = ["192.0.2.0", "192.0.2.255", "203.0.113.7", "172.224.226.31", "2001:db8:1ff::1"]
    outside = ["192.0.1.255", "192.0.3.0", "203.0.113.8", "172.224.226.32", "2001:db8:200::"]
    assert all(a in network for a in inside)
    assert not any(a in network for a in outside)
    assert network.contains(parse_ip("::ffff:192.0.2.9"))
    assert not network.contains(None) and "junk" not in network


def test_list_lookup_agrees_with_ipaddress_on_random_addresses() -> None:
    import random

    rng = random.Random(7)
    nets = [
        ipaddress.ip_network(
            f"{rng.randrange(1, 223)}.{rng.randrange(256)}.0.0/{rng.randrange(12, 25)}",
            strict=False,
        )
        for _ in range(300)
    ]
    network = parse_network_list("\n".join(map(str, nets)), name="r", origin="r")
    for _ in range(5000):
        address = ipaddress.IPv4Address(rng.getrandbits(32))
        assert (str(address) in network) == any(address in n for n in nets), address


def test_fast_cidr_parsing_agrees_with_ipaddress() -> None:
    import random

    rng = random.Random(11)
    lines = []
    for _ in range(2000):
        if rng.random() < 0.5:
            length = rng.randrange(0, 33)
            net: ipaddress.IPv4Network | ipaddress.IPv6Network = ipaddress.IPv4Network(
                (rng.getrandbits(32), length), strict=False
            )
        else:
            length = rng.randrange(0, 129)
            net = ipaddress.IPv6Network((rng.getrandbits(128), length), strict=False)
        lines.append(str(net))
    network = parse_network_list("\n".join(lines), name="r", origin="r")
    assert network.count == 2000
    for text in lines[:200]:
        net = ipaddress.ip_network(text)
        assert str(net.network_address) in network and str(net.broadcast_address) in network
    # the netmask form is read too (by ipaddress, off the fast path)
    assert "192.0.2.77" in parse_network_list("192.0.2.0/255.255.255.0", name="m", origin="m")


def test_parse_ip() -> None:
    assert parse_ip("192.0.2.1") == (4, 0xC0000201)
    assert parse_ip("::ffff:192.0.2.1") == (4, 0xC0000201)
    assert parse_ip("2001:db8::1") == (6, 0x20010DB8 << 96 | 1)
    assert parse_ip("fe80::1%eth0") == (6, 0xFE80 << 112 | 1)
    for junk in ("", None, "192.0.2", "192.0.2.256", "host.example", "2001:db8::g"):
        assert parse_ip(junk) is None, junk


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("10.0.0.300/8", "'10.0.0.300/8' is not a CIDR network"),
        ("192.0.2.1/24", "has host bits set"),
        ("example.com", "'example.com' is not a CIDR network"),
        ("2001:db8::/129", "'2001:db8::/129' is not a CIDR network"),
    ],
)
def test_a_bad_line_is_a_clear_error_naming_the_line(line: str, complaint: str) -> None:
    with pytest.raises(NetworkListError) as raised:
        parse_network_list(f"# source: x\n192.0.2.0/24\n{line}\n", name="x", origin="list.txt")
    message = str(raised.value)
    assert message.startswith("list.txt:3: ") and complaint in message


def test_an_imported_list_overrides_the_packaged_one(tmp_path: Path) -> None:
    source = tmp_path / "egress-ip-ranges.csv"
    source.write_text("198.51.100.0/24,US,US-CA,San Jose,\n2001:db8:7::/48,US,US-CA,San Jose,\n")
    imported = import_network_list(tmp_path / "data", "apple-mpp", source)
    target = tmp_path / "data" / "networks" / "apple-mpp.txt"
    assert imported.origin == str(target) and imported.count == 2
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    lines = target.read_text().splitlines()
    assert lines[0] == "# name: apple-mpp" and lines[-2:] == ["198.51.100.0/24", "2001:db8:7::/48"]
    assert any(line.startswith("# imported: ") for line in lines)
    lists = load_networks(tmp_path / "data")
    assert lists["apple-mpp"].count == 2 and "198.51.100.7" in lists["apple-mpp"]
    assert "172.224.226.33" not in lists["apple-mpp"]  # the packaged sample is replaced
    assert lists["google"].origin == "packaged"
    classifier = Classifier(lists)
    assert classifier(event(APPLE_MPP, ELSEWHERE))[:2] == ("privacy_proxy", "net:apple-mpp")


def test_import_reads_googles_json(tmp_path: Path) -> None:
    source = tmp_path / "goog.json"
    source.write_text(
        '{"syncToken": "1", "creationTime": "2024-04-25T07:05:03.68994", "prefixes": '
        '[{"ipv4Prefix": "8.8.4.0/24"}, {"ipv6Prefix": "2001:4860::/32"}]}'
    )
    imported = import_network_list(tmp_path, "google", source)
    assert imported.count == 2 and imported.date == "2024-04-25T07:05:03.68994"
    assert "8.8.4.4" in imported and "2001:4860::8888" in imported


def test_a_failed_import_leaves_the_previous_list_and_no_temporary_file(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("192.0.2.0/24\n")
    import_network_list(tmp_path, "mimecast", good)
    target = tmp_path / "networks" / "mimecast.txt"
    before = target.read_bytes()
    bad = tmp_path / "bad.txt"
    bad.write_text("192.0.2.0/24\nnot-a-network\n")
    with pytest.raises(NetworkListError, match=r"bad\.txt:2: 'not-a-network'"):
        import_network_list(tmp_path, "mimecast", bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(NetworkListError, match="no network"):
        import_network_list(tmp_path, "mimecast", empty)
    with pytest.raises(NetworkListError, match="unknown network list 'mimecats'"):
        import_network_list(tmp_path, "mimecats", good)
    assert target.read_bytes() == before
    assert os.listdir(target.parent) == ["mimecast.txt"]


def test_networks_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "data"
    source = tmp_path / "ranges.txt"
    source.write_text("# source: Example Corp\n# date: 2024-05-01\n192.0.2.0/24\n198.51.100.0/24\n")
    assert main(["networks", "import", "barracuda", str(source), "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "barracuda: 2 networks written to" in out
    assert main(["networks", "list", "--data-dir", str(data_dir)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(packaged_names())
    assert "2 networks  date 2024-05-01  imported: " in lines["barracuda"]
    assert "source: Example Corp" in lines["barracuda"]
    assert "packaged (partial)" in lines["apple-mpp"] and "date unknown" in lines["apple-mpp"]


def test_a_bad_import_is_one_line_and_exit_1(tmp_path: Path) -> None:
    source = tmp_path / "ranges.txt"
    source.write_text("192.0.2.0/24\n300.1.2.3/32\n")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "smtp_tracker", "networks", "import", "google"),
            *(str(source), "--data-dir", str(tmp_path / "data")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"smtp-tracker: error: {source}:2: '300.1.2.3/32' is not")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "networks" / "google.txt").exists()


# -- end to end: a pixel fetch through the real endpoint, stored with its verdict ------------


async def test_a_google_image_proxy_fetch_is_stored_as_mail_proxy_and_shown(
    tmp_path: Path,
    server_ssl_context: ssl.SSLContext,
    client_ssl_context: ssl.SSLContext,
    capsys: pytest.CaptureFixture[str],
) -> None:
    classifier = Classifier(load_networks(), prefetch_window_s=30)
    async with await SqliteStore.open(tmp_path / "data", classifier=classifier) as store:
        relayed = datetime.now(UTC) - timedelta(hours=1)
        await store.record_message(make_record(1, relayed_at=relayed, received_at=relayed))
        await store.record_message(make_record(2, relayed_at=relayed, received_at=relayed))
        app = make_pixel_app(store=store)
        runner, port = await start_site(
            app, host="127.0.0.1", port=0, ssl_context=server_ssl_context
        )
        try:
            connector = aiohttp.TCPConnector(ssl=client_ssl_context)
            async with aiohttp.ClientSession(connector=connector) as session:
                for number, user_agent in ((1, GOOGLE_PROXY), (2, "curl/8.1.2")):
                    url = f"https://localhost:{port}/o/{token(number)}.gif"
                    async with session.get(url, headers={"User-Agent": user_agent}) as response:
                        assert response.status == 200 and len(await response.read()) == 43

            async def both_recorded() -> bool:
                found = [await store.find_message(token(n)) for n in (1, 2)]
                return all(m is not None and len(m.opens) == 1 for m in found)

            await wait_until(both_recorded, timeout_s=10, message="the opens were not recorded")
        finally:
            await runner.cleanup()
        proxied = await store.find_message(token(1))
        scripted = await store.find_message(token(2))
    assert proxied is not None and scripted is not None
    [open_1] = proxied.opens
    [open_2] = scripted.opens
    assert (open_1.verdict, open_1.verdict_reason) == ("mail_proxy", "ua:GoogleImageProxy")
    assert (open_2.verdict, open_2.verdict_reason) == ("scanner", "ua:http-library")
    capsys.readouterr()
    assert main(["show", token(1), "--data-dir", str(tmp_path / "data")]) == 0
    [opened] = [line for line in capsys.readouterr().out.splitlines() if "opened" in line]
    assert f"mail_proxy (ua:GoogleImageProxy)  {GOOGLE_PROXY}" in opened


def test_the_user_agent_cache_changes_no_verdict() -> None:
    """One classifier judging the table twice, in both orders, agrees with a fresh one per case."""
    shared = Classifier(load_networks(), prefetch_window_s=30)
    for cases in (CASES, CASES[::-1]):
        for user_agent, address, kind, verdict, reason in cases:
            assert shared(event(user_agent, address, kind=kind))[:2] == (verdict, reason)
            # the same User-Agent soon after the relay: the timing rule still applies
            fresh = Classifier(load_networks(), prefetch_window_s=30)
            early = event(user_agent, address, kind=kind, after_s=1)
            assert shared(early) == fresh(early)


def test_the_user_agent_cache_is_bounded(classifier: Classifier) -> None:
    for i in range(5000):
        classifier(event(f"Agent/{i}", ELSEWHERE))
    assert len(classifier._agent_cache) == 4096
