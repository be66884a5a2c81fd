"""sinks: see docs/ARCHITECTURE.md."""
