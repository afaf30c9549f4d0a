"""The smtp-tracker command: one clear line per problem, an exit status, no traceback."""

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from smtp_tracker.config import Config
from tests.support.process import run_cli

REPO = Path(__file__).resolve().parents[2]


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


def test_a_config_file_that_is_not_utf8_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A Latin-1 'é' in a comment was a UnicodeDecodeError traceback, exit 1 (issue 12, 6)."""
    config = tmp_path / "latin1.toml"
    config.write_bytes(b'# caf\xe9 au lait\nupstream = "smtp.example.net:587"\n')
    line = (
        f"smtp-tracker: error: {config}: not UTF-8: byte 0xe9 at line 1, column 6 (offset 5); "
        "a TOML file must be saved as UTF-8\n"
    )
    for command in ("check-config", "serve", "stats"):
        result = run_cli(command, "--config", str(config), "--data-dir", str(tmp_path / "data"))
        assert (result.returncode, result.stderr) == (2, line), command
    assert not (tmp_path / "data").exists()


def test_non_finite_durations_are_one_line_each_and_exit_2(tmp_path: Path) -> None:
    """Every float key at once, from the file; and one from a flag (issue 12, item 7)."""
    names = [spec.name for spec in dataclasses.fields(Config) if spec.type == "float"]
    config = tmp_path / "nan.toml"
    values = ("nan", "inf", "-inf")
    config.write_text(
        "".join(f"{name} = {values[i % 3]}\n" for i, name in enumerate(names)), encoding="utf-8"
    )
    result = run_cli("check-config", "--config", str(config), "--upstream", "mx.example:25")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"smtp-tracker: error: {name}: expected a finite number of "
        f"{'hours' if name.endswith('_hours') else 'seconds'}, got {values[i % 3]}"
        for i, name in enumerate(names)
    ]
    flag = run_cli("check-config", "--upstream", "mx.example:25", "--reports-session-s", "inf")
    assert flag.returncode == 2
    assert flag.stderr == (
        "smtp-tracker: error: reports_session_s: expected a finite number of seconds, got 'inf'\n"
    )


def test_an_empty_client_list_is_refused_with_what_to_write(tmp_path: Path) -> None:
    config = tmp_path / "nobody.toml"
    config.write_text('upstream = "mx.example:25"\nallowed_clients = []\n', encoding="utf-8")
    for result in (
        run_cli("check-config", "--config", str(config)),
        run_cli("check-config", "--upstream", "mx.example:25", "--allowed-clients", ","),
    ):
        assert result.returncode == 2
        assert result.stderr == (
            "smtp-tracker: error: allowed_clients: empty, so every client would be refused "
            "(554 5.7.1); list the networks Postfix connects from, e.g. allowed_clients = "
            '["127.0.0.0/8", "::1/128"] (the default, also had by leaving the key out)\n'
        )


def test_flags_are_never_abbreviated() -> None:
    """``--store`` was silently taken as ``--store-subject`` (argparse's allow_abbrev);
    now that ``--store`` is a key, ``--store-password`` must not be ``--store-password-file``."""
    result = run_cli("check-config", "--upstream", "mx.example:25", "--store-password", "x")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "smtp-tracker: error: unrecognized arguments: --store-password x"
    )
    assert run_cli("check-config", "--upstream", "mx.example:25", "--store-subject").returncode == 0


def test_every_parser_refuses_abbreviations() -> None:
    from smtp_tracker.cli import _parser

    parsers = [_parser()]
    seen = 0
    while parsers:
        parser = parsers.pop()
        assert parser.allow_abbrev is False, parser.prog
        seen += 1
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    assert seen >= 19  # the program, 13 commands, 2 networks and 3 user actions


@pytest.mark.parametrize("command", ["stats", "messages", "show"])
def test_read_only_commands_list_no_smtp_or_tls_flag(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0
    listed = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.stdout))
    keys = {"--" + spec.name.replace("_", "-") for spec in dataclasses.fields(Config)}
    assert listed & keys == {"--data-dir", "--store", "--store-password-file"}, sorted(
        listed & keys
    )
    assert "--config" in listed
    for flag in ("--tls-cert", "--upstream", "--listen", "--allowed-clients", "--no-pixel"):
        assert flag not in listed


def test_version_is_the_package_version() -> None:
    import importlib.metadata
    import tomllib

    from smtp_tracker import __version__

    result = run_cli("--version")
    assert (result.returncode, result.stdout) == (0, f"smtp-tracker {__version__}\n")
    assert importlib.metadata.version("smtp-tracker") == __version__
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "smtp_tracker.__version__"
    }
