# Scratch measurement tool of bench/profiles/htcp-connect.md (issue 15); not shipped, not a test.
"""Builds tracing the same connect storm at once (STORM=connect_storm|refused_storm, same
records, same machine state): paired tracer CPU per connection, rounds with the start order
swapped; sides as ../hexec/pair.py's. Loop: ../pairtool.py."""
import os, subprocess, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pairtool
HERE = os.path.dirname(os.path.abspath(__file__))

launch = pairtool.ab_launcher(os.path.join(HERE, "..", "hexec", "ab.py"))


pairtool.main(launch, "connect_storm", "conn", "htcp")
