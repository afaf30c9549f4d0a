"""Relay fixtures for the end-to-end tests."""

from tests.support.relay import client, relay, relay_factory

__all__ = ["client", "relay", "relay_factory"]
