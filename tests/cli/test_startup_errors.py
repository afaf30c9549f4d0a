"""Start-up problems of ``smtp-tracker serve``: one line, a non-zero exit, never a traceback.

Each case runs the real command in a process and checks its exit status and
its whole standard error: exactly ``smtp-tracker: error: ...`` naming the key
and the thing at fault.  An upstream that does not resolve at start is the
exception: a warning, and serve runs (mail is deferred until DNS answers).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.process import launch, run_cli
from tests.support.waiting import wait_until

#: serve with nothing but the SMTP listener, on a free port.  Log lines at info
#: level (counters of a listener stopped on the way out) would come before the
#: error; warnings would too, and there must be none.
SMTP_ONLY = (
    "--no-tracking",
    "--no-pixel",
    "--no-reports",
    "--listen",
    "127.0.0.1:0",
    "--log-level",
    "warning",
)


def serve(
    *args: str, data_dir: Path, wrapper: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``smtp-tracker serve ARGS`` to its end (it must fail at start)."""
    return run_cli(
        "serve", "--upstream", "127.0.0.1:1", "--data-dir", str(data_dir), *args, wrapper=wrapper
    )


def assert_one_line(result: subprocess.CompletedProcess[str], line: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr == f"smtp-tracker: error: {line}\n"
    assert result.returncode == 1


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port some other socket listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_smtp_port_in_use(tmp_path: Path, busy_port: int) -> None:
    result = serve(*SMTP_ONLY, "--listen", f"127.0.0.1:{busy_port}", data_dir=tmp_path / "data")
    assert_one_line(
        result,
        f"listen: cannot listen on 127.0.0.1:{busy_port} (Address already in use); "
        "is another process using it?",
    )


@pytest.mark.parametrize("listener", ["pixel", "reports"])
def test_https_listener_port_in_use(
    tmp_path: Path, busy_port: int, cert_pem_path: Path, key_pem_path: Path, listener: str
) -> None:
    result = serve(
        *SMTP_ONLY,
        f"--{listener}",
        f"--{listener}-listen",
        f"127.0.0.1:{busy_port}",
        "--tls-cert",
        str(cert_pem_path),
        "--tls-key",
        str(key_pem_path),
        data_dir=tmp_path / "data",
    )
    assert_one_line(
        result,
        f"{listener}_listen: cannot listen on 127.0.0.1:{busy_port} (Address already in use); "
        f"is another process using it? Set {listener}_listen, or --no-{listener}",
    )


@pytest.mark.parametrize("which", ["missing", "directory"])
def test_certificate_unreadable(tmp_path: Path, key_pem_path: Path, which: str) -> None:
    cert = tmp_path / "missing.pem"
    reason = "No such file or directory"
    if which == "directory":
        cert = tmp_path / "certs"
        cert.mkdir()
        reason = "Is a directory"
    result = serve(
        *SMTP_ONLY,
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key_pem_path),
        data_dir=tmp_path / "data",
    )
    assert_one_line(result, f"cannot read TLS certificate {cert}: {reason}")


def test_certificate_that_is_not_pem(tmp_path: Path, key_pem_path: Path) -> None:
    cert = tmp_path / "cert.der"
    cert.write_bytes(b"\x30\x82\x01\x0a not PEM")
    result = serve(
        *SMTP_ONLY,
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key_pem_path),
        data_dir=tmp_path / "data",
    )
    assert_one_line(result, f"TLS certificate {cert} is not valid PEM (no BEGIN CERTIFICATE block)")


def test_certificate_not_matching_its_key(
    tmp_path: Path, cert_pem_path: Path, untrusted_key_pem_path: Path
) -> None:
    result = serve(
        *SMTP_ONLY,
        "--tls-cert",
        str(cert_pem_path),
        "--tls-key",
        str(untrusted_key_pem_path),
        data_dir=tmp_path / "data",
    )
    assert_one_line(
        result, f"TLS key {untrusted_key_pem_path} does not match the certificate {cert_pem_path}"
    )


def test_data_dir_below_a_regular_file(tmp_path: Path) -> None:
    """Root ignores permission bits, so the path is made impossible instead."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    result = serve(*SMTP_ONLY, data_dir=blocker / "data")
    assert_one_line(result, f"data_dir: cannot create {blocker / 'data'} (Not a directory)")


def test_data_dir_that_is_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    result = serve(*SMTP_ONLY, data_dir=blocker)
    assert_one_line(result, f"data_dir: {blocker} is not a directory")


def _read_only_bind(directory: Path) -> tuple[str, ...]:
    """A command prefix that runs the rest with ``directory`` bind-mounted read-only,
    in a mount namespace of its own (gone with the process)."""
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    return ("unshare", "--mount", "sh", "-c", script, "sh", str(directory))


def test_data_dir_on_a_read_only_mount(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(
        [*_read_only_bind(data), "sh", "-c", '! touch "$0/probe" 2>/dev/null', str(data)],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.decode().strip()}")
    result = serve(*SMTP_ONLY, data_dir=data, wrapper=_read_only_bind(data))
    assert_one_line(result, f"data_dir: cannot write in {data} (Read-only file system)")


async def test_unresolvable_upstream_is_a_warning_and_serve_runs(tmp_path: Path) -> None:
    running = await launch(
        "serve",
        *SMTP_ONLY,
        "--upstream",
        "no-such-host.invalid:25",
        "--log-level",
        "info",
        "--data-dir",
        str(tmp_path / "data"),
        env=dict(os.environ),
        ready="listening for SMTP",
    )
    try:
        await wait_until(
            lambda: any("cannot resolve" in line for line in running.log),
            timeout_s=20,
            message="no warning about the unresolvable upstream",
        )
        (warning,) = [line for line in running.log if "cannot resolve" in line]
        assert warning.rstrip("\n").endswith(
            "warning: upstream: cannot resolve no-such-host.invalid (Name or service not "
            "known); serving anyway: mail is deferred (451 4.4.1) until it resolves"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        replies = []
        for line in (b"", b"EHLO postfix.test", b"MAIL FROM:<alice@example.org>", b"QUIT"):
            if line:
                writer.write(line + b"\r\n")
            while (reply := (await reader.readline()).decode())[3:4] == "-":
                pass
            replies.append(reply.rstrip("\r\n"))
        writer.close()
        assert replies[2] == "451 4.4.1 upstream unavailable, try again later"
        assert replies[3] == "221 2.0.0 Bye"
        running.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running.process.wait(), 30) == 0
    finally:
        await running.finish()
    assert not any("Traceback" in line for line in running.log), "".join(running.log)
