"""Shared pytest configuration: the engine fixtures live in tests/support/fixtures.py."""

pytest_plugins = ["tests.support.fixtures"]
