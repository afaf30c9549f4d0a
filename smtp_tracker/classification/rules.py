"""The classification rules: one ordered table of signals; the first that holds decides.

Each :class:`Rule` is a row: its name (the ``reason`` stored with the event,
``"ua:GoogleImageProxy"``), the verdict, and a predicate made of conditions
that must ALL hold:

* ``user_agent``: a regular expression searched in the User-Agent header;
* ``no_user_agent``: the request had no (or a blank) User-Agent;
* ``network``: the client address is in the named network list
  (:mod:`.networks`, ``data/NAME.txt``);
* ``within_prefetch_window``: the event came less than ``prefetch_window_s``
  seconds after the message was relayed;
* ``kinds``: the event kinds the rule applies to (``open``, ``click``).

Every rule that holds for an event is a *signal*; the classifier stores them
all with the event (:class:`~.classifier.Signals`: the rule names that held,
the seconds since the relay, the network lists the address is in), and the
verdict is that of the first signal in table order, so it can be recomputed
from the stored signals, and again by ``smtp-tracker reclassify`` when the
table or the lists change.  The order is the policy (issue 19): what
identifies the client outranks the time since the relay.  A security
gateway's network, a script, a headless browser, a known prefetcher, Apple's
proxy, a provider's image proxy (which fetches only when its user opens the
message), a crawler and a mail client all decide before the timing rule,
however soon after the relay they come; the timing window downgrades only
what nothing else identifies: a generic browser User-Agent, an unknown one,
or none.

Adding a rule is adding a row to :data:`RULES` (and a case to
``tests/classification/test_rules.py``); ``source`` says where the pattern
comes from.  Events no rule matches get ``("unknown", "no-rule")``.

Verdicts (:data:`~smtp_tracker.store.records.Verdict`): ``human`` a person's
mail client or browser; ``privacy_proxy`` a fetch made when mail is
downloaded, which says nothing of reading (Apple MPP); ``mail_proxy`` a
provider's image proxy fetching for a reader who opened the message
(GoogleImageProxy, YahooMailProxy); ``scanner`` security gateways, link
checkers, crawlers, scripts, and unidentified fetches within the prefetch
window; ``unknown`` no User-Agent at all, or nothing recognisable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from smtp_tracker.store.records import EventKind, Verdict

__all__ = ["BARE_MOZILLA", "NO_MATCH", "PREFETCH_WINDOW_PLACEHOLDER", "RULES", "Rule"]

#: The reason given when no rule matches (verdict ``unknown``).
NO_MATCH: Final = "no-rule"
#: In a rule's name, replaced by the configured window (``"timing:<30s after relay"``).
PREFETCH_WINDOW_PLACEHOLDER: Final = "{prefetch_window_s}"

_BOTH: Final[frozenset[EventKind]] = frozenset({"open", "click"})
_OPEN: Final[frozenset[EventKind]] = frozenset({"open"})
_CLICK: Final[frozenset[EventKind]] = frozenset({"click"})

#: Apple MPP's User-Agent: exactly ``Mozilla/5.0`` and nothing else.
BARE_MOZILLA: Final = re.compile(r"\AMozilla/5\.0\Z")


@dataclass(frozen=True, kw_only=True, slots=True)
class Rule:
    """One row of the table: a named predicate and the verdict it gives.

    :param name: the reason stored with the event; ``kind:what``, e.g.
        ``ua:GoogleImageProxy``, ``net:apple-mpp``; may hold
        :data:`PREFETCH_WINDOW_PLACEHOLDER`.
    :param verdict: what a matching event is.
    :param source: where the pattern comes from (a URL, a document, an observation).
    :param user_agent: pattern searched (``re.search``) in the User-Agent; a
        request without one never matches it.
    :param no_user_agent: match only requests without a User-Agent.
    :param network: name of a network list the client address must be in.
    :param within_prefetch_window: match only events less than
        ``prefetch_window_s`` seconds after the relay (earlier ones, from clock
        skew, count as within).
    :param kinds: which events the rule applies to.
    """

    name: str
    verdict: Verdict
    source: str
    user_agent: re.Pattern[str] | None = None
    no_user_agent: bool = False
    network: str | None = None
    within_prefetch_window: bool = False
    kinds: frozenset[EventKind] = _BOTH


_SCANNER_NETWORK_SOURCE = (
    "the list's own header (data/{0}.txt): a security gateway's data centre never reads mail; "
    "its fetches are scans (for gateways that prefetch images and follow links at delivery, "
    "see e.g. https://support.metacompliance.com/hc/en-gb/articles/13056444972817)"
)

#: The rules, in order: the first that matches decides.
RULES: Final[tuple[Rule, ...]] = (
    # -- security gateways, by network: whatever User-Agent they claim ----------
    Rule(
        name="net:microsoft-eop",
        verdict="scanner",
        network="microsoft-eop",
        source=_SCANNER_NETWORK_SOURCE.format("microsoft-eop"),
    ),
    Rule(
        name="net:mimecast",
        verdict="scanner",
        network="mimecast",
        source=_SCANNER_NETWORK_SOURCE.format("mimecast"),
    ),
    Rule(
        name="net:barracuda",
        verdict="scanner",
        network="barracuda",
        source=_SCANNER_NETWORK_SOURCE.format("barracuda"),
    ),
    # -- scripts, libraries, headless browsers: never a reader ----------------------
    Rule(
        name="ua:http-library",
        verdict="scanner",
        user_agent=re.compile(
            r"(?i)(?:\A|[\s;(])(?:curl|wget|python-requests|python-urllib|python-httpx"
            r"|aiohttp|go-http-client|okhttp|apache-httpclient|libwww-perl|lwp-trivial"
            r"|axios|node-fetch|undici|httpie|pycurl|java|ruby|guzzlehttp)/"
        ),
        source="tool defaults (curl/8.1.2, Wget/1.21, python-requests/2.31.0, ...); seen "
        "fetching tracking pixels: Braze, 'Bot filtering' (python-requests/2.32.3), GMass "
        "'false opens' list (okhttp/4.10.0, Java/17.0.2, Python/3.9 aiohttp/3.8.1)",
    ),
    Rule(
        name="ua:headless",
        verdict="scanner",
        user_agent=re.compile(r"HeadlessChrome|PhantomJS|SlimerJS|Puppeteer|Playwright"),
        source="headless browser defaults (Chrome headless sends 'HeadlessChrome/<version>'), "
        "used by link checkers and sandboxes that render mail",
    ),
    Rule(
        name="ua:security-gateway",
        verdict="scanner",
        user_agent=re.compile(
            r"(?i)barracuda|proofpoint|mimecast|messagelabs|symantec|trend ?micro|\bTMES\b"
            r"|fortimail|forcepoint|ironport|cisco ?secure ?email|sophos|safelinks"
        ),
        source="Braze docs, bot filtering ('Barracuda Sentinel (EE)'); 'Bot clicks from "
        "security scanners: a field guide' (check.live-direct-marketing.online): Barracuda, "
        "Proofpoint, Mimecast, Cisco Secure Email, Trend Micro (TMES), FortiMail, Sophos",
    ),
    Rule(
        name="ua:prefetch-edge12",
        verdict="scanner",
        user_agent=re.compile(
            r"\AMozilla/5\.0 \(Windows NT 10\.0; Win64; x64\) AppleWebKit/537\.36 \(KHTML, "
            r"like Gecko\) Chrome/42\.0\.2311\.135 Safari/537\.36 Edge/12\.246 Mozilla/5\.0\Z"
        ),
        source="GMass, 'false opens in Gmail' (https://www.gmass.co/blog/false-opens-in-gmail/): "
        "fetched at delivery from Google addresses (e.g. 108.177.2.32 in an Amazon SES open "
        "event), before any reader; others attribute it to Outlook.com: either way a prefetch",
    ),
    # -- Apple Mail Privacy Protection -----------------------------------------------
    Rule(
        name="net:apple-mpp",
        verdict="privacy_proxy",
        user_agent=BARE_MOZILLA,
        network="apple-mpp",
        kinds=_OPEN,
        source="ua-parser/uap-core issue #509 (2021-09-27): 'Apple Mail Privacy Protection "
        "forces the following user agent: Mozilla/5.0'; from iCloud Private Relay egress "
        "addresses (data/apple-mpp.txt)",
    ),
    Rule(
        name="ua:apple-mpp",
        verdict="privacy_proxy",
        user_agent=BARE_MOZILLA,
        kinds=_OPEN,
        source="ua-parser/uap-core issue #509 (MPP's User-Agent is exactly 'Mozilla/5.0'); "
        "the packaged egress list is a sample, so the User-Agent alone decides",
    ),
    # -- providers' image proxies: they fetch when the reader opens -------------------
    Rule(
        name="ua:GoogleImageProxy",
        verdict="mail_proxy",
        user_agent=re.compile(r"GoogleImageProxy|via ggpht\.com"),
        kinds=_OPEN,
        source="browscap issue #1108 and ua-parser-js issue #494: 'Mozilla/5.0 (Windows NT 5.1; "
        "rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)', Gmail's image proxy "
        "since 2013, fetching when the message is opened",
    ),
    Rule(
        name="ua:YahooMailProxy",
        verdict="mail_proxy",
        user_agent=re.compile(r"YahooMailProxy"),
        kinds=_OPEN,
        source="ua-parser-js issue #494 and uap tests: 'YahooMailProxy; "
        "https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html'",
    ),
    Rule(
        name="ua:image-proxy-click",
        verdict="scanner",
        user_agent=re.compile(r"GoogleImageProxy|via ggpht\.com|YahooMailProxy"),
        kinds=_CLICK,
        source="image proxies fetch images only; a link followed with their User-Agent is "
        "not a reader's click",
    ),
    # -- crawlers and link previews ------------------------------------------------
    Rule(
        name="ua:crawler",
        verdict="scanner",
        user_agent=re.compile(
            r"(?i)googlebot|bingbot|bingpreview|applebot|yandex(?:bot|images)|baiduspider"
            r"|duckduckbot|slurp|facebookexternalhit|twitterbot|linkedinbot|slackbot"
            r"|discordbot|telegrambot|whatsapp/|skypeuripreview|petalbot|ahrefsbot"
            r"|semrushbot|mj12bot|\(compatible;[^)]*(?:bot|crawler|spider)\b"
        ),
        source="the crawlers' own documented User-Agents (Googlebot, bingbot, Slackbot-"
        "LinkExpanding, facebookexternalhit, ...); the '(compatible; ...bot)' form",
    ),
    # -- Google's service networks, without the image proxy's User-Agent -------------
    Rule(
        name="net:google",
        verdict="scanner",
        network="google",
        source="Gmail's image proxy identifies itself (ua:GoogleImageProxy, above); other "
        "fetches from Google's own service networks (data/google.txt) are its crawlers, Safe "
        "Browsing and prefetchers, not readers",
    ),
    # -- mail clients: a person, however soon after the relay ------------------------
    Rule(
        name="ua:mail-client",
        verdict="human",
        user_agent=re.compile(
            r"Thunderbird/|Microsoft Outlook|Microsoft Office/|\bms-office\b|Outlook-iOS/"
            r"|Outlook-Android/|Outlook-Express/|\bAirmail\b|\bSpark/|\bPostbox/|eM Client"
            r"|\bMailbird/|SeaMonkey/|\bEvolution/|\bKMail\b"
            r"|\A(?:Mozilla/5\.0 \((?:Macintosh|iPhone|iPad)[^)]*\) AppleWebKit/[\d.]+"
            r" \(KHTML, like Gecko\)(?: Mobile/\w+)?)\Z"
        ),
        source="uap-core issues #528 (Apple Mail: 'Mozilla/5.0 (Macintosh; Intel Mac OS X "
        "10_15_6) AppleWebKit/605.1.15 (KHTML, like Gecko)') and #29 (Outlook: '... Microsoft "
        "Outlook 14.0.7109; ms-office; MSOffice 14)'); express-useragent #78 (iPhone Mail); "
        "yauaa #224 (Outlook-iOS/709.2226530.prod.iphone (3.24.1)); uap-python #43 "
        "(Outlook-Express/7.0); Thunderbird's 'Thunderbird/<version>' token",
    ),
    # -- timing: what nothing above identified, fetched right after the relay ----------
    Rule(
        name=f"timing:<{PREFETCH_WINDOW_PLACEHOLDER}s after relay",
        verdict="scanner",
        within_prefetch_window=True,
        source="gateways scan at delivery, seconds after sending (MetaCompliance: 'a difference "
        "of several seconds' means a scanner; Hunto bot detection windows of 5 to 60 s); it "
        "judges only what no rule above identified (a generic browser, an unknown or missing "
        "User-Agent): a Gmail proxy or mail client fetch seconds after the relay is a reader "
        "(transactional mail is opened at once); the window is prefetch_window_s",
    ),
    # -- no User-Agent: nothing to judge by ----------------------------------------
    Rule(
        name="ua:missing",
        verdict="unknown",
        no_user_agent=True,
        source="RFC 9110 §10.1.5: a user agent SHOULD send User-Agent; every mail client "
        "and proxy we know of does, so its absence tells us nothing reliable",
    ),
    # -- browsers: a person reading webmail, once past the window -------------------
    Rule(
        name="ua:browser",
        verdict="human",
        user_agent=re.compile(
            r"\AMozilla/5\.0 \([^)]+\) .*(?:Gecko|AppleWebKit|Chrome|Firefox|Safari)/?"
        ),
        source="browsers' User-Agents (Mozilla/5.0 (platform) engine/version ...): webmail "
        "without an image proxy, read in a browser",
    ),
)
