"""Root fixtures: session certificates, the upstream test server, a private Postfix.

Certificates (session scope): ``ca``, ``server_cert``, ``server_ssl_context``,
``client_ssl_context``, ``ca_pem_path``, ``cert_pem_path``, ``key_pem_path`` and,
from a second CA nobody trusts, ``untrusted_ca``, ``untrusted_cert``,
``untrusted_server_ssl_context``, ``untrusted_cert_pem_path``, ``untrusted_key_pem_path``.

``upstream`` (function scope): a started :class:`~tests.support.upstream.UpstreamServer`
scripted by ``@pytest.mark.upstream(...)``.

``postfix_factory`` (function scope): ``await postfix_factory(relay_port, **main_cf)``
starts a private :class:`~tests.support.postfix.Postfix`; skipped when Postfix is
not installed.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trustme
from hypothesis import settings

from tests.support import certificates, postgres
from tests.support.postfix import Postfix, missing_reason
from tests.support.upstream import UpstreamServer, options_from_markers

# No example is timed (Hypothesis's default gives each 200 ms): the tests bound
# work, not the wall clock, and a loaded CI machine must not fail one that is slow.
settings.register_profile("smtp-tracker", deadline=None)
settings.load_profile("smtp-tracker")

PostfixFactory = Callable[..., Awaitable[Postfix]]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip ``@pytest.mark.postfix`` tests, with the reason, where Postfix cannot run."""
    if item.get_closest_marker("postfix") is not None:
        reason = missing_reason()
        if reason is not None:
            pytest.skip(reason)


# -- certificates --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """The CA the tests trust."""
    return trustme.CA(organization_name="smtp-tracker tests")


@pytest.fixture(scope="session")
def server_cert(ca: trustme.CA) -> trustme.LeafCert:
    """Issued by ``ca`` for localhost, 127.0.0.1 and ::1."""
    return ca.issue_cert(*certificates.SERVER_NAMES)


@pytest.fixture(scope="session")
def certificate_files(
    ca: trustme.CA, server_cert: trustme.LeafCert, tmp_path_factory: pytest.TempPathFactory
) -> certificates.CertificateFiles:
    return certificates.write_files(ca, server_cert, tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def server_ssl_context(server_cert: trustme.LeafCert) -> ssl.SSLContext:
    return certificates.server_context(server_cert)


@pytest.fixture(scope="session")
def client_ssl_context(ca: trustme.CA) -> ssl.SSLContext:
    """Trusts ``ca`` only; checks host names."""
    return certificates.client_context(ca)


@pytest.fixture(scope="session")
def ca_pem_path(certificate_files: certificates.CertificateFiles) -> Path:
    return certificate_files.ca


@pytest.fixture(scope="session")
def cert_pem_path(certificate_files: certificates.CertificateFiles) -> Path:
    """The server certificate chain, leaf first."""
    return certificate_files.cert


@pytest.fixture(scope="session")
def key_pem_path(certificate_files: certificates.CertificateFiles) -> Path:
    """The server key, mode 0600."""
    return certificate_files.key


@pytest.fixture(scope="session")
def untrusted_ca() -> trustme.CA:
    """A CA no test client trusts."""
    return trustme.CA(organization_name="nobody trusts this")


@pytest.fixture(scope="session")
def untrusted_cert(untrusted_ca: trustme.CA) -> trustme.LeafCert:
    return untrusted_ca.issue_cert(*certificates.SERVER_NAMES)


@pytest.fixture(scope="session")
def untrusted_certificate_files(
    untrusted_ca: trustme.CA,
    untrusted_cert: trustme.LeafCert,
    tmp_path_factory: pytest.TempPathFactory,
) -> certificates.CertificateFiles:
    return certificates.write_files(
        untrusted_ca, untrusted_cert, tmp_path_factory.mktemp("untrusted-certs")
    )


@pytest.fixture(scope="session")
def untrusted_server_ssl_context(untrusted_cert: trustme.LeafCert) -> ssl.SSLContext:
    return certificates.server_context(untrusted_cert)


@pytest.fixture(scope="session")
def untrusted_cert_pem_path(untrusted_certificate_files: certificates.CertificateFiles) -> Path:
    return untrusted_certificate_files.cert


@pytest.fixture(scope="session")
def untrusted_key_pem_path(untrusted_certificate_files: certificates.CertificateFiles) -> Path:
    return untrusted_certificate_files.key


# -- the upstream test server --------------------------------------------------------------


@pytest.fixture
async def upstream(
    request: pytest.FixtureRequest,
    server_ssl_context: ssl.SSLContext,
    untrusted_server_ssl_context: ssl.SSLContext,
    ca_pem_path: Path,
) -> AsyncIterator[UpstreamServer]:
    """The smarthost on 127.0.0.1, started unless ``refuse=True``; stopped at teardown."""
    options = options_from_markers(request.node.iter_markers("upstream"))
    server = UpstreamServer(
        options=options,
        tls_context=server_ssl_context,
        untrusted_tls_context=untrusted_server_ssl_context,
        ca_file=ca_pem_path,
    )
    try:
        if not options.refuse:
            await server.start()
        yield server
    finally:
        await server.close()
    server.raise_errors()


# -- a private Postfix ---------------------------------------------------------------------


@pytest.fixture
async def postfix_factory(tmp_path: Path) -> AsyncIterator[PostfixFactory]:
    """``await postfix_factory(relay_port, **main_cf_overrides)``: a started private Postfix.

    Each instance is stopped (``postfix -c DIR stop``) and removed at teardown;
    its maillog is kept as ``tmp_path / "postfix-N.maillog"``.
    """
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    started: list[Postfix] = []

    async def make(relay_port: int, **main_cf_overrides: str | int | bool) -> Postfix:
        instance = await Postfix.create(relay_port, main_cf_overrides)
        started.append(instance)
        return instance

    try:
        yield make
    finally:
        for number, instance in enumerate(started, 1):
            await instance.destroy(keep_log=tmp_path / f"postfix-{number}.maillog")


@pytest.fixture
def own_pg_cluster() -> Iterator[postgres.Cluster]:
    """A private PostgreSQL cluster of one test's own, which it may stop and start again
    (outages); skips with the reason when PostgreSQL is not installed."""
    reason = postgres.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = postgres.start_cluster()
    try:
        yield cluster
    finally:
        postgres.remove_cluster(cluster)
