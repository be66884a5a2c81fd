"""The one rule every map writer follows: write the new entries first, then delete what is no
longer wanted, so a rewrite (start, reload) never opens a window in which a forbidden entry is
missing."""
from __future__ import annotations


def delete_stale(table, keep: set[bytes]) -> None:
    """Delete every entry of BCC `table` whose key bytes are not in `keep`."""
    for k in list(table.keys()):
        if bytes(k) not in keep:
            try:
                del table[k]
            except KeyError:
                pass
