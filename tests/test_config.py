"""Configuration: TOML keys, flags over keys, secrets, every problem reported at once."""

import dataclasses
import ipaddress
import math
import tomllib
from pathlib import Path

import pytest

from smtp_tracker.config import MAX_SECONDS, PASSWORD_ENV, Config, HostPort, build_config, load_toml
from smtp_tracker.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_flags_override_file_values() -> None:
    config = build_config(
        {"upstream": "smtp.example.net:587", "upstream_tls": "implicit", "max_message_bytes": 10},
        {"upstream_tls": "none", "max_message_bytes": None},
        environ={},
    )
    assert config.upstream == (HostPort("smtp.example.net", 587),)
    assert config.upstream_tls == "none"
    assert config.max_message_bytes == 10


def test_defaults_are_safe() -> None:
    config = build_config({}, {}, environ={})
    assert config.listen == HostPort("127.0.0.1", 10025)
    assert config.allowed_clients == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.upstream_tls == "starttls" and not config.insecure_skip_verify
    assert config.capture == "off"


def test_every_problem_is_reported_in_one_error() -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(
            {"upstream_tls": "tls1.0", "bogus_key": 1, "allowed_clients": ["10.0.0.0/33"]},
            {"listen": "no-port", "client_timeout_s": "-1"},
            environ={},
            require_upstream=True,
        )
    problems = caught.value.problems
    assert len(problems) == 6, problems
    assert any(p.startswith("upstream_tls: expected one of starttls") for p in problems)
    assert any("unknown key 'bogus_key'" in p for p in problems)
    assert any("allowed_clients: '10.0.0.0/33'" in p for p in problems)
    assert any(p.startswith("listen: expected HOST:PORT") for p in problems)
    assert any(p.startswith("client_timeout_s: must be a positive") for p in problems)
    assert any(p.startswith("no upstream") for p in problems)


def test_password_comes_from_environment_or_file_never_logged(tmp_path: Path) -> None:
    config = build_config({"upstream_user": "u"}, {}, environ={PASSWORD_ENV: "s3cret"})
    assert config.upstream_password == "s3cret"
    assert "s3cret" not in repr(config)

    secret = tmp_path / "password"
    secret.write_text("from-file\n")
    secret.chmod(0o644)
    warnings: list[str] = []
    config = build_config(
        {"upstream_user": "u", "upstream_password_file": str(secret)},
        {},
        environ={PASSWORD_ENV: "ignored"},
        warnings=warnings,
    )
    assert config.upstream_password == "from-file"
    assert warnings == [
        f"upstream_password_file: {secret} is readable by group or others; run: chmod 600 {secret}"
    ]
    secret.chmod(0o600)
    warnings.clear()
    build_config(
        {"upstream_user": "u", "upstream_password_file": str(secret)},
        {},
        environ={},
        warnings=warnings,
    )
    assert warnings == []


def test_auth_without_password_or_without_tls_is_refused() -> None:
    with pytest.raises(ConfigError, match="no password"):
        build_config({"upstream_user": "u"}, {}, environ={})
    with pytest.raises(ConfigError, match="AUTH is never sent in plaintext"):
        build_config(
            {"upstream_user": "u", "upstream_tls": "none"}, {}, environ={PASSWORD_ENV: "p"}
        )


def test_every_key_has_its_help_in_its_field() -> None:
    """Each key's help is written once, in its Config field (flags, file and docs use it)."""
    for spec in dataclasses.fields(Config):
        text = spec.metadata.get("help")
        assert isinstance(text, str) and text.strip(), f"Config.{spec.name} has no help"
        assert "(default" not in text, f"Config.{spec.name}: the default is added by the tools"


def test_example_config_is_generated_from_the_fields() -> None:
    from smtp_tracker.cli.flags import example_toml

    text = (REPO / "conf" / "smtp-tracker.toml").read_text()
    assert text == example_toml(), (
        "conf/smtp-tracker.toml is out of date: "
        "python -c 'from smtp_tracker.cli import flags; print(flags.example_toml(), end=\"\")' "
        "> conf/smtp-tracker.toml"
    )


def test_example_config_lists_every_key_with_its_default() -> None:
    text = (REPO / "conf" / "smtp-tracker.toml").read_text()
    uncommented = "\n".join(
        line[2:] for line in text.splitlines() if line.startswith("# ") and " = " in line
    )
    values = tomllib.loads(uncommented)
    example_only = {
        "hostname",
        "upstream",
        "tls_cert",
        "tls_key",
        "upstream_ca_file",
        "upstream_user",
        "upstream_password_file",
        "pixel_base_url",
        "reports_token_file",
        "reports_users_file",
        "disclosure_footer_file",
        "disclosure_header",
        "dkim_key_table",
        "dkim_signing_table",
        "events_log",
        "optout_page_template",
        "store",
        "store_password_file",
    }
    defaults = Config(hostname="example")
    for spec in dataclasses.fields(Config):
        if spec.name == "upstream_password":
            assert spec.name not in values
            continue
        assert spec.name in values, f"conf/smtp-tracker.toml lacks {spec.name}"
        if spec.name in example_only:
            continue
        parsed = build_config({spec.name: values[spec.name]}, {}, environ={})
        assert getattr(parsed, spec.name) == getattr(defaults, spec.name), spec.name


#: Every number-of-seconds (or hours) key, read from Config: a new one is covered without a
#: change here.
FLOAT_KEYS = [spec.name for spec in dataclasses.fields(Config) if spec.type == "float"]


def unit(name: str) -> str:
    """The unit a float key's errors name: its suffix says (``_s`` seconds, ``_hours`` hours)."""
    return "hours" if name.endswith("_hours") else "seconds"


def most(name: str) -> int:
    """Ten years in the key's unit."""
    return MAX_SECONDS // 3600 if unit(name) == "hours" else MAX_SECONDS


def test_float_keys_are_found() -> None:
    assert "client_timeout_s" in FLOAT_KEYS and "reports_session_s" in FLOAT_KEYS
    # every float key is a duration in seconds or in hours, and its errors say which
    assert {name for name in FLOAT_KEYS if not name.endswith("_s")} == {"webhook_retry_hours"}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("soon", "webhook_retry_hours: expected a number of hours, got 'soon'"),
        ("nan", "webhook_retry_hours: expected a finite number of hours, got 'nan'"),
        ("87601", "webhook_retry_hours: at most 87600 hours (ten years), got '87601'"),
        ("0", "webhook_retry_hours: must be a positive number of hours"),
    ],
)
def test_webhook_retry_hours_errors_say_hours(value: str, problem: str) -> None:
    """It reused the seconds keys' messages ("expected a number of seconds")."""
    with pytest.raises(ConfigError) as caught:
        build_config({}, {"webhook_retry_hours": value}, environ={})
    assert caught.value.problems == (problem,)
    with pytest.raises(ConfigError, match=r"^webhook_retry_hours: expected a number of hours$"):
        build_config({"webhook_retry_hours": [24]}, {}, environ={})
    assert build_config({}, {"webhook_retry_hours": "87600"}, environ={}).webhook_retry_hours == (
        87600.0
    )


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "+inf"])
@pytest.mark.parametrize("name", FLOAT_KEYS)
def test_non_finite_numbers_are_refused_for_every_float_key(name: str, text: str) -> None:
    """``client_timeout_s = nan`` turned the idle timeout off; ``reports_session_s = inf``
    made every login a 500 (issue 12, item 7)."""
    from_file = tomllib.loads(f"{name} = {text}")[name]
    assert not math.isfinite(from_file)
    with pytest.raises(ConfigError) as caught:
        build_config({name: from_file}, {}, environ={})
    assert caught.value.problems == (
        f"{name}: expected a finite number of {unit(name)}, got {text.lstrip('+')}",
    )
    with pytest.raises(ConfigError) as caught:
        build_config({}, {name: text}, environ={})
    assert caught.value.problems == (
        f"{name}: expected a finite number of {unit(name)}, got {text!r}",
    )


@pytest.mark.parametrize("name", FLOAT_KEYS)
def test_durations_beyond_ten_years_are_refused(name: str) -> None:
    assert build_config({name: most(name)}, {}, environ={}).__getattribute__(name) == most(name)
    with pytest.raises(ConfigError, match=f"^{name}: at most {most(name)} {unit(name)}"):
        build_config({name: 1e300}, {}, environ={})


@pytest.mark.parametrize("value", [[], ["", " "], ","])
def test_an_empty_client_list_is_refused(value: object) -> None:
    """Every client would get 554 5.7.1: refused, saying what to write instead."""
    with pytest.raises(ConfigError) as caught:
        build_config({"allowed_clients": value}, {}, environ={})
    (problem,) = caught.value.problems
    assert problem.startswith("allowed_clients: empty, so every client would be refused")
    assert 'allowed_clients = ["127.0.0.0/8", "::1/128"]' in problem
    assert build_config({}, {"allowed_clients": "10.0.0.0/8"}, environ={}).allowed_clients == (
        ipaddress.ip_network("10.0.0.0/8"),
    )


def test_a_file_that_is_not_utf8_names_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('upstream = "mx:25"\n# caf\u00e9\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_toml(path)
    assert caught.value.problems == (
        f"{path}: not UTF-8: byte 0xe9 at line 2, column 6 (offset 24); "
        "a TOML file must be saved as UTF-8",
    )
