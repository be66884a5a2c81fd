"""The record contract's version, stamped on every record as `schema_version`.

Minor bumps add fields or kinds (the contract only ever grows); a major bump would mean a
field changed meaning, which the contract forbids."""
SCHEMA_VERSION = "1.2"
