"""The smtp-tracker command: one clear line per problem, an exit status, no traceback."""

import dataclasses
from pathlib import Path

from smtp_tracker.config import Config
from tests.support.process import run_cli


def test_bad_config_is_one_line_per_problem_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('upstream_tls = "ssl3"\nlisten = 25\n')
    result = run_cli("check-config", "--config", str(config), "--upstream", "mx:25")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "smtp-tracker: error: upstream_tls: expected one of starttls, implicit, none, got 'ssl3'",
        "smtp-tracker: error: listen: expected a string HOST:PORT",
    ]
    assert "Traceback" not in result.stderr


def test_unreadable_or_invalid_toml_is_one_line(tmp_path: Path) -> None:
    missing = run_cli("check-config", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2
    assert missing.stderr.startswith("smtp-tracker: error: ") and missing.stderr.count("\n") == 1
    broken = tmp_path / "broken.toml"
    broken.write_text("upstream = \n")
    result = run_cli("check-config", "--config", str(broken))
    assert result.returncode == 2 and "not valid TOML" in result.stderr


def test_check_config_accepts_a_good_config(tmp_path: Path) -> None:
    result = run_cli("check-config", "--upstream", "smtp.example.net:587")
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout


def test_serve_help_documents_every_key() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for spec in dataclasses.fields(Config):
        if spec.name == "upstream_password":
            assert "--upstream-password " not in result.stdout
            continue
        assert "--" + spec.name.replace("_", "-") in result.stdout, spec.name


def test_port_in_use_is_a_fatal_line_and_exit_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            "serve",
            "--upstream",
            "127.0.0.1:1",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp_path / "data"),
            "--no-tracking",
            "--no-pixel",
            "--no-reports",
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
