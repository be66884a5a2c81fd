"""decode: see docs/ARCHITECTURE.md."""
