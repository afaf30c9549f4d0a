"""Fuzz targets, run by hand (``python -m fuzz.rewrite_target``); a short run is in the tests."""
