"""The hub: the pure MSI-X capability model, the route table, and the trio server that owns them."""
