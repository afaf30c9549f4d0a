"""Configuration: TOML keys, flags over keys, secrets, every problem reported at once."""

import dataclasses
import ipaddress
import tomllib
from pathlib import Path

import pytest

from smtp_tracker.config import PASSWORD_ENV, Config, HostPort, build_config
from smtp_tracker.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_flags_override_file_values() -> None:
    config = build_config(
        {"upstream": "smtp.example.net:587", "upstream_tls": "implicit", "max_message_bytes": 10},
        {"upstream_tls": "none", "max_message_bytes": None},
        environ={},
    )
    assert config.upstream == HostPort("smtp.example.net", 587)
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
        "python -m smtp_tracker.cli.flags toml > conf/smtp-tracker.toml"
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
