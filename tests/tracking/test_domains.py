"""The envelope's include/exclude domain lists (smtp_tracker.tracking.domains)."""

from __future__ import annotations

import pytest

from smtp_tracker.tracking.domains import DomainPolicy, address_domain, normalise_domain


@pytest.mark.parametrize(
    ("written", "normal"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        (" example.com ", "example.com"),
        ("Bücher.Example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("[192.0.2.1]", "[192.0.2.1]"),
    ],
)
def test_domains_are_compared_in_one_form(written: str, normal: str) -> None:
    assert normalise_domain(written) == normal


@pytest.mark.parametrize(
    "bad", ["", ".", "exa mple.com", "a..b", "-bad-.example", "x" * 64 + ".com"]
)
def test_a_name_that_is_no_domain_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a domain name"):
        normalise_domain(bad)


def test_a_bad_list_entry_names_its_list() -> None:
    with pytest.raises(ValueError, match="exclude_recipient_domains: 'a b' is not a domain"):
        DomainPolicy(exclude_recipient_domains=["ok.example", "a b"])


@pytest.mark.parametrize(
    ("address", "domain"),
    [
        ("bob@Example.NET", "example.net"),
        ("<bob@example.net>", "example.net"),
        ("bob@bücher.example", "xn--bcher-kva.example"),
        ('"odd@local"@example.org', "example.org"),
        ("postmaster", ""),
        ("", ""),
        ("bob@under_score.example", "under_score.example"),  # not IDNA-valid: as written
    ],
)
def test_address_domain(address: str, domain: str) -> None:
    assert address_domain(address) == domain


def test_an_empty_policy_tracks_everything() -> None:
    policy = DomainPolicy()
    assert policy.empty
    assert policy.not_tracked_reason("a@example.org", ["b@example.net"]) is None


@pytest.mark.parametrize(
    ("sender", "reason"),
    [
        ("alice@example.org", "sender-domain-excluded"),
        ("alice@news.example.org", "sender-domain-excluded"),
        ("alice@deep.news.EXAMPLE.org", "sender-domain-excluded"),
        ("alice@EXAMPLE.ORG.", "sender-domain-excluded"),
        ("alice@badexample.org", None),  # a suffix that is not a subdomain
        ("alice@example.org.evil.test", None),
        ("alice@example.com", None),
    ],
)
def test_excluded_sender_domain_and_its_subdomains(sender: str, reason: str | None) -> None:
    policy = DomainPolicy(exclude_sender_domains=["Example.org"])
    assert policy.not_tracked_reason(sender, ["bob@example.net"]) == reason


@pytest.mark.parametrize(
    ("sender", "reason"),
    [
        ("alice@shop.example", None),
        ("alice@eu.SHOP.example", None),
        ("alice@other.example", "sender-domain-not-included"),
        ("alice@noshop.example", "sender-domain-not-included"),
        ("", "sender-domain-not-included"),
    ],
)
def test_included_sender_domains_only(sender: str, reason: str | None) -> None:
    policy = DomainPolicy(include_sender_domains=["shop.example"])
    assert policy.not_tracked_reason(sender, ["bob@example.net"]) == reason


def test_international_domains_match_in_either_form() -> None:
    by_u_label = DomainPolicy(exclude_recipient_domains=["bücher.example"])
    by_a_label = DomainPolicy(exclude_recipient_domains=["xn--bcher-kva.example"])
    for policy in (by_u_label, by_a_label):
        for rcpt in ("x@BÜCHER.example", "x@xn--bcher-kva.example", "x@mail.bücher.example"):
            assert policy.not_tracked_reason("a@shop.example", [rcpt]) == (
                "recipient-domain-excluded"
            ), (policy, rcpt)
        assert policy.not_tracked_reason("a@shop.example", ["x@bucher.example"]) is None


def test_one_excluded_recipient_stops_tracking_of_the_whole_transaction() -> None:
    policy = DomainPolicy(exclude_recipient_domains=["private.example"])
    assert policy.not_tracked_reason("a@shop.example", ["b@x.example", "c@y.example"]) is None
    assert (
        policy.not_tracked_reason(
            "a@shop.example", ["b@x.example", "c@Mail.Private.example", "d@z.example"]
        )
        == "recipient-domain-excluded"
    )


def test_every_recipient_must_be_on_the_include_list() -> None:
    policy = DomainPolicy(include_recipient_domains=["customers.example", "partner.example"])
    assert (
        policy.not_tracked_reason("a@shop.example", ["b@customers.example", "c@eu.partner.example"])
        is None
    )
    assert (
        policy.not_tracked_reason("a@shop.example", ["b@customers.example", "c@elsewhere.example"])
        == "recipient-domain-not-included"
    )
    assert (
        policy.not_tracked_reason("a@shop.example", ["b@customers.example", "postmaster"])
        == "recipient-domain-not-included"
    )


def test_exclude_wins_over_include() -> None:
    policy = DomainPolicy(
        include_sender_domains=["shop.example"],
        exclude_sender_domains=["test.shop.example"],
        include_recipient_domains=["example.net"],
        exclude_recipient_domains=["vip.example.net"],
    )
    assert policy.not_tracked_reason("a@shop.example", ["b@example.net"]) is None
    assert (
        policy.not_tracked_reason("a@test.shop.example", ["b@example.net"])
        == "sender-domain-excluded"
    )
    assert (
        policy.not_tracked_reason("a@shop.example", ["b@example.net", "c@vip.example.net"])
        == "recipient-domain-excluded"
    )


def test_the_first_rule_that_applies_names_the_reason() -> None:
    policy = DomainPolicy(
        include_sender_domains=["shop.example"],
        exclude_sender_domains=["spam.example"],
        include_recipient_domains=["example.net"],
        exclude_recipient_domains=["private.example"],
    )
    assert (
        policy.not_tracked_reason("a@spam.example", ["b@private.example"])
        == "sender-domain-excluded"
    )
    assert (
        policy.not_tracked_reason("a@other.example", ["b@private.example"])
        == "recipient-domain-excluded"
    )
    assert (
        policy.not_tracked_reason("a@other.example", ["b@elsewhere.example"])
        == "sender-domain-not-included"
    )
    assert (
        policy.not_tracked_reason("a@shop.example", ["b@elsewhere.example"])
        == "recipient-domain-not-included"
    )


# -- the configuration keys ------------------------------------------------------------------


def test_privacy_keys_from_toml_and_flags() -> None:
    from smtp_tracker.config import build_config

    config = build_config(
        {"exclude_recipient_domains": ["Bücher.example", "private.example"], "retention_days": 30},
        {"include_sender_domains": "shop.example, news.shop.example", "disclosure_header": "x"},
    )
    assert config.exclude_recipient_domains == ("Bücher.example", "private.example")
    assert config.include_sender_domains == ("shop.example", "news.shop.example")
    assert (config.retention_days, config.disclosure_header) == (30, "x")
    assert config.disclosure_header_name == "X-Tracking-Notice"
    assert build_config({}, {}).retention_days == 365


def test_bad_privacy_keys_are_one_problem_each() -> None:
    from smtp_tracker.config import build_config
    from smtp_tracker.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        build_config(
            {
                "exclude_sender_domains": ["ok.example", "not a domain"],
                "include_recipient_domains": ["-x-.example"],
                "disclosure_header": "notice\r\nBcc: someone@example.net",
                "disclosure_header_name": "X Notice",
                "retention_days": -1,
            },
            {},
        )
    problems = caught.value.problems
    assert len(problems) == 5, problems
    assert problems[0].startswith("exclude_sender_domains: 'not a domain' is not a domain name")
    assert problems[1].startswith("include_recipient_domains: '-x-.example'")
    assert problems[2] == "disclosure_header_name: 'X Notice' is not a header field name"
    assert problems[3].startswith("disclosure_header: the disclosure header value must be one")
    assert problems[4].startswith("retention_days: must be 0")
