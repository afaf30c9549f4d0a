"""A private Postfix on loopback, started and stopped by the tests.

Each instance lives in a directory of its own (``/tmp/pf-XXXXXXXX``: config,
queue, data, ``maillog``) and is driven with ``postfix -c DIR``, ``sendmail -C DIR``
and ``postqueue -c DIR``. As root none of these needs ``alternate_config_directories``
or ``multi_instance_directories``, so ``/etc/postfix`` is neither read nor written
(Debian's "No configuration" leaves no ``/etc/postfix/main.cf`` at all, and that is fine).
The directory is not under pytest's ``tmp_path`` because that is mode 0700 and
Postfix daemons run as the unprivileged ``postfix`` user.

Every message leaves through ``transport_maps = inline:{ {*=smtp:[127.0.0.1]:RELAY_PORT} }``:
that includes Postfix's own bounces and delay notices (null sender ``<>``), which
therefore reach the relay too; :func:`without_bounces` filters them out.

The smtpd listener (for swaks) gets its port by binding port 0, closing and
handing the number to Postfix: another process could take the port in between.
That race is accepted; :meth:`Postfix.create` fails loudly if it happens.

All methods that run a Postfix command are async (``asyncio.create_subprocess_exec``),
so a relay running in the same event loop keeps serving while a test waits.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tests.support.waiting import wait_until

__all__ = [
    "Postfix",
    "PostfixError",
    "missing_reason",
    "sasl_missing_reason",
    "smarthost_settings",
    "without_bounces",
]

_SBIN = ("/usr/sbin", "/usr/bin", "/sbin")
MAIL_OWNER = "postfix"

#: master.cf without chroot (the instance directory is not a chroot jail) and
#: with ``postlogd`` for ``maillog_file``. ``{smtpd_port}`` is filled in.
MASTER_CF = """\
127.0.0.1:{smtpd_port} inet n - n - - smtpd
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp
lmtp       unix  - - n -     - lmtp
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


class PostfixError(RuntimeError):
    """A Postfix command failed; the message has its output and the log's tail."""


def _command(name: str) -> str | None:
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in _SBIN:
        candidate = Path(directory, name)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def missing_reason() -> str | None:
    """Why a private Postfix cannot run here, or ``None`` when it can."""
    for name in ("postfix", "sendmail", "postqueue"):
        if _command(name) is None:
            return f"{name} is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its daemons switch to the postfix user)"
    try:
        pwd.getpwnam(MAIL_OWNER)
    except KeyError:
        return f"there is no {MAIL_OWNER!r} user (is the postfix package installed?)"
    return None


def sasl_missing_reason() -> str | None:
    """Why Postfix's SMTP client cannot do AUTH PLAIN/LOGIN here, or ``None``.

    The Cyrus plug-ins come with ``libsasl2-modules``, only recommended by
    ``libsasl2-2``: ``apt-get install --no-install-recommends postfix`` leaves it out.
    """
    plugins = [
        *Path("/usr/lib").glob("*/sasl2/libplain.so*"),
        *Path("/usr/lib/sasl2").glob("libplain.so*"),
    ]
    if not plugins:
        return "Cyrus SASL PLAIN plug-in missing (apt-get install libsasl2-modules)"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (bound to 0, then closed: see the module doc)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def smarthost_settings(address: str, *, ca_file: Path, user: str, password: str) -> dict[str, str]:
    """main.cf settings to deliver straight to a smarthost with TLS required and SASL.

    :param address: ``host:port`` of the smarthost (numeric host).
    :param ca_file: PEM CA the smarthost's certificate must chain to.
    """
    host, _, port = address.rpartition(":")
    nexthop = f"[{host}]:{port}"
    return {
        "transport_maps": f"inline:{{ {{*=smtp:{nexthop}}} }}",
        "smtp_tls_security_level": "encrypt",
        "smtp_tls_CAfile": str(ca_file),
        "smtp_sasl_auth_enable": "yes",
        "smtp_sasl_password_maps": f"inline:{{ {{{nexthop}={user}:{password}}} }}",
        "smtp_sasl_security_options": "noanonymous",
        "smtp_sasl_tls_security_options": "noanonymous",
    }


class _HasSender(Protocol):
    @property
    def mail_from(self) -> str: ...


S = TypeVar("S", bound=_HasSender)


def without_bounces(transactions: Iterable[S]) -> list[S]:
    """The transactions whose reverse-path is not null (Postfix's own notices use ``<>``)."""
    return [t for t in transactions if t.mail_from != ""]


def _format(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes


class Postfix:
    """One private Postfix instance; make it with :meth:`create`, end it with :meth:`destroy`.

    :ivar root: the instance directory; ``config_dir``, ``queue_dir``, ``data_dir``
        and ``maillog_path`` are inside it.
    :ivar relay_port: where ``transport_maps`` sends everything (``[127.0.0.1]:relay_port``).
    :ivar smtpd_port: the loopback smtpd listener.
    :ivar main_cf: the parameters written to main.cf.
    """

    def __init__(
        self, root: Path, relay_port: int, smtpd_port: int, main_cf: dict[str, str]
    ) -> None:
        self.root = root
        self.relay_port = relay_port
        self.smtpd_port = smtpd_port
        self.main_cf = main_cf
        self.config_dir = root / "etc"
        self.queue_dir = root / "spool"
        self.data_dir = root / "data"
        self.maillog_path = root / "maillog"
        self.running = False
        #: services appended to master.cf (e.g. a second smtpd with its own -o options)
        self.master_cf_extra = ""

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        relay_port: int,
        main_cf_overrides: Mapping[str, str | int | bool] | None = None,
        *,
        smtpd_port: int | None = None,
        master_cf_extra: str = "",
    ) -> Postfix:
        """Write the configuration and start the instance.

        :param relay_port: the port of the relay (or any SMTP server) on 127.0.0.1
            that receives every message.
        :param main_cf_overrides: main.cf parameters replacing or adding to the defaults
            (``True``/``False`` become ``yes``/``no``).
        :param master_cf_extra: master.cf lines appended to the default services.
        :raises PostfixError: ``postfix start`` failed.
        """
        root = Path(tempfile.mkdtemp(prefix="pf-", dir="/tmp"))
        root.chmod(0o755)
        port = smtpd_port if smtpd_port is not None else free_port()
        main_cf = {
            "compatibility_level": "3.6",
            "config_directory": str(root / "etc"),
            "queue_directory": str(root / "spool"),
            "data_directory": str(root / "data"),
            "maillog_file": str(root / "maillog"),
            "maillog_file_prefixes": str(root),
            "myhostname": "postfix.test.invalid",
            "myorigin": "$myhostname",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "smtpd_peername_lookup": "no",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "transport_maps": f"inline:{{ {{*=smtp:[127.0.0.1]:{relay_port}}} }}",
            "smtp_tls_security_level": "may",
            "smtp_tls_loglevel": "1",
            "smtputf8_enable": "yes",
            "queue_run_delay": "2s",
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "4s",
            "smtp_connect_timeout": "5s",
        }
        main_cf.update({key: _format(value) for key, value in (main_cf_overrides or {}).items()})
        instance = cls(root, relay_port, port, main_cf)
        instance.master_cf_extra = master_cf_extra
        instance._write_configuration()
        await instance.start()
        return instance

    def _write_configuration(self) -> None:
        for directory in (self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir(mode=0o755, exist_ok=True)
        owner = pwd.getpwnam(MAIL_OWNER)
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        lines = [f"{key} = {value}".rstrip() for key, value in self.main_cf.items()]
        files = {
            self.config_dir / "main.cf": "\n".join(lines) + "\n",
            self.config_dir / "master.cf": MASTER_CF.format(smtpd_port=self.smtpd_port)
            + self.master_cf_extra,
        }
        # Postfix re-reads a configuration file every 0.3 s until its mtime is over a
        # second old (it might still be being edited): backdate ours by a minute.
        backdated = time.time() - 60
        for path, text in files.items():
            path.write_text(text)
            os.utime(path, (backdated, backdated))

    async def start(self) -> None:
        """``postfix -c DIR start``; returns once the master daemon is up.

        :raises PostfixError: it did not start (the smtpd port taken, a bad setting).
        """
        await self._run("postfix", "-c", str(self.config_dir), "start")
        self.running = True

    async def stop(self) -> None:
        """``postfix -c DIR stop``; returns once the master daemon has exited.

        Asks Postfix whether it runs rather than trusting :attr:`running`, so an
        instance started behind this object's back is stopped too.
        """
        self.running = False
        if not self.config_dir.exists() or await self._is_stopped():
            return
        await self._run("postfix", "-c", str(self.config_dir), "stop")
        await wait_until(
            self._is_stopped, timeout_s=15, message=f"Postfix in {self.root} did not stop"
        )

    async def _is_stopped(self) -> bool:
        status = await self._run("postfix", "-c", str(self.config_dir), "status", check=False)
        return status.returncode != 0

    async def reload(self, **main_cf_changes: str | int | bool) -> None:
        """Change main.cf parameters and ``postfix reload``."""
        self.main_cf.update({key: _format(value) for key, value in main_cf_changes.items()})
        self._write_configuration()
        await self._run("postfix", "-c", str(self.config_dir), "reload")

    async def destroy(self, *, keep_log: Path | None = None) -> None:
        """Stop (always tried), copy the maillog to ``keep_log``, remove the directory."""
        try:
            await self.stop()
        finally:
            if keep_log is not None and self.maillog_path.exists():
                shutil.copyfile(self.maillog_path, keep_log)
            shutil.rmtree(self.root, ignore_errors=True)

    # -- running commands -------------------------------------------------------------------

    async def _run(
        self,
        name: str,
        *args: str,
        input: bytes | None = None,
        check: bool = True,
        timeout_s: float = 30.0,
    ) -> Completed:
        path = _command(name)
        if path is None:
            raise PostfixError(f"{name} is not installed")
        process = await asyncio.create_subprocess_exec(
            path,
            *args,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(input), timeout_s)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise PostfixError(f"{name} {' '.join(args)} took over {timeout_s:g} s") from None
        assert process.returncode is not None
        completed = Completed(process.returncode, stdout, stderr)
        if check and completed.returncode != 0:
            raise PostfixError(
                f"{name} {' '.join(args)} exited {completed.returncode}: "
                f"{stderr.decode(errors='replace').strip()}\n--- maillog tail ---\n"
                + "\n".join(self.maillog().splitlines()[-20:])
            )
        return completed

    # -- mail -------------------------------------------------------------------------------

    @property
    def smtpd_address(self) -> str:
        """``127.0.0.1:PORT`` of the smtpd listener (``swaks --server`` takes it)."""
        return f"127.0.0.1:{self.smtpd_port}"

    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        dsn_notify: str | Sequence[str] | None = None,
        ret: str | None = None,
        envid: str | None = None,
    ) -> None:
        """Queue a message with ``sendmail -C DIR -i -f sender -- recipients``.

        :param sender: the envelope sender; ``""`` for the null sender.
        :param data: the message, header and body; a line with a single dot is kept (``-i``).
        :param dsn_notify: ``sendmail -N``: ``"never"`` or some of ``success``,
            ``delay``, ``failure`` (RFC 3461 NOTIFY).
        :param ret: ``sendmail -R``: ``"full"`` or ``"hdrs"`` (RFC 3461 RET).
        :param envid: ``sendmail -V``: the RFC 3461 ENVID.
        :raises PostfixError: sendmail refused the message.
        """
        args = ["-C", str(self.config_dir), "-i", "-f", sender]
        if dsn_notify is not None:
            args += ["-N", dsn_notify if isinstance(dsn_notify, str) else ",".join(dsn_notify)]
        if ret is not None:
            args += ["-R", ret]
        if envid is not None:
            args += ["-V", envid]
        await self._run("sendmail", *args, "--", *recipients, input=data)

    async def flush(self) -> None:
        """``postqueue -f``: attempt delivery of everything queued now."""
        await self._run("postqueue", "-c", str(self.config_dir), "-f")

    async def queue(self) -> list[dict[str, Any]]:
        """``postqueue -j``: one dict per queued message (``queue_name``, ``queue_id``,
        ``sender``, ``recipients`` with ``address`` and, once deferred, ``delay_reason``)."""
        completed = await self._run("postqueue", "-c", str(self.config_dir), "-j")
        return [json.loads(line) for line in completed.stdout.decode().splitlines() if line]

    async def deferred_reasons(self) -> list[str]:
        """Every recipient's ``delay_reason`` in the deferred queue, e.g. ``"connect to
        127.0.0.1[127.0.0.1]:2525: Connection refused"``.

        Only messages already moved to the deferred queue count, so a :meth:`flush`
        after this returned something retries them at once.
        """
        return [
            recipient["delay_reason"]
            for message in await self.queue()
            if message.get("queue_name") == "deferred"
            for recipient in message.get("recipients", [])
            if recipient.get("delay_reason")
        ]

    async def wait_until_queue_empty(self, timeout_s: float = 20.0) -> None:
        """Wait until nothing is queued (maildrop included).

        :raises AssertionError: still queued after ``timeout_s``, with what and why.
        """

        async def empty() -> bool:
            return not await self.queue()

        try:
            await wait_until(
                empty, timeout_s=timeout_s, interval_s=0.1, message="Postfix queue not empty"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {await self.queue()!r}") from None

    def maillog(self) -> str:
        """The instance's log so far (``maillog_file``)."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_matches(self, pattern: str | re.Pattern[str]) -> list[re.Match[str]]:
        """Every match of ``pattern`` (multi-line mode) in the log so far."""
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        return list(regex.finditer(self.maillog()))

    async def wait_for_log(
        self, pattern: str | re.Pattern[str], timeout_s: float = 20.0, *, count: int = 1
    ) -> re.Match[str]:
        """Wait until ``pattern`` matches the log ``count`` times; return the last match.

        :raises AssertionError: not within ``timeout_s``; the log's tail is in the message.
        """

        def enough() -> list[re.Match[str]] | None:
            found = self.log_matches(pattern)
            return found if len(found) >= count else None

        try:
            matches = await wait_until(
                enough,
                timeout_s=timeout_s,
                interval_s=0.05,
                message=f"{pattern!s} not in the Postfix log {count} time(s)",
            )
        except AssertionError as exc:
            tail = "\n".join(self.maillog().splitlines()[-25:])
            raise AssertionError(f"{exc}\n--- maillog tail ---\n{tail}") from None
        assert matches is not None
        return matches[count - 1]
