"""gpu: see docs/ARCHITECTURE.md."""
