"""The dashboard's users file and ``smtp-tracker user add|remove|list`` as a real process."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from smtp_tracker.errors import InputError, StartupError
from smtp_tracker.web.reports.users import (
    UserDirectory,
    add_user,
    read_users,
    remove_user,
    write_users,
)

PASSWORD = "a long enough password"


def user_cli(data_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smtp_tracker", "user", *args, "--data-dir", str(data_dir)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_add_list_replace_remove_through_the_command(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    added = user_cli(data_dir, "add", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("added user alice in ")
    path = data_dir / "reports-users.json"
    assert path.stat().st_mode & 0o777 == 0o600
    document = json.loads(path.read_text())
    encoded = document["users"]["alice"]["hash"]
    assert encoded.startswith("$argon2id$")
    assert PASSWORD not in path.read_text()

    again = user_cli(data_dir, "add", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    assert again.returncode == 1
    assert (
        again.stderr
        == "smtp-tracker: error: user 'alice' exists; add --replace to set a new password\n"
    )

    replaced = user_cli(
        data_dir, "add", "alice", "--replace", "--password-stdin", stdin="another password 2\n"
    )
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(path.read_text())["users"]["alice"]["hash"] != encoded

    assert user_cli(data_dir, "add", "bob", "--password-stdin", stdin=PASSWORD).returncode == 0
    listed = user_cli(data_dir, "list")
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["alice", "bob"]

    removed = user_cli(data_dir, "remove", "alice")
    assert removed.returncode == 0
    assert set(read_users(path)) == {"bob"}
    missing = user_cli(data_dir, "remove", "alice")
    assert missing.returncode == 1
    assert "no user 'alice'" in missing.stderr


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["add", "alice"], PASSWORD, "no terminal to ask the password on"),
        (["add", "alice", "--password-stdin"], "short\n", "at least 10 characters"),
        (["add", ".alice", "--password-stdin"], PASSWORD, "user name '.alice'"),
        (["add", "al ice", "--password-stdin"], PASSWORD, "user name 'al ice'"),
    ],
)
def test_the_command_refuses_with_one_line_and_changes_nothing(
    tmp_path: Path, args: list[str], stdin: str, message: str
) -> None:
    result = user_cli(tmp_path / "data", *args, stdin=stdin)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("smtp-tracker: error: ") and message in line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "reports-users.json").exists()


def test_a_broken_users_file_is_one_clear_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "reports-users.json").write_text("{not json")
    result = user_cli(data_dir, "list")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("smtp-tracker: ")
    assert line.endswith(
        f"users file: {data_dir / 'reports-users.json'} is not a smtp-tracker users file; "
        "fix or remove it"
    )


def test_writes_are_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "users.json"
    add_user(path, "alice", PASSWORD)
    assert path.parent.stat().st_mode & 0o777 == 0o700
    os.chmod(path, 0o644)  # an admin's mistake is mended by the next write
    add_user(path, "bob", PASSWORD)
    assert path.stat().st_mode & 0o777 == 0o600
    # no temporary left; the lock of user add/remove stays, private
    assert sorted(p.name for p in path.parent.iterdir()) == [".users.json.lock", "users.json"]
    assert (path.parent / ".users.json.lock").stat().st_mode & 0o777 == 0o600
    before = path.read_text()
    with pytest.raises(StartupError):
        write_users(path / "not-a-dir" / "x.json", read_users(path))
    assert path.read_text() == before


def test_add_and_remove_refuse_what_they_cannot_do(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    with pytest.raises(InputError, match="at least 10"):
        add_user(path, "alice", "short")
    with pytest.raises(InputError, match="at most"):
        add_user(path, "alice", "x" * 1025)
    with pytest.raises(InputError, match="no user"):
        remove_user(path, "alice")


async def test_the_directory_verifies_and_follows_changes(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    users = await UserDirectory.open(path, recheck_s=0.0)
    assert users.names == []
    assert not await users.verify("alice", PASSWORD)
    add_user(path, "alice", PASSWORD)
    assert await users.verify("alice", PASSWORD)
    assert not await users.verify("alice", PASSWORD + "!")
    assert not await users.verify("Alice", PASSWORD)
    assert not await users.verify("alice", "x" * 5000)
    path.write_text("{broken")  # a half-done manual edit: the last good list stays
    await users.refresh()
    assert users.exists("alice")
    path.unlink()
    await users.refresh()
    assert not users.exists("alice")


async def test_a_broken_file_at_start_is_a_startup_error(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"version": 1, "users": {"alice": {"hash": "plain"}}}))
    with pytest.raises(StartupError, match="not a smtp-tracker users file"):
        await UserDirectory.open(path)


def test_a_change_waits_for_another_in_progress_and_loses_neither(tmp_path: Path) -> None:
    """Two ``user`` commands at once: each reads, changes and writes the file under
    its lock, so the second sees the first's change instead of writing over it."""
    path = tmp_path / "reports-users.json"
    add_user(path, "first", PASSWORD)
    lock = os.open(tmp_path / ".reports-users.json.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another command, between its read and its write
    try:
        adding = threading.Thread(target=add_user, args=(path, "second", PASSWORD))
        adding.start()
        adding.join(timeout=1.0)  # its hash takes a few ms; then it waits for the lock
        assert adding.is_alive(), "the change did not wait for the lock"
        users = read_users(path)
        users["third"] = dataclasses.replace(users["first"], name="third")
        write_users(path, users)
    finally:
        os.close(lock)
    adding.join(timeout=30)
    assert not adding.is_alive()
    assert sorted(read_users(path)) == ["first", "second", "third"]
