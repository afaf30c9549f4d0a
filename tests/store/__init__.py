"""Tests of smtp_tracker.store."""
