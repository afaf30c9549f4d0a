"""The click-tracking keys: parsed from TOML and flags, validated, handed to the rewrite."""

from __future__ import annotations

import tomllib

import pytest

from smtp_tracker.app import rewrite_policy
from smtp_tracker.config import build_config
from smtp_tracker.errors import ConfigError


def test_defaults_keep_click_tracking_off() -> None:
    config = build_config({}, {}, environ={})
    assert (config.track_clicks, config.track_text_links) == (False, False)
    assert config.click_notrack_attribute == "data-notrack"
    assert any("unsubscri" in p for p in config.click_exclude_patterns)


def test_toml_values_reach_the_rewrite_policy() -> None:
    values = tomllib.loads(
        "track_clicks = true\n"
        "track_text_links = true\n"
        "click_exclude_patterns = ['^https://intranet\\.', 'utm_[a-z]{2,8}=secret']\n"
        'click_notrack_attribute = "data-skip"\n'
    )
    policy = rewrite_policy(build_config(values, {}, environ={}))
    assert (policy.track_clicks, policy.track_text_links) == (True, True)
    assert policy.click_exclude_patterns == (r"^https://intranet\.", r"utm_[a-z]{2,8}=secret")
    assert policy.click_notrack_attribute == "data-skip"


def test_flags_override_and_split_at_commas() -> None:
    config = build_config(
        {"track_clicks": False},
        {"track_clicks": True, "click_exclude_patterns": "logout, /account/"},
        environ={},
    )
    assert config.track_clicks is True
    assert config.click_exclude_patterns == ("logout", "/account/")


def test_bad_patterns_and_attribute_names_are_reported_together() -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(
            {"click_exclude_patterns": ["ok", "(unclosed"], "click_notrack_attribute": "no tag"},
            {},
            environ={},
        )
    problems = caught.value.problems
    assert any(p.startswith("click_exclude_patterns: '(unclosed'") for p in problems), problems
    assert any(p.startswith("click_notrack_attribute: 'no tag'") for p in problems), problems


@pytest.mark.parametrize("value", [True, 3, ["a", 1]])
def test_patterns_must_be_a_list_of_strings(value: object) -> None:
    with pytest.raises(ConfigError, match="click_exclude_patterns"):
        build_config({"click_exclude_patterns": value}, {}, environ={})
