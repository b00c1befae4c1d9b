"""Shared fixtures. Every wait in a test has a cap (``trio.fail_after``); pytest-timeout is the backstop."""
