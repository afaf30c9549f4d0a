from __future__ import annotations

from tests.store.conftest import pg_cluster, pg_dsn
from tests.support.relay import relay_factory

__all__ = ["pg_cluster", "pg_dsn", "relay_factory"]
