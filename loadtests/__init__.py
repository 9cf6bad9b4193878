"""Bundled load and fault scenarios (loopback only, bounded duration)."""
