"""OpenDKIM's KeyTable and SigningTable, read as OpenDKIM reads them.

An admin points smtp-tracker at the files their signer already uses
(``opendkim.conf(5)``, ``KeyTable`` and ``SigningTable``):

- **KeyTable**: one key a line, ``keyname domain:selector:key``, where ``key``
  is a path to the key file when it starts with ``/``, ``./`` or ``../``
  (relative paths are taken from the KeyTable's directory), else the key
  itself (PEM, or base64 DER / Ed25519 seed).  Base64 key data that happens to
  start with ``/`` and names no file is read as the key.
- **SigningTable**: ``pattern keyname`` a line; plain (``file:`` or no prefix)
  or ``refile:``, where ``*`` in a pattern matches any run of characters.  It
  decides which key OpenDKIM signs a sender's mail with; smtp-tracker reads it
  to check that every key name it gives exists and to report which senders each
  key covers (:meth:`Keyring.key_names_for`).

``#`` starts a comment; blank lines are skipped.  Only flat files are read
(not ``db:``, ``ldap:``, ``csl:`` ... data sets).  Every problem is reported
at once, one line each, naming the file and line.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from smtp_tracker.dkim.keys import DkimKey, DkimKeyError, load_key, parse_key
from smtp_tracker.errors import ConfigError

__all__ = [
    "Keyring",
    "SigningEntry",
    "describe_key",
    "load_keyring",
    "read_data_set_name",
]

_FILE_PREFIXES = ("file:", "refile:")
_OTHER_DATA_SETS = re.compile(r"^(db|dsn|ldap|ldaps|ldapi|lua|memcache|mdb|erlang|csl|rep):")
#: A domain or selector: dot-separated LDH labels (RFC 6376 §3.1, §3.5 d=).
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


@dataclass(frozen=True, slots=True)
class SigningEntry:
    """One SigningTable line: a sender pattern and the key name it signs with."""

    pattern: str
    key_name: str
    line: int


@dataclass(slots=True)
class Keyring:
    """The keys smtp-tracker may re-sign with, found by ``d=`` and ``s=``.

    :ivar keys: each key by ``(domain, selector)``, lower case.
    :ivar names: each KeyTable key name's ``(domain, selector)``.
    :ivar signing: the SigningTable's lines, in order (empty without one).
    :ivar signing_regex: whether the SigningTable is a ``refile:``.
    """

    keys: dict[tuple[str, str], DkimKey] = field(default_factory=dict)
    names: dict[str, tuple[str, str]] = field(default_factory=dict)
    signing: list[SigningEntry] = field(default_factory=list)
    signing_regex: bool = False

    def find(self, domain: str, selector: str) -> DkimKey | None:
        """The key for a signature's ``d=`` and ``s=`` (case-insensitive), if held."""
        return self.keys.get((domain.lower(), selector.lower()))

    def key_names_for(self, address: str) -> list[str]:
        """The key names the SigningTable gives a sender ``address``, first match first.

        Plain table: ``user@host``, ``host``, ``user@.parent`` and ``.parent`` for each
        parent domain, ``user@*``, then ``*`` (``opendkim.conf(5)``); ``refile:``:
        every pattern in file order, ``*`` matching any run of characters.
        """
        address = address.lower()
        if self.signing_regex:
            return [e.key_name for e in self.signing if fnmatch.fnmatchcase(address, e.pattern)]
        user, _, host = address.rpartition("@")
        labels = host.split(".")
        candidates = [address, host]
        for i in range(1, len(labels)):
            parent = ".".join(labels[i:])
            candidates += [f"{user}@.{parent}", f".{parent}"]
        candidates += [f"{user}@*", "*"]
        found: list[str] = []
        for candidate in candidates:
            found += [e.key_name for e in self.signing if e.pattern == candidate]
        return found

    def unused_key_names(self) -> list[str]:
        """KeyTable names no SigningTable line uses (none when there is no SigningTable)."""
        if not self.signing:
            return []
        used = {e.key_name for e in self.signing}
        return [name for name in self.names if name not in used]


def read_data_set_name(spec: str | Path) -> tuple[Path, bool]:
    """Split an OpenDKIM data set name into its file and whether it is a ``refile:``.

    :raises ConfigError: for data set kinds other than flat files.
    """
    text = str(spec)
    if _OTHER_DATA_SETS.match(text):
        raise ConfigError(f"{text}: only flat files (file: or refile:) are read")
    for prefix in _FILE_PREFIXES:
        if text.startswith(prefix):
            return Path(text[len(prefix) :]), prefix == "refile:"
    return Path(text), False


def _lines(path: Path, problems: list[str]) -> Iterable[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problems.append(f"{path}: cannot read the table ({exc.strerror})")
        return
    except UnicodeDecodeError:
        problems.append(f"{path}: not UTF-8 text")
        return
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            yield number, line


_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def _inline_key(
    key_text: str, key_path: Path, domain: str, selector: str, where: str
) -> DkimKey | None:
    """The key a KeyTable value starting with ``/`` holds inline, or None if it is a path.

    Base64 uses ``/`` as a digit, so one Ed25519 seed (or DER key) in 64 starts
    with it, and OpenDKIM's rule (``opendkim.conf(5)``: a value starting with
    ``/`` names a file) would make such a key impossible to write inline.  The
    value is key data only when no file of that name exists, it is base64
    (RFC 4648 section 4) and it reads as a key; anything else stays a path, so
    a missing key file is still reported as one.
    """
    if not key_text.startswith("/") or len(key_text) % 4 or not _BASE64.fullmatch(key_text):
        return None
    if key_path.exists():
        return None
    try:
        return parse_key(key_text.encode("ascii"), domain=domain, selector=selector, source=where)
    except DkimKeyError:
        return None


def _key_table(path: Path, keyring: Keyring, problems: list[str], warnings: list[str]) -> None:
    for number, line in _lines(path, problems):
        where = f"{path}:{number}"
        name, *rest = line.split(None, 1)
        value = rest[0] if rest else ""
        fields = value.split(":", 2)
        if len(fields) != 3 or not all(fields):
            problems.append(f"{where}: expected 'keyname domain:selector:keyfile', got {line!r}")
            continue
        domain, selector, key_text = (f.strip() for f in fields)
        if domain == "%":
            problems.append(
                f"{where}: a '%' domain (the sender's) is not supported: name the domain"
            )
            continue
        if not _NAME.match(domain) or not _NAME.match(selector):
            problems.append(f"{where}: {domain!r}:{selector!r} is not a domain and selector")
            continue
        if name in keyring.names:
            problems.append(f"{where}: key name {name!r} is already defined")
            continue
        domain, selector = domain.lower(), selector.lower()
        try:
            if key_text.startswith(("/", "./", "../")):
                key_path = Path(key_text)
                if not key_path.is_absolute():
                    key_path = path.parent / key_path
                key = _inline_key(key_text, key_path, domain, selector, where) or load_key(
                    key_path, domain=domain, selector=selector, warnings=warnings
                )
            else:
                key = parse_key(
                    key_text.encode("ascii", "replace"),
                    domain=domain,
                    selector=selector,
                    source=where,
                )
        except DkimKeyError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if (domain, selector) in keyring.keys:
            problems.append(f"{where}: a second key for {domain}:{selector}")
            continue
        keyring.names[name] = (domain, selector)
        keyring.keys[(domain, selector)] = key


def _signing_table(path: Path, keyring: Keyring, problems: list[str]) -> None:
    for number, line in _lines(path, problems):
        where = f"{path}:{number}"
        parts = line.split()
        if len(parts) != 2:
            problems.append(f"{where}: expected 'pattern keyname', got {line!r}")
            continue
        pattern, key_name = parts
        if key_name not in keyring.names:
            problems.append(f"{where}: key name {key_name!r} is not in the KeyTable")
            continue
        keyring.signing.append(SigningEntry(pattern.lower(), key_name, number))


def load_keyring(
    key_table: str | Path,
    signing_table: str | Path | None = None,
    *,
    warnings: list[str] | None = None,
) -> Keyring:
    """Read the KeyTable (and SigningTable) and every key they name.

    :param key_table: the KeyTable's data set name (``/path``, ``file:/path``).
    :param signing_table: the SigningTable's (``/path``, ``file:/path``, ``refile:/path``).
    :param warnings: receives non-fatal findings (key files readable by others,
        keys no SigningTable line uses).
    :raises ConfigError: with one line per problem, each naming the file and line.
    """
    warnings = [] if warnings is None else warnings
    problems: list[str] = []
    keyring = Keyring()
    try:
        key_path, _ = read_data_set_name(key_table)
    except ConfigError as exc:
        raise ConfigError(*(f"dkim_key_table: {p}" for p in exc.problems)) from None
    _key_table(key_path, keyring, problems, warnings)
    if signing_table is not None:
        try:
            signing_path, keyring.signing_regex = read_data_set_name(signing_table)
        except ConfigError as exc:
            problems.extend(f"dkim_signing_table: {p}" for p in exc.problems)
        else:
            _signing_table(signing_path, keyring, problems)
    if not problems and not keyring.keys:
        problems.append(f"{key_path}: the KeyTable names no key")
    if problems:
        raise ConfigError(*problems)
    for name in keyring.unused_key_names():
        warnings.append(f"{key_path}: key name {name!r} is used by no SigningTable line")
    return keyring


def describe_key(key: DkimKey) -> str:
    """One line for ``check-config``: ``example.com:sel rsa-sha256 2048 bits (FILE)``."""
    return f"{key.domain}:{key.selector} {key.algorithm} {key.bits} bits ({key.source})"
