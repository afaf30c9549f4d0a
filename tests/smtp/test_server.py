"""RelaySMTP where it differs from aiosmtpd's SMTP."""

import asyncio
import ipaddress

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from smtp_tracker.app import Application
from smtp_tracker.smtp.server import RelaySMTP, client_allowed


def _protocol() -> RelaySMTP:
    return RelaySMTP(
        object(),  # type: ignore[arg-type]
        allowed_clients=[ipaddress.ip_network("127.0.0.0/8")],
        max_message_bytes=1000,
        client_timeout_s=5.0,
        hostname="relay.test",
        tls_context=None,
        keep_transcript=False,
    )


async def test_command_length_allowances_are_per_connection() -> None:
    first = _protocol()
    first.command_size_limits["MAIL"] += 36  # what EHLO adds for SIZE and SMTPUTF8
    second = _protocol()
    assert first.command_size_limits["MAIL"] == 512 + 36
    assert second.command_size_limits["MAIL"] == 512
    assert first.command_size_limits is not second.command_size_limits


def test_client_allowed_matches_networks_and_v4_mapped_v6() -> None:
    loopback = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert client_allowed(("127.0.0.1", 1), loopback)
    assert client_allowed(("::1", 1, 0, 0), loopback)
    assert client_allowed(("::ffff:127.0.0.5", 1, 0, 0), loopback)
    assert not client_allowed(("192.0.2.1", 1), loopback)
    assert not client_allowed(None, loopback)
    assert not client_allowed(("not-an-address", 1), loopback)


async def test_canary_pending_input_reads_asyncio_streamreaders_buffer() -> None:
    """RelaySMTP._pending_input reads StreamReader._buffer (asyncio has no public peek):
    if a Python release renames it, this fails here rather than in the pipelining checks."""
    reader = asyncio.StreamReader()
    reader.feed_data(b"EHLO a\r\nMAIL FROM:<b@c>\r\n")
    assert await reader.readuntil() == b"EHLO a\r\n"
    buffer = reader._buffer  # type: ignore[attr-defined]
    assert isinstance(buffer, bytearray) and bytes(buffer) == b"MAIL FROM:<b@c>\r\n"


#: Characters that matter to a path's syntax, and some that do not.
_PATH_CHARACTERS = "ab.Z9-_+=!#$%&'*/?^`{|}~@<>()[]\\\":,; \t\r\né"


def _path_arguments() -> st.SearchStrategy[str]:
    """MAIL/RCPT arguments: free text, and paths built from plausible parts (empty
    atoms and labels make the dots misplaced; free parts anything else)."""
    part = st.text(alphabet=_PATH_CHARACTERS, max_size=12)
    atoms = st.lists(st.text(alphabet="aZ9-_+=!#$%&'*/?^`{|}~", max_size=4), min_size=1, max_size=3)
    labels = st.lists(st.text(alphabet="ab9-", max_size=4), min_size=1, max_size=3)
    built = st.builds(
        lambda lead, local, domain, close, gap, rest: f"{lead}<{local}@{domain}{close}{gap}{rest}",
        st.sampled_from(["", "", " "]),
        st.one_of(atoms.map(".".join), atoms.map(".".join), part),
        st.one_of(labels.map(".".join), labels.map(".".join), part),
        st.sampled_from([">", ">", ">", "", " >"]),
        st.sampled_from(["", " ", "\t", "  ", " (c) ", " (", "x", " \r"]),
        part,
    )
    return st.one_of(st.text(alphabet=_PATH_CHARACTERS, max_size=30), built, built)


def _outcome(reader: object, arg: str) -> object:
    try:
        return SMTP._getaddr(reader, arg)  # type: ignore[arg-type]
    except Exception as exc:  # the same failure either way
        return type(exc)


@settings(max_examples=500, deadline=None)
@given(_path_arguments())
def test_paths_are_read_as_aiosmtpd_reads_them(arg: str) -> None:
    """RelaySMTP reads <local@domain> itself (issue 15): the same address and rest as
    aiosmtpd's _getaddr for any argument."""

    async def both() -> tuple[object, object]:
        protocol = _protocol()
        try:
            ours: object = protocol._getaddr(arg)
        except Exception as exc:
            ours = type(exc)
        return ours, _outcome(protocol, arg)

    ours, theirs = asyncio.run(both())
    assert ours == theirs


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<news@example.org> SIZE=1000", ("news@example.org", "SIZE=1000")),
        ("<a.b+c@d-e.f>", ("a.b+c@d-e.f", "")),
        ("<a@b> (comment) SIZE=1", ("a@b", "SIZE=1")),
        ("<a@b.>", (None, None)),
    ],
)
async def test_paths_read_with_and_without_aiosmtpd(
    arg: str, expected: tuple[str | None, str | None]
) -> None:
    assert _protocol()._getaddr(arg) == expected


async def test_a_multiline_reply_is_written_at_once(
    relay: Application, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiosmtpd pushes an EHLO reply a line at a time; RelaySMTP writes it in one
    write, each line in its place (issue 15: a system call per line)."""
    written: list[str] = []
    push = SMTP.push

    async def recording(self: SMTP, status: str) -> None:
        written.append(status)
        await push(self, status)

    monkeypatch.setattr(SMTP, "push", recording)
    reader, writer = await asyncio.open_connection(*relay.smtp_address)
    try:
        greeting = await asyncio.wait_for(reader.readline(), 10)
        writer.write(b"EHLO postfix.test\r\n")
        lines = [await asyncio.wait_for(reader.readline(), 10)]
        while lines[-1][3:4] == b"-":
            lines.append(await asyncio.wait_for(reader.readline(), 10))
        writer.write(b"NOOP\r\n")
        noop = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert greeting.startswith(b"220 relay.test ")
    assert len(lines) >= 4 and lines[0].startswith(b"250-relay.test")
    assert lines[-1].startswith(b"250 ")
    ehlo = "\r\n".join(line.decode().rstrip("\r\n") for line in lines)
    assert written[1:] == [ehlo, noop.decode().rstrip("\r\n")]


@pytest.mark.parametrize("moves", [[0.05, 0.3], [0.05, 30.0, 0.3], [30.0, 0.3]])
async def test_the_idle_timer_runs_from_the_last_reset(moves: list[float]) -> None:
    """RelaySMTP moves one idle timer instead of making a new one per reset (issue 15):
    it still runs out the last reset's duration after it, neither sooner nor
    (the 10 s bound) at an earlier, longer reset's time."""
    loop = asyncio.get_running_loop()
    protocol = _protocol()
    fired = asyncio.Event()
    protocol._timeout_cb = fired.set  # type: ignore[method-assign]
    for seconds in moves:
        protocol._reset_timeout(seconds)
    reset_at = loop.time()
    await asyncio.wait_for(fired.wait(), 10)
    assert loop.time() - reset_at >= moves[-1] - 0.002
