"""Fixtures of the code-location tests: the session-wide pipeline materialization (``pipeline``)
comes from ``tests/conftest.py`` so tests/assets and tests/ui share ONE materialization."""
