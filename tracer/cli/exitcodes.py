"""Every exit code agenttrace itself returns (`run -- CMD` returns CMD's own)."""
from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    FAILURE = 1          # a runtime failure after start (probe lost, I/O error)
    BAD_INPUT = 2        # bad config/rules/CLI, not root, no BPF, missing cgroup: nothing started
    CMD_NOT_FOUND = 127  # `run -- CMD` could not exec CMD, as a shell reports it
