"""match: see docs/ARCHITECTURE.md."""
