from __future__ import annotations

from tests.support.relay import relay_factory

__all__ = ["relay_factory"]
