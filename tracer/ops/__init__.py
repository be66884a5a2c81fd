"""ops: see docs/ARCHITECTURE.md."""
