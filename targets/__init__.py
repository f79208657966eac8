"""Target backends, one per deployment target, registered by name."""
