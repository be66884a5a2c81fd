"""enrich: see docs/ARCHITECTURE.md."""
