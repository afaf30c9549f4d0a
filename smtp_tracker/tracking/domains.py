"""Which envelopes may be tracked: include and exclude lists of sender and recipient domains.

The decision is made on the SMTP envelope alone (RFC 5321 §3.3: the
reverse-path of MAIL and the forward-paths of RCPT), before the message
content is looked at.  The rules, in this order:

1. an excluded sender domain: ``"sender-domain-excluded"``;
2. any excluded recipient domain: ``"recipient-domain-excluded"``;
3. a non-empty sender include list the sender's domain is not on:
   ``"sender-domain-not-included"``;
4. a non-empty recipient include list that some recipient's domain is not
   on: ``"recipient-domain-not-included"``.

Exclusion wins over inclusion.  Every forward-path of the transaction must
pass: one pixel serves all the recipients of a transaction, so tracking it
would track a recipient the lists exclude.

A listed domain matches itself and every subdomain (``example.com`` matches
``mail.example.com``, not ``badexample.com``).  Domains are compared in one
form: IDNA 2008 A-labels with the UTS #46 mapping, lower case, without a
trailing dot (``Bücher.Example.`` and ``xn--bcher-kva.example`` are the same
domain).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import idna

__all__ = ["DomainPolicy", "address_domain", "normalise_domain"]


def normalise_domain(domain: str) -> str:
    """``domain`` as compared: A-labels (IDNA 2008, UTS #46 mapping), lower case, no final dot.

    An address literal (``[192.0.2.1]``, RFC 5321 §4.1.3) is only lower-cased.

    :raises ValueError: when ``domain`` is empty or not a valid domain name.
    """
    text = domain.strip().rstrip(".")
    if not text:
        raise ValueError(f"{domain!r} is not a domain name")
    if text.startswith("[") and text.endswith("]"):
        return text.lower()
    try:
        return idna.encode(text, uts46=True).decode("ascii").lower()
    except idna.IDNAError as exc:
        raise ValueError(f"{domain!r} is not a domain name ({exc})") from None


def address_domain(address: str) -> str:
    """The normalised domain of a mailbox (``local@domain``), ``""`` when it has none.

    Never raises: a domain that is not a valid IDNA name (an underscore, say)
    is compared lower-cased as written.
    """
    _local, at, domain = address.strip().strip("<>").rpartition("@")
    if not at or not domain:
        return ""
    try:
        return normalise_domain(domain)
    except ValueError:
        return domain.strip().rstrip(".").lower()


def _matches(domain: str, listed: frozenset[str]) -> bool:
    """Whether ``domain`` is a listed domain or a subdomain of one."""
    if not domain:
        return False
    if domain in listed:
        return True
    labels = domain.split(".")
    return any(".".join(labels[i:]) in listed for i in range(1, len(labels)))


def _normalised(domains: Iterable[str], what: str) -> frozenset[str]:
    out: set[str] = set()
    for domain in domains:
        try:
            out.add(normalise_domain(domain))
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
    return frozenset(out)


@dataclass(frozen=True, slots=True, init=False)
class DomainPolicy:
    """Include and exclude lists of sender and recipient domains.

    Build it with lists of domain names as written in the configuration;
    they are normalised once (see :func:`normalise_domain`).  An empty
    policy tracks every envelope.

    :raises ValueError: when a listed name is not a domain name; the message
        names the list.
    """

    include_sender_domains: frozenset[str]
    exclude_sender_domains: frozenset[str]
    include_recipient_domains: frozenset[str]
    exclude_recipient_domains: frozenset[str]

    def __init__(
        self,
        *,
        include_sender_domains: Iterable[str] = (),
        exclude_sender_domains: Iterable[str] = (),
        include_recipient_domains: Iterable[str] = (),
        exclude_recipient_domains: Iterable[str] = (),
    ) -> None:
        lists = {
            "include_sender_domains": include_sender_domains,
            "exclude_sender_domains": exclude_sender_domains,
            "include_recipient_domains": include_recipient_domains,
            "exclude_recipient_domains": exclude_recipient_domains,
        }
        for name, domains in lists.items():
            object.__setattr__(self, name, _normalised(domains, name))

    @property
    def empty(self) -> bool:
        """Whether no list is set (every envelope passes)."""
        return not (
            self.include_sender_domains
            or self.exclude_sender_domains
            or self.include_recipient_domains
            or self.exclude_recipient_domains
        )

    def not_tracked_reason(self, reverse_path: str, forward_paths: Sequence[str]) -> str | None:
        """Why an envelope must not be tracked, or None when the lists allow it.

        :param reverse_path: the MAIL FROM address (``""`` for ``<>``).
        :param forward_paths: every RCPT TO address the message goes to.
        :returns: ``"sender-domain-excluded"``, ``"recipient-domain-excluded"``,
            ``"sender-domain-not-included"``, ``"recipient-domain-not-included"``
            (the first rule that applies, in that order) or None.  An address
            without a domain is on no list.
        """
        if self.empty:
            return None
        sender = address_domain(reverse_path)
        recipients = [address_domain(address) for address in forward_paths]
        if _matches(sender, self.exclude_sender_domains):
            return "sender-domain-excluded"
        if any(_matches(domain, self.exclude_recipient_domains) for domain in recipients):
            return "recipient-domain-excluded"
        if self.include_sender_domains and not _matches(sender, self.include_sender_domains):
            return "sender-domain-not-included"
        if self.include_recipient_domains and not all(
            _matches(domain, self.include_recipient_domains) for domain in recipients
        ):
            return "recipient-domain-not-included"
        return None
