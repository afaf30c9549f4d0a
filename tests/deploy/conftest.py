"""Relay fixtures for the deployment tests (metrics)."""

from tests.support.relay import client, relay, relay_factory

__all__ = ["client", "relay", "relay_factory"]
