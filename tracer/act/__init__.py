"""act: see docs/ARCHITECTURE.md."""
