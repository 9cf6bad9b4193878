"""The HTTP layer: thin routes that parse, call the core, and serialise."""
