"""Tests of smtp_tracker.web and smtp_tracker.tls."""
