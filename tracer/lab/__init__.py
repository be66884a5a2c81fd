"""lab: see docs/ARCHITECTURE.md."""
