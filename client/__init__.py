"""The VMM client library, its guest-driver toolkit, and the ``msixhub`` command line."""
