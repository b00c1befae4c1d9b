"""Device daemons: each runs as its own process, maps guest memory and notifies vectors."""
