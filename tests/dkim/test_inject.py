"""``smtp-tracker inject --dkim-policy resign``: the rewrite and re-sign ``serve`` does, on one
message from a file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from smtp_tracker.dkim import load_keyring
from tests.dkim.test_resign import MESSAGE, sign, verify_all
from tests.support.process import run_cli

PIXEL_URL = "https://pixel.test/o/AAAAAAAAAAAAAAAAAAAAAAA.gif"


def inject(message: Path, *flags: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "smtp_tracker",
            "inject",
            "--pixel-url",
            PIXEL_URL,
            "--input",
            str(message),
            *flags,
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_resign_tracks_and_signs_again_with_the_senders_key(
    tmp_path: Path, key_table: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    message = tmp_path / "in.eml"
    message.write_bytes(sign(MESSAGE, rsa_key))
    done = inject(message, "--dkim-policy", "resign", "--dkim-key-table", str(key_table))
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode().strip() == "smtp-tracker: tracked; dkim=resigned"
    assert done.stdout.count(PIXEL_URL.encode()) == 1
    assert verify_all(done.stdout, load_keyring(key_table)) == [True]


def test_a_foreign_signature_is_left_byte_for_byte(
    tmp_path: Path, key_table: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    original = sign(MESSAGE, rsa_key, domain=b"example.net")
    message = tmp_path / "in.eml"
    message.write_bytes(original)
    done = inject(message, "--dkim-policy", "resign", "--dkim-key-table", str(key_table))
    assert done.returncode == 0, done.stderr
    assert done.stdout == original
    assert done.stderr.decode().strip() == (
        "smtp-tracker: not tracked (dkim-foreign); dkim=dkim-foreign"
    )


def test_resign_without_a_key_table_is_one_line_and_exit_2(tmp_path: Path) -> None:
    message = tmp_path / "in.eml"
    message.write_bytes(MESSAGE)
    done = run_cli(
        "inject", "--pixel-url", PIXEL_URL, "--input", str(message), "--dkim-policy", "resign"
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "smtp-tracker: error: --dkim-policy resign needs --dkim-key-table"
    ]
    missing = run_cli(
        "inject",
        "--pixel-url",
        PIXEL_URL,
        "--input",
        str(message),
        "--dkim-policy",
        "resign",
        "--dkim-key-table",
        str(tmp_path / "nope"),
    )
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1 and "nope" in missing.stderr
