"""Flags and the configuration reference are generated from Config's fields."""

from __future__ import annotations

import dataclasses

from smtp_tracker.cli.flags import ALL_KEYS, help_of, reference_markdown
from smtp_tracker.config import Config


def test_reference_has_one_row_per_key_with_its_flag_and_help() -> None:
    text = reference_markdown()
    rows = {
        line.split("|")[1].strip(" `"): line for line in text.splitlines() if line.startswith("| `")
    }
    assert set(rows) == set(ALL_KEYS)
    for name in ALL_KEYS:
        row = rows[name]
        assert f"`--{name.replace('_', '-')}`" in row, row
        assert help_of(name).replace("|", "\\|") in row, row
    assert "upstream_password`" not in text.replace("upstream_password_file", "")
    assert "SMTP_TRACKER_UPSTREAM_PASSWORD" in text


def test_reference_gives_units_and_defaults() -> None:
    lines = reference_markdown().splitlines()
    rows = {line.split("|")[1].strip(" `"): line for line in lines if line.startswith("| `")}
    assert "| number, seconds | `300.0` |" in rows["client_timeout_s"]
    assert "| integer, bytes | `52428800` |" in rows["max_message_bytes"]
    assert "| this host's FQDN |" in rows["hostname"]
    assert "`--tracking` / `--no-tracking`" in rows["tracking"]
    assert "one of `starttls`, `implicit`, `none`" in rows["upstream_tls"]


def test_every_field_but_the_password_is_a_key() -> None:
    names = [spec.name for spec in dataclasses.fields(Config)]
    assert [name for name in names if name not in ALL_KEYS] == ["upstream_password"]
