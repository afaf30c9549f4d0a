"""A private PostgreSQL cluster for the tests: ``initdb`` + ``pg_ctl`` in a temporary directory.

Debian's server binaries (package ``postgresql``) live in
``/usr/lib/postgresql/<major>/bin``; the cluster listens on a free loopback
port and a socket directory of its own, trusts local connections (it is
private to the test run) and runs as the unprivileged ``postgres`` user
through ``runuser`` when the tests run as root (PostgreSQL refuses root).
Nothing assumes a running service.

:func:`start_cluster` starts one; :meth:`Cluster.new_database` makes a fresh
database per test and gives its DSN; :meth:`Cluster.stop` and
:meth:`Cluster.start` take the server away and bring it back (fault tests).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = [
    "Cluster",
    "find_bindir",
    "pg_cluster",
    "pg_dsn",
    "remove_cluster",
    "start_cluster",
    "unavailable_reason",
]

_BIN_ROOT = Path("/usr/lib/postgresql")
_USER = "postgres"


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` holding ``initdb`` and ``pg_ctl``, or None."""
    found = []
    if _BIN_ROOT.is_dir():
        for child in _BIN_ROOT.iterdir():
            if (child / "bin" / "initdb").is_file() and child.name.isdigit():
                found.append((int(child.name), child / "bin"))
    return max(found)[1] if found else None


def unavailable_reason() -> str | None:
    """Why PostgreSQL tests cannot run here (one line), or None when they can."""
    if find_bindir() is None:
        return "PostgreSQL server binaries not installed (Debian package 'postgresql')"
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        return "psycopg and psycopg-pool not installed (pip install 'smtp-tracker[postgresql]')"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam(_USER)
        except KeyError:
            return f"running as root and there is no {_USER!r} user to run PostgreSQL as"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    """A running private cluster: its directory, port and superuser."""

    bindir: Path
    root: Path
    port: int
    user: str = _USER
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    def _run(self, *argv: str | Path) -> None:
        command = [str(part) for part in argv]
        if os.geteuid() == 0:
            command = ["runuser", "-u", _USER, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def dsn(self, dbname: str = "postgres") -> str:
        """The DSN of *dbname* over TCP on loopback (no password: trust, private cluster)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run(
            self.bindir / "pg_ctl",
            "-D",
            self.datadir,
            "-l",
            self.root / "server.log",
            "-w",
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``pg_ctl stop -m MODE``) and wait until it is down."""
        self._run(self.bindir / "pg_ctl", "-D", self.datadir, "-w", "-m", mode, "stop")

    def new_database(self) -> str:
        """A fresh, empty database; its DSN."""
        import psycopg

        name = f"t{next(self._names)}_{os.getpid()}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


def start_cluster() -> Cluster:
    """Make and start a cluster in a new temporary directory owned by the ``postgres`` user.

    :raises RuntimeError: when PostgreSQL is unavailable (see :func:`unavailable_reason`).
    :raises subprocess.CalledProcessError: when ``initdb`` or ``pg_ctl`` fails.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    bindir = find_bindir()
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix="smtp-tracker-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, _USER, _USER)
    root.chmod(0o700)
    cluster = Cluster(bindir=bindir, root=root, port=_free_port())
    cluster._run(
        bindir / "initdb",
        "-D",
        cluster.datadir,
        "-U",
        _USER,
        "--auth=trust",
        "--encoding=UTF8",
        "--locale=C.UTF-8",
    )
    cluster.start()
    return cluster


def remove_cluster(cluster: Cluster) -> None:
    """Stop *cluster* (immediately) and remove its directory."""
    with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
        cluster.stop("immediate")
    shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """A private PostgreSQL cluster for the session (skips with the reason when unavailable).

    Import it into a test module or conftest (``from tests.support.postgres import pg_cluster``).
    """
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        remove_cluster(cluster)


@pytest.fixture
def pg_dsn(pg_cluster: Cluster) -> str:
    """The DSN of a fresh, empty database of the session's cluster."""
    return pg_cluster.new_database()
