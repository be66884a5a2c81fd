"""agenttrace: an eBPF tracer for AI-agent processes."""

__version__ = "0.1.0"

# Compiled copies of the hot modules, used only where they match their source (tracer/native.py);
# installed before any submodule is imported.
from agenttrace import native as _native  # noqa: E402

_native.install()
