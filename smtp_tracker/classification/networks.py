"""Network lists: named sets of CIDR networks, shipped as data files, refreshable by the admin.

File format (``smtp_tracker/classification/data/NAME.txt``, and the admin's
overrides in ``DATA_DIR/networks/NAME.txt``)::

    # name: google
    # source: Google, goog.json (IP ranges of Google's own services)
    # url: https://www.gstatic.com/ipranges/goog.json
    # date: 2024-04-25
    # partial: yes, a selection (see below)
    # free text comments anywhere
    66.249.64.0/19
    2001:4860::/32

Header fields are ``# key: value`` comment lines before the first network.
A network is one CIDR per line (a bare address is a /32 or /128); what follows
the first ``,`` or whitespace on a line is ignored, so Apple's
``egress-ip-ranges.csv`` (``CIDR,country,region,city,``) is read as is.
:func:`import_network_list` also reads Google's and Amazon's JSON range files
(``goog.json``, ``cloud.json``, ``ip-ranges.json``).

Lookup
    Each list is compiled into merged, sorted integer ranges per IP version
    (``array('I')`` for IPv4, lists of ints for IPv6); membership is one
    :func:`bisect.bisect_right` on the starts, O(log n).  Parsing the address
    once (:func:`parse_ip`) and asking several lists is the fast path the
    classifier uses.
"""

from __future__ import annotations

import bisect
import contextlib
import ipaddress
import json
import os
import re
import socket
import tempfile
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Final

from smtp_tracker.errors import InputError

__all__ = [
    "NETWORKS_DIRNAME",
    "NetworkList",
    "NetworkListError",
    "ParsedIP",
    "import_network_list",
    "load_networks",
    "packaged_names",
    "parse_ip",
    "parse_network_list",
]

#: The directory under ``DATA_DIR`` holding the admin's imported lists.
NETWORKS_DIRNAME: Final = "networks"

_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")
_HEADER = re.compile(r"#\s*([a-z][a-z-]*)\s*:\s*(.*?)\s*\Z")
_SPLIT = re.compile(r"[,\s]")

#: A parsed client address: (IP version, address as an integer).
ParsedIP = tuple[int, int]


class NetworkListError(InputError):
    """A network list file is malformed, or a list name is not one we know."""


def parse_ip(text: str | None) -> ParsedIP | None:
    """*text* (``"192.0.2.7"``, ``"2001:db8::1"``) as (version, integer), or ``None``.

    An IPv4-mapped IPv6 address (RFC 4291 §2.5.5.2) is taken as its IPv4
    address; a zone id is dropped; anything that is not an address gives ``None``.
    """
    if not text:
        return None
    if ":" not in text:
        try:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text))
        except OSError:
            return None
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text.partition("%")[0]))
    except OSError:
        return None
    if value >> 32 == 0xFFFF:  # ::ffff:a.b.c.d
        return 4, value & 0xFFFFFFFF
    return 6, value


def _span(word: str) -> tuple[int, int, int]:
    """(version, first, last) address of the network *word* (``192.0.2.0/24``, ``2001:db8::``).

    A fast path with :func:`socket.inet_pton` (several times quicker than
    :func:`ipaddress.ip_network`, which counts when a list has 300,000 lines);
    anything it does not take goes to :mod:`ipaddress`, which either reads it
    (netmask forms) or says what is wrong.

    :raises ValueError: when *word* is not a network or has host bits set.
    """
    address, slash, length_text = word.partition("/")
    family, bits = (socket.AF_INET6, 128) if ":" in address else (socket.AF_INET, 32)
    try:
        start = int.from_bytes(socket.inet_pton(family, address))
    except OSError:
        start = -1
    length = int(length_text) if length_text.isdigit() and len(length_text) <= 3 else -1
    if not slash:
        length = bits
    if start < 0 or not 0 <= length <= bits or "%" in address:
        network = ipaddress.ip_network(word)  # raises ValueError with the reason
        return network.version, int(network.network_address), int(network.broadcast_address)
    host = (1 << (bits - length)) - 1
    if start & host:
        raise ValueError(f"{word} has host bits set")
    return (6 if bits == 128 else 4), start, start | host


@dataclass(frozen=True, eq=False, slots=True)
class NetworkList:
    """One named list of networks, compiled for lookup.

    :param name: the list's name (``apple-mpp``), also its file name without ``.txt``.
    :param header: the ``# key: value`` header fields (``source``, ``url``,
        ``date``, ``partial``, ...), keys lower-case.
    :param count: how many networks the file holds (before merging).
    :param origin: where it was read from (``packaged`` or the override's path).
    """

    name: str
    header: Mapping[str, str]
    count: int
    origin: str
    _v4_starts: array[int] = field(repr=False)
    _v4_ends: array[int] = field(repr=False)
    _v6_starts: list[int] = field(repr=False)
    _v6_ends: list[int] = field(repr=False)

    @property
    def source(self) -> str:
        """The ``source`` header field, or ``""``."""
        return self.header.get("source", "")

    @property
    def date(self) -> str:
        """The ``date`` header field (when the data was taken from its source), or ``""``."""
        return self.header.get("date", "")

    def contains(self, ip: ParsedIP | None) -> bool:
        """Whether the parsed address *ip* (:func:`parse_ip`) is in one of the networks."""
        if ip is None:
            return False
        version, value = ip
        if version == 4:
            starts: Any = self._v4_starts
            ends: Any = self._v4_ends
        else:
            starts, ends = self._v6_starts, self._v6_ends
        i = bisect.bisect_right(starts, value) - 1
        return i >= 0 and value <= ends[i]

    def __contains__(self, address: object) -> bool:
        """``"192.0.2.7" in networks``: the same as :meth:`contains` of the parsed text."""
        return isinstance(address, str) and self.contains(parse_ip(address))


def parse_network_list(text: str, *, name: str, origin: str) -> NetworkList:
    """Parse and compile one network list.

    :param text: the file's text (format in the module docstring).
    :param name: the list's name.
    :param origin: where *text* came from, for messages (``packaged``, a path).
    :raises NetworkListError: naming the line, when a line is not a network
        (``origin:LINE: '10.0.0.300/8' is not a CIDR network ...``) or a
        network has host bits set.
    """
    header: dict[str, str] = {}
    seen_network = False
    v4: list[tuple[int, int]] = []
    v6: list[tuple[int, int]] = []
    count = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            match = _HEADER.match(line)
            if match and not seen_network:
                header.setdefault(match[1], match[2])
            continue
        word = _SPLIT.split(line, maxsplit=1)[0]
        try:
            version, start, end = _span(word)
        except ValueError as exc:
            raise NetworkListError(
                f"{origin}:{number}: {word[:80]!r} is not a CIDR network like 192.0.2.0/24 ({exc})"
            ) from None
        seen_network = True
        count += 1
        (v4 if version == 4 else v6).append((start, end))
    v4_starts, v4_ends = _merge(v4)
    v6_starts, v6_ends = _merge(v6)
    return NetworkList(
        name=name,
        header=header,
        count=count,
        origin=origin,
        _v4_starts=array("I", v4_starts),
        _v4_ends=array("I", v4_ends),
        _v6_starts=v6_starts,
        _v6_ends=v6_ends,
    )


def _merge(spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Sorted, merged (overlapping or adjacent) ranges as parallel start and end lists."""
    starts: list[int] = []
    ends: list[int] = []
    for start, end in sorted(spans):
        if ends and start <= ends[-1] + 1:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(start)
            ends.append(end)
    return starts, ends


def _packaged_files() -> Iterator[tuple[str, str]]:
    """(name, text) of every list shipped in the package's ``data`` directory."""
    directory = resources.files("smtp_tracker.classification").joinpath("data")
    for entry in sorted(directory.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".txt") and _NAME.match(entry.name[:-4]):
            yield entry.name[:-4], entry.read_text(encoding="utf-8")


def packaged_names() -> tuple[str, ...]:
    """The names of the lists shipped with the package, sorted."""
    return tuple(name for name, _ in _packaged_files())


def load_networks(data_dir: Path | None = None) -> dict[str, NetworkList]:
    """Every packaged list, each replaced by ``DATA_DIR/networks/NAME.txt`` when that exists.

    Blocking (file reads, parsing a large imported list takes a while): call
    it from a thread when an event loop is running.

    :param data_dir: the data directory, or ``None`` for the packaged lists only.
    :returns: name -> list, in name order.
    :raises NetworkListError: when a file is malformed or cannot be read.
    """
    lists = {
        name: parse_network_list(text, name=name, origin="packaged")
        for name, text in _packaged_files()
    }
    if data_dir is not None:
        directory = data_dir / NETWORKS_DIRNAME
        for name in list(lists):
            path = directory / f"{name}.txt"
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError) as exc:
                raise NetworkListError(f"{path}: cannot read the network list ({exc})") from exc
            lists[name] = parse_network_list(text, name=name, origin=str(path))
    return lists


def import_network_list(data_dir: Path, name: str, source_file: Path) -> NetworkList:
    """Validate *source_file* and make it the list *name*, in ``DATA_DIR/networks/NAME.txt``.

    Reads our text format, CSV whose first column is a CIDR (Apple's
    ``egress-ip-ranges.csv``), or JSON range files with ``prefixes`` of
    ``ipv4Prefix``/``ipv6Prefix`` (Google's ``goog.json``) or
    ``ip_prefix``/``ipv6_prefix`` (Amazon's ``ip-ranges.json``).  The file is
    written with a header (source, date, import time, count) to a temporary
    file beside the target, synced, then renamed over it (atomic: a running
    smtp-tracker reading it sees the old or the new list, never a mix); mode
    0600, directory 0700.  A running ``serve`` reads it at its next start.

    :raises NetworkListError: when *name* is not a packaged list, the file
        cannot be read, has a malformed line, or holds no network at all.
    """
    known = packaged_names()
    if name not in known:
        raise NetworkListError(f"unknown network list {name!r}; known: {', '.join(known)}")
    try:
        raw = source_file.read_text(encoding="utf-8-sig")
        modified = datetime.fromtimestamp(source_file.stat().st_mtime, UTC)
    except (OSError, UnicodeDecodeError) as exc:
        raise NetworkListError(f"{source_file}: cannot read it ({exc})") from exc
    text, found_header = _as_text(raw, origin=str(source_file))
    parsed = parse_network_list(text, name=name, origin=str(source_file))
    if parsed.count == 0:
        raise NetworkListError(f"{source_file}: no network found in it")
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    header = {
        "name": name,
        "source": found_header.get("source") or f"file {source_file.name} given to import",
        "url": found_header.get("url", ""),
        "date": found_header.get("date") or modified.strftime("%Y-%m-%d"),
        "partial": found_header.get("partial", ""),
        "imported": f"{now} by 'smtp-tracker networks import' from {source_file}",
        "count": str(parsed.count),
    }
    # one line each: a line break in a value (a JSON date, the file's name) would add a
    # network nobody validated
    lines = [f"# {key}: {' '.join(value.split())}" for key, value in header.items() if value]
    lines.extend(_networks_of(text))
    target_dir = data_dir / NETWORKS_DIRNAME
    target = target_dir / f"{name}.txt"
    _write_atomically(target, "\n".join(lines) + "\n")
    return parse_network_list(target.read_text(encoding="utf-8"), name=name, origin=str(target))


def _as_text(raw: str, *, origin: str) -> tuple[str, dict[str, str]]:
    """The networks of *raw* in our text format, and the header fields found in it."""
    if not raw.lstrip().startswith(("{", "[")):
        header: dict[str, str] = {}
        for line in raw.splitlines():
            stripped = line.strip()
            if not stripped:
                continue
            if not stripped.startswith("#"):
                break
            match = _HEADER.match(stripped)
            if match:
                header.setdefault(match[1], match[2])
        return raw, header
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise NetworkListError(f"{origin}: not valid JSON ({exc})") from None
    prefixes = document.get("prefixes") if isinstance(document, dict) else None
    if not isinstance(prefixes, list):
        raise NetworkListError(f"{origin}: JSON without a 'prefixes' list (goog.json format)")
    networks: list[str] = []
    keys = ("ipv4Prefix", "ipv6Prefix", "ip_prefix", "ipv6_prefix")
    for entry in prefixes:
        value = next((entry[k] for k in keys if isinstance(entry, dict) and k in entry), None)
        if not isinstance(value, str):
            raise NetworkListError(f"{origin}: a prefix entry without an address: {entry!r:.80}")
        networks.append(value)
    if isinstance(document.get("ipv6_prefixes"), list):  # Amazon keeps IPv6 apart
        for entry in document["ipv6_prefixes"]:
            if isinstance(entry, dict) and isinstance(entry.get("ipv6_prefix"), str):
                networks.append(entry["ipv6_prefix"])
    header = {}
    created = document.get("creationTime") or document.get("createDate")
    if isinstance(created, str):
        header["date"] = created
    return "\n".join(networks), header


def _networks_of(text: str) -> Iterable[str]:
    """The network (first field) of each non-comment line of *text*, already validated."""
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            yield _SPLIT.split(line, maxsplit=1)[0]


def _write_atomically(target: Path, text: str) -> None:
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
        )
    except OSError as exc:
        raise NetworkListError(f"{target.parent}: cannot write there ({exc.strerror})") from exc
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:  # mkstemp: mode 0600
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise NetworkListError(f"{target}: cannot write it ({exc.strerror})") from exc
    with contextlib.suppress(OSError):  # make the rename durable
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
