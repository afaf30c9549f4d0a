"""What of a client's IP address the store keeps: the ``ip_policy``.

=============  ==============================================================
``"full"``     the address itself, normalised (``"192.0.2.7"``, ``"2001:db8::1"``)
``"truncate"`` its network: /24 for IPv4, /48 for IPv6 (the usual site prefix,
               RFC 6177 §2 over the RFC 4291 §2.5.4 global routing prefix),
               written ``"192.0.2.0/24"``, ``"2001:db8:1::/48"``
``"hash"``     HMAC-SHA256 (RFC 2104) of the packed address under a secret
               key, as 64 lower-case hex digits: stable per address and key,
               not reversible without the key
``"none"``     nothing (``None``)
=============  ==============================================================

IPv4-mapped IPv6 addresses (``::ffff:192.0.2.7``, RFC 4291 §2.5.5.2, which a
dual-stack socket reports) are treated as the IPv4 address.  A client address
that is missing or does not parse is stored as ``None`` under every policy.

The hash key lives in ``DATA_DIR/ip-hash.key`` (64 hex digits, mode 0600),
created on first use; losing it makes old and new hashes incomparable.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import os
import secrets
from pathlib import Path
from typing import Final, Literal, get_args

from smtp_tracker.errors import StoreError

__all__ = [
    "HASH_KEY_FILENAME",
    "IP_POLICIES",
    "AddressPolicy",
    "IpPolicy",
    "load_or_create_hash_key",
]

IpPolicy = Literal["full", "truncate", "hash", "none"]
IP_POLICIES: Final[tuple[str, ...]] = get_args(IpPolicy)

HASH_KEY_FILENAME = "ip-hash.key"
_KEY_BYTES = 32
_IPV4_PREFIX = 24
_IPV6_PREFIX = 48


class AddressPolicy:
    """Applies one ``ip_policy`` to client addresses.

    :param policy: one of :data:`IP_POLICIES`.
    :param hash_key: the HMAC key, required for ``"hash"`` (at least 16 bytes).
    :raises ValueError: when *policy* is unknown or the key is missing or short.
    """

    __slots__ = ("_key", "policy")

    def __init__(self, policy: IpPolicy, *, hash_key: bytes | None = None) -> None:
        if policy not in IP_POLICIES:
            raise ValueError(f"ip_policy must be one of {', '.join(IP_POLICIES)}, got {policy!r}")
        if policy == "hash" and (hash_key is None or len(hash_key) < 16):
            raise ValueError("ip_policy 'hash' needs a key of at least 16 bytes")
        self.policy: IpPolicy = policy
        self._key = hash_key if policy == "hash" else None

    def __repr__(self) -> str:  # never show the key
        return f"AddressPolicy({self.policy!r})"

    def apply(self, address: str | None) -> str | None:
        """The value to store for *address* (see the module docstring)."""
        if self.policy == "none" or address is None:
            return None
        if self.policy == "truncate":
            fast = _truncate_ipv4(address)
            if fast is not None:
                return fast
        try:
            ip = ipaddress.ip_address(address.strip().split("%", 1)[0])
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self.policy == "full":
            return str(ip)
        if self.policy == "truncate":
            prefix = _IPV4_PREFIX if ip.version == 4 else _IPV6_PREFIX
            return str(ipaddress.ip_network((ip, prefix), strict=False))
        assert self._key is not None
        return hmac.new(self._key, ip.packed, hashlib.sha256).hexdigest()


def _truncate_ipv4(address: str) -> str | None:
    """``"a.b.c.0/24"`` for a plain dotted-quad IPv4 *address*, else ``None``.

    The common case of :meth:`AddressPolicy.apply` without :mod:`ipaddress`'s
    parsing (a third of the cost of recording an open); anything unusual
    (spaces, zone, IPv6, leading zeros, out-of-range octets) returns ``None``
    and takes the general path.
    """
    if _IPV4_PREFIX != 24:  # the fast path keeps whole octets
        return None
    parts = address.split(".")
    if len(parts) != 4:
        return None
    for part in parts:
        if not (part.isdigit() and part.isascii() and len(part) <= 3):
            return None
        if int(part) > 255 or (len(part) > 1 and part[0] == "0"):
            return None
    return f"{parts[0]}.{parts[1]}.{parts[2]}.0/{_IPV4_PREFIX}"


def load_or_create_hash_key(path: Path) -> bytes:
    """Read the HMAC key at *path*, creating it (mode 0600) when absent.

    Creation is atomic and safe when two processes race: the key is written to
    a private temporary file and hard-linked into place, so a reader never sees
    a partial key and the first writer wins.  Blocking: call it from a thread.

    :returns: the 32-byte key.
    :raises StoreError: when the file cannot be read or written or is malformed.
    """
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (secrets.token_hex(_KEY_BYTES) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):  # another process won: use its key
            os.link(tmp, path)
        return _read_key(path)
    except OSError as exc:
        raise StoreError(f"cannot create {path}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _read_key(path: Path) -> bytes:
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != _KEY_BYTES:
        raise StoreError(f"{path} is not a {_KEY_BYTES}-byte hex key; restore it or remove it")
    return key
