"""Fault-injection toolkit for users: fixtures, process faults, channel faults, resource faults."""
