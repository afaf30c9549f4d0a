"""Fuzz target for :func:`smtp_tracker.mime.rewrite`: mutated real messages, checked invariants.

Run from the repository root::

    python -m fuzz.rewrite_target --runs 200000      # Hypothesis, no extra dependency
    python -m fuzz.rewrite_target --engine atheris -- -max_total_time=3600
    python -m fuzz.rewrite_target --reproduce fuzz/crashes/<sha256>.eml

(atheris, coverage-guided libFuzzer: ``pip install -e '.[fuzz]'``.)

Inputs are seed messages (``tests/fixtures/mime``, a few built here, and the
corpus's ``eml/`` and ``html/`` when ``SMTP_TRACKER_CORPUS`` is set) mutated at
the byte and line level: bytes and MIME-meaningful snippets inserted, ranges
deleted or repeated, lines dropped or doubled, line endings changed, the
message cut short.  The Hypothesis engine draws the mutations itself; the
atheris engine hands the seeds to libFuzzer, which mutates them guided by
coverage.  Every input is rewritten with a policy and reverse-path drawn too,
and :func:`check_rewrite` must hold:

* :func:`~smtp_tracker.mime.rewrite` returns a result and raises nothing (its
  documented contract: it never raises);
* the output parses with ``email.message_from_bytes(policy=email.policy.default)``,
  headers and payloads included, whenever the input does;
* the top-level header section is the input's, byte for byte, less the
  control header field (the only header change the rewrite documents);
* the output is the input (``rewrite-failed``), the input less the control
  header (not tracked), or that plus exactly one pixel in one HTML part with
  every other octet unchanged (tracked: :func:`tests.mime.invariants.check`).

A failing input found by the command line is written to ``fuzz/crashes/``
(named by its SHA-256) for ``--reproduce`` and for a regression test.  So is
one input per internal error the rewrite caught and failed open on (the
message relayed untracked): not a broken invariant, but worth a look; with
``--strict`` they fail the run too.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import email
import email.policy
import hashlib
import html
import logging
import re
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from functools import cache
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from smtp_tracker.mime import RewritePolicy, RewriteResult, rewrite
from tests import corpus
from tests.mime import messages as build
from tests.mime.invariants import check, decoded_payload, leaves, without_control_header

__all__ = [
    "CRASH_DIR",
    "PIXEL_URL",
    "FuzzCase",
    "InternalErrors",
    "check_rewrite",
    "fuzz_cases",
    "main",
    "seeds",
]

PIXEL_URL = "https://track.example.test/o/FUZZxPIXELxFUZZxPIXELxA.gif?a=1&b=2"
CRASH_DIR = Path(__file__).resolve().parent / "crashes"
#: Seeds larger than this are left out: every example parses its message several times.
MAX_SEED_BYTES = 256 * 1024
#: email.feedparser's header-line test (a field, a continuation, an mbox ``From `` line).
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")
_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
_BOUNDARY = re.compile(rb'boundary\s*=\s*"?([^";\r\n]+)', re.IGNORECASE)

#: Snippets that mean something to a MIME or HTML reader.
SNIPPETS: tuple[bytes, ...] = (
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b"\t",
    b" ",
    b"\x00",
    b"\xff\xfe",
    b"\xc3",
    b"=",
    b"=\r\n",
    b"=3D",
    b"=C3=A9",
    b"=ZZ",
    b"--",
    b"</body>",
    b"<body>",
    b"</BODY >",
    b"<html>",
    b"</html>",
    b"<!--",
    b"-->",
    b"<![CDATA[",
    b"<script>",
    b"<?xml version='1.0'?>",
    b"<meta charset=utf-16>",
    b"\x1b$B",
    b"Content-Type: text/html; charset=utf-8\r\n",
    b"Content-Type: text/html; charset=utf-16\r\n",
    b"Content-Type: text/html; charset=iso-2022-jp\r\n",
    b"Content-Type: text/html; charset=x-bogus\r\n",
    b"Content-Type: multipart/alternative; boundary=fz\r\n",
    b"Content-Type: multipart/signed; boundary=fz\r\n",
    b"Content-Type: multipart/report; boundary=fz\r\n",
    b"Content-Type: message/rfc822\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Transfer-Encoding: 8bit\r\n",
    b"Content-Transfer-Encoding: x-uuencode\r\n",
    b"Content-Disposition: attachment\r\n",
    b"X-Track: yes\r\n",
    b"X-Track: no\r\n",
    b"X-Track:\r\n yes (folded)\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org\r\n",
    b"Auto-Submitted: auto-replied\r\n",
    b"MIME-Version: 1.0\r\n",
    b"--fz\r\n",
    b"--fz--\r\n",
    b"PGh0bWw+PGJvZHk+eDwvYm9keT48L2h0bWw+",  # base64 of a tiny HTML document
)


@dataclass(frozen=True)
class FuzzCase:
    """One input: the message and how it is rewritten."""

    message: bytes
    policy: RewritePolicy
    reverse_path: str | None

    def __repr__(self) -> str:  # Hypothesis shows the failing case; the message is saved
        return (
            f"FuzzCase(message=<{len(self.message)} octets, sha256 {_sha(self.message)}: "
            f"{self.message[:120]!r}...>, policy={self.policy!r}, "
            f"reverse_path={self.reverse_path!r})"
        )


# -- seeds ---------------------------------------------------------------------------------


def _built_seeds() -> list[bytes]:
    page = "<html><head><title>t</title></head><body><p>Hello &amp; caf\u00e9</p></body></html>"
    plain = build.leaf("Hello", ctype="text/plain")
    return [
        build.html_message(page),
        build.html_message(page, cte="quoted-printable"),
        build.html_message(page, cte="base64"),
        build.html_message(page.replace("\u00e9", "e"), charset=None, cte="7bit"),
        build.html_message(page, charset="iso-8859-1", cte="quoted-printable"),
        build.html_message(page, charset="utf-16", cte="base64"),
        build.html_message(page, headers="X-Track: yes\r\nDKIM-Signature: v=1; d=example.org\r\n"),
        build.message(
            build.multipart(
                "alternative", plain, build.leaf(page, cte="quoted-printable"), boundary="fz"
            )
        ),
        build.message(
            build.multipart(
                "mixed",
                build.multipart(
                    "related",
                    build.leaf(page, cte="base64"),
                    build.leaf("iVBORw0KGgo=", ctype="image/png", charset=None, cte="7bit"),
                    boundary="inner",
                ),
                build.leaf("attached", ctype="application/octet-stream", charset=None),
                boundary="outer",
            )
        ),
        build.html_message(page).replace(b"\r\n", b"\n"),
    ]


@cache
def seeds() -> tuple[bytes, ...]:
    """The seed messages: built-in, ``tests/fixtures/mime``, and the corpus when it is set.

    Corpus templates (``html/``) are wrapped as messages in quoted-printable,
    base64 and 8bit in turn; seeds over :data:`MAX_SEED_BYTES` are left out.
    """
    found = _built_seeds()
    found += [p.read_bytes() for p in sorted(build.FIXTURES.glob("*.eml"))]
    found += [p.read_bytes() for p in corpus.eml_paths()]
    encodings: tuple[corpus.Cte, ...] = ("quoted-printable", "base64", "8bit")
    for index, path in enumerate(corpus.html_paths()):
        cte = encodings[index % len(encodings)]
        found.append(corpus.html_as_message(path.read_bytes(), charset="utf-8", cte=cte))
    return tuple(seed for seed in found if 0 < len(seed) <= MAX_SEED_BYTES)


# -- mutations -----------------------------------------------------------------------------


def _lines(data: bytes) -> list[bytes]:
    return _LINE.findall(data)


@st.composite
def _mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    boundaries = [b"--" + b.strip() for b in _BOUNDARY.findall(seed)]
    snippets = st.sampled_from(SNIPPETS + tuple(boundaries) + tuple(b + b"--" for b in boundaries))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(
            st.sampled_from(
                ["insert", "insert-bytes", "delete", "repeat", "byte", "line", "eol", "cut"]
            )
        )
        size = len(data)
        at = draw(st.integers(0, size))
        if kind == "insert":
            data[at:at] = draw(snippets)
        elif kind == "insert-bytes":
            data[at:at] = draw(st.binary(min_size=1, max_size=24))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 256))]
        elif kind == "repeat":
            piece = data[at : at + draw(st.integers(1, 512))]
            where = draw(st.integers(0, size))
            data[where:where] = piece
        elif kind == "byte" and size:
            data[min(at, size - 1)] = draw(st.integers(0, 255))
        elif kind == "line":
            lines = _lines(bytes(data))
            if lines:
                index = draw(st.integers(0, len(lines) - 1))
                action = draw(st.sampled_from(["drop", "double", "swap-next"]))
                if action == "drop":
                    del lines[index]
                elif action == "double":
                    lines.insert(index, lines[index])
                elif index + 1 < len(lines):
                    lines[index], lines[index + 1] = lines[index + 1], lines[index]
                data = bytearray(b"".join(lines))
        elif kind == "eol":
            # not bare CR: alone it ends no line in SMTP (RFC 5321 §2.3.8), so a
            # CR-only message is one long line, which the line-length check reads
            # differently from the MIME walker (which splits on CR too)
            to = draw(st.sampled_from([b"\n", b"\r\n"]))
            data = bytearray(re.sub(rb"\r\n|\r|\n", to, bytes(data)))
        elif kind == "cut":
            del data[at:]
    return bytes(data)


@st.composite
def fuzz_cases(draw: st.DrawFn) -> FuzzCase:
    """A mutated seed with a drawn policy and reverse-path."""
    pool = seeds()
    seed = pool[draw(st.integers(0, len(pool) - 1))]
    message = draw(_mutated(seed))
    rarely = st.integers(0, 7).map(lambda n: n == 7)  # true one time in eight
    policy = RewritePolicy(
        dkim_policy=draw(st.sampled_from(["skip", "track"])),
        tracking_requires_opt_in=draw(rarely),
        max_depth=2 if draw(rarely) else 32,
        max_parts=3 if draw(rarely) else 1000,
        max_html_bytes=200 if draw(rarely) else 64 * 1024 * 1024,
    )
    reverse_path = "sender@example.org"
    if draw(rarely):
        reverse_path = draw(st.sampled_from([None, "", "<>"]))
    return FuzzCase(message, policy, reverse_path)


# -- the invariants ------------------------------------------------------------------------


def header_section(data: bytes) -> bytes:
    """The top-level header section: up to the first empty line or non-header line."""
    pos = 0
    for line in _lines(data):
        content = line.rstrip(b"\r\n")
        if not content or not _HEADER_LINE.match(content):
            break
        pos += len(line)
    return data[:pos]


def parse_fully(data: bytes) -> str | None:
    """Parse and read *data* with the default policy; the exception's name, or None.

    Reads every header value, content type and charset of every part and
    decodes every leaf payload: the default policy parses header values
    lazily, so ``message_from_bytes`` alone proves little.
    """
    try:
        message = email.message_from_bytes(data, policy=email.policy.default)
        for part in message.walk():
            assert isinstance(part, Message)
            for _name, value in part.items():
                str(value)
            part.get_content_type()
            part.get_content_charset()
            if not part.is_multipart():
                part.get_payload(decode=True)
    except Exception as exc:  # reported, and compared with the input's
        return type(exc).__name__
    return None


def check_rewrite(case: FuzzCase) -> RewriteResult:
    """Rewrite ``case.message`` and assert the invariants of the module docstring.

    :raises AssertionError: when one does not hold (or anything the rewrite raised).
    """
    original = case.message
    result = rewrite(original, PIXEL_URL, case.policy, reverse_path=case.reverse_path)
    assert isinstance(result, RewriteResult)
    out = result.message
    control = case.policy.control_header
    try:
        change = check(original, result, PIXEL_URL, control_header=control)
    except AssertionError:
        if not (result.tracked and _check_wide_charset(original, out, control)):
            raise
        change = None
    if result.reason == "rewrite-failed":
        return result
    base_header = header_section(without_control_header(original, control))
    assert out.startswith(base_header), "the top-level header section changed"
    if change is not None:  # tracked: the header section, less the control field, is kept
        assert header_section(out) == base_header, "the header section's extent changed"
    if out != original:  # else it parses exactly as well as the input
        after = parse_fully(out)
        if after is not None:
            assert parse_fully(original) is not None, f"the output no longer parses: {after}"
    return result


_WIDE = re.compile(r"utf-?(16|32)", re.IGNORECASE)


def _check_wide_charset(original: bytes, out: bytes, control: str) -> bool:
    """For a pixel in a UTF-16/32 part, which :func:`check` reads as octets: check the text.

    :returns: False when the change is not in one such part (the caller's
        failure stands); True when the text gained exactly the pixel tag.
    :raises AssertionError: when it is in one and the text is wrong.
    """
    old_parts, new_parts = leaves(without_control_header(original, control)), leaves(out)
    if len(old_parts) != len(new_parts):
        return False
    changed = [
        (old, new)
        for old, new in zip(old_parts, new_parts, strict=True)
        if not old.is_multipart() and old.get_payload() != new.get_payload()
    ]
    if len(changed) != 1:
        return False
    old, new = changed[0]
    charset = old.get_content_charset()
    if charset is None or not _WIDE.match(charset):
        return False
    codec = codecs.lookup(charset).name
    old_text = decoded_payload(old).decode(codec, "replace")
    new_text = decoded_payload(new).decode(codec, "replace")
    escaped = html.escape(PIXEL_URL, quote=True)
    tags = re.findall(r'<img\s+src="' + re.escape(escaped) + r'"[^>]*>', new_text)
    assert len(tags) == 1 and escaped not in old_text, f"{len(tags)} pixels in the {codec} part"
    assert new_text.replace(tags[0], "", 1) == old_text, "text changed beyond the pixel"
    assert old.items() == new.items(), "part headers changed"
    return True


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- running -------------------------------------------------------------------------------


def save_crash(message: bytes, directory: Path = CRASH_DIR) -> Path:
    """Write a failing input to *directory* (made if missing); its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{_sha(message)}.eml"
    path.write_bytes(message)
    return path


class InternalErrors(logging.Handler):
    """Collects the rewrite's internal errors (caught by its fail-open) from its log.

    :ivar found: ``(exception name, file:line)`` -> the first input that raised it.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.found: dict[tuple[str, str], bytes] = {}
        self.current = b""

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("rewrite failed (") and isinstance(record.args, tuple):
            key = (str(record.args[0]), str(record.args[1]))
            self.found.setdefault(key, self.current)


def _hypothesis_run(runs: int, seed: int | None, *, strict: bool, crash_dir: Path) -> int:
    internal = InternalErrors()
    mime_log = logging.getLogger("smtp_tracker.mime")
    mime_log.addHandler(internal)
    propagate, mime_log.propagate = mime_log.propagate, False  # the counts say it all
    try:
        return _run_target(runs, seed, strict=strict, crash_dir=crash_dir, internal=internal)
    finally:
        mime_log.removeHandler(internal)
        mime_log.propagate = propagate


def _run_target(
    runs: int, seed: int | None, *, strict: bool, crash_dir: Path, internal: InternalErrors
) -> int:
    last_failure: list[FuzzCase] = []
    count = [0]
    reasons: collections.Counter[str] = collections.Counter()

    @settings(
        max_examples=runs,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        derandomize=False,
        print_blob=True,
    )
    @given(fuzz_cases())
    def target(case: FuzzCase) -> None:
        count[0] += 1
        internal.current = case.message
        try:
            result = check_rewrite(case)
        except BaseException:
            last_failure[:] = [case]
            raise
        reasons[result.reason or "tracked"] += 1
        if count[0] % 10_000 == 0:
            seconds = time.monotonic() - started
            rate = count[0] / seconds
            print(f"fuzz: {count[0]} inputs, {seconds:.0f} s, {rate:.0f}/s", flush=True)

    if seed is not None:
        target = hypothesis_seed(seed)(target)
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # a summary on SIGTERM
    interrupted = False
    try:
        target()
    except KeyboardInterrupt:
        interrupted = True
    except Exception as exc:
        signal.signal(signal.SIGTERM, previous)
        path = save_crash(last_failure[0].message, crash_dir) if last_failure else None
        traceback.print_exception(exc)  # with Hypothesis' notes: the falsifying case
        print(f"fuzz: FAILED after {count[0]} inputs: {type(exc).__name__}: {exc}", file=sys.stderr)
        if path is not None:
            print(f"fuzz: input saved as {path} (policy and reverse-path above)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, previous)
    elapsed = time.monotonic() - started
    print(
        f"fuzz: {count[0]} inputs from {len(seeds())} seeds in {elapsed:.0f} s "
        f"({count[0] / elapsed:.0f}/s), no invariant broken"
        + (" (interrupted)" if interrupted else "")
    )
    print("fuzz: outcomes: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    for (name, where), message in sorted(internal.found.items()):
        path = save_crash(message, crash_dir)
        print(f"fuzz: internal error {name} at {where} (failed open), e.g. {path}")
    return 1 if strict and internal.found else 0


def _atheris_run(libfuzzer_args: Sequence[str], *, crash_dir: Path) -> int:
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        print("fuzz: atheris is not installed (pip install atheris)", file=sys.stderr)
        return 2
    corpus_dir = CRASH_DIR.parent / "seeds-rewrite"
    corpus_dir.mkdir(exist_ok=True)
    for seed in seeds():
        (corpus_dir / f"{_sha(seed)}.eml").write_bytes(seed)
    policies = [RewritePolicy(), RewritePolicy(dkim_policy="track")]

    def one_input(data: bytes) -> None:
        for policy in policies:
            check_rewrite(FuzzCase(data, policy, "sender@example.org"))

    mime_log = logging.getLogger("smtp_tracker.mime")
    mime_log.propagate = False  # a fail-open warning per odd input drowns libFuzzer's lines
    crash_dir.mkdir(parents=True, exist_ok=True)
    atheris.instrument_all()  # coverage of every module loaded so far, smtp_tracker's included
    argv = [sys.argv[0], f"-artifact_prefix={crash_dir}/", *libfuzzer_args, str(corpus_dir)]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()  # exits the process: libFuzzer's status
    return 0


def reproduce(path: Path) -> int:
    """Run :func:`check_rewrite` on one file with each policy and reverse-path the fuzzer draws."""
    message = path.read_bytes()
    failures = 0
    for dkim_policy in ("skip", "track"):
        for opt_in in (False, True):
            for reverse_path in (None, "sender@example.org", ""):
                policy = RewritePolicy(dkim_policy=dkim_policy, tracking_requires_opt_in=opt_in)
                try:
                    result = check_rewrite(FuzzCase(message, policy, reverse_path))
                except AssertionError as exc:
                    failures += 1
                    print(f"FAIL {policy!r} reverse_path={reverse_path!r}: {exc}")
                else:
                    print(f"ok   tracked={result.tracked} reason={result.reason}")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; the exit status (0 no failure, 1 a failure, 2 usage)."""
    parser = argparse.ArgumentParser(
        prog="python -m fuzz.rewrite_target", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--runs", type=int, default=200_000, help="inputs to try (Hypothesis)")
    parser.add_argument("--seed", type=int, help="Hypothesis random seed, to repeat a run")
    parser.add_argument("--engine", choices=["hypothesis", "atheris"], default="hypothesis")
    parser.add_argument("--reproduce", type=Path, metavar="FILE", help="check one saved input")
    parser.add_argument(
        "--crash-dir", type=Path, default=CRASH_DIR, help="where failing inputs are written"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 also when the rewrite caught an internal error (it failed open)",
    )
    parser.add_argument("libfuzzer_args", nargs="*", help="after --: libFuzzer flags (atheris)")
    args = parser.parse_args(argv)
    if args.reproduce is not None:
        return reproduce(args.reproduce)
    if args.engine == "atheris":
        return _atheris_run(args.libfuzzer_args, crash_dir=args.crash_dir)
    return _hypothesis_run(args.runs, args.seed, strict=args.strict, crash_dir=args.crash_dir)


if __name__ == "__main__":
    raise SystemExit(main())
