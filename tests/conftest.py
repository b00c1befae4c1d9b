"""Shared fixtures. Every wait in a test has a cap (``trio.fail_after``); pytest-timeout is the
backstop. The msixhub testing plugin adds the fixtures users get (hub, devices, VMMs, fault
proxy) and ``--msixhub-seed``, printed with every failure."""

pytest_plugins = ["msixhub.testing.fixtures"]
