"""Tests of smtp_tracker.classification."""
