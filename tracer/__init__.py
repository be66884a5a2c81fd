"""agenttrace: an eBPF tracer for AI-agent processes."""

__version__ = "0.1.0"
