"""The msixhub wire format: framed msgpack with fd passing (sans-IO core, thin trio adapter)."""
