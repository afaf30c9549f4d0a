"""check-config with DKIM keys: each key reported; each bad table line or key file is
one line naming it, exit 2, no traceback; flags --dkim-key-table, --dkim-signing-table."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtp_tracker.cli import main
from tests.support.process import run_cli


def check(capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str, str]:
    status = main(["check-config", "--upstream", "127.0.0.1:2525", *flags])
    out, err = capsys.readouterr()
    return status, out, err


def test_each_key_is_reported(key_table: Path) -> None:
    signing = key_table.parent / "SigningTable"
    signing.write_text("*@example.com rsa\n*@*.example.com ed\n")
    result = run_cli(
        "check-config",
        "--upstream",
        "127.0.0.1:2525",
        "--dkim-policy",
        "resign",
        "--dkim-key-table",
        str(key_table),
        "--dkim-signing-table",
        f"refile:{signing}",
    )
    assert result.returncode == 0, result.stderr
    keys = key_table.parent / "keys"
    assert (
        f"DKIM key example.com:sel rsa-sha256 2048 bits ({keys / 'sel.private'})" in result.stdout
    )
    assert (
        f"DKIM key example.com:ed ed25519-sha256 256 bits ({keys / 'ed.private'})" in result.stdout
    )
    assert "BEGIN" not in result.stdout + result.stderr


def test_resign_needs_a_key_table(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = check(capsys, "--dkim-policy", "resign")
    assert status == 2
    assert err == (
        "smtp-tracker: error: dkim_policy = resign needs dkim_key_table: "
        "the OpenDKIM KeyTable with the keys\n"
    )


@pytest.mark.parametrize(
    ("table_line", "key_bytes", "problem"),
    [
        ("k example.com:sel:{key}", b"not a key", "{key}: not a private key"),
        (
            "k example.com:sel:/nonexistent/k.pem",
            b"",
            "/nonexistent/k.pem: cannot read the key file",
        ),
        ("k example.com sel {key}", b"", "expected 'keyname domain:selector:keyfile'"),
        ("k %:sel:{key}", b"", "a '%' domain"),
    ],
    ids=["key-does-not-parse", "key-missing", "line-does-not-parse", "percent-domain"],
)
def test_a_bad_key_table_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    table_line: str,
    key_bytes: bytes,
    problem: str,
) -> None:
    key = tmp_path / "k.pem"
    key.write_bytes(key_bytes)
    table = tmp_path / "KeyTable"
    table.write_text("# keys\n" + table_line.format(key=key) + "\n")
    status, out, err = check(capsys, "--dkim-key-table", str(table))
    assert status == 2
    lines = err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"smtp-tracker: error: {table}:2: ")
    assert problem.format(key=key) in lines[0]
    assert "Traceback" not in err and out == ""


def test_a_bad_signing_table_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], key_table: Path
) -> None:
    signing = key_table.parent / "SigningTable"
    signing.write_text("*@example.com rsa\n*@example.org nokey\n")
    status, _, err = check(
        capsys, "--dkim-key-table", str(key_table), "--dkim-signing-table", str(signing)
    )
    assert status == 2
    assert err == (f"smtp-tracker: error: {signing}:2: key name 'nokey' is not in the KeyTable\n")


def test_a_key_readable_by_others_is_a_warning(
    capsys: pytest.CaptureFixture[str], key_table: Path
) -> None:
    key = key_table.parent / "keys" / "ed.private"
    key.chmod(0o604)
    status, out, err = check(capsys, "--dkim-key-table", str(key_table))
    assert status == 0
    assert err == (
        f"smtp-tracker: warning: {key}: the private key is readable by others; "
        f"run: chmod o-rwx {key}\n"
    )
    assert "DKIM key example.com:ed ed25519-sha256 256 bits" in out


def test_a_signing_table_needs_a_key_table(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, _, err = check(capsys, "--dkim-signing-table", str(tmp_path / "SigningTable"))
    assert status == 2
    assert err == (
        "smtp-tracker: error: dkim_signing_table needs dkim_key_table: "
        "the KeyTable its key names refer to\n"
    )
