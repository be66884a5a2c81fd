"""kernel: see docs/ARCHITECTURE.md."""
