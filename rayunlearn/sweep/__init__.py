"""Sweep helpers: search spaces (space.py), preparation (prepare.py), a synthetic trainable."""
