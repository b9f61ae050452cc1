"""The graph stores as they were before provenance records (commit 15a625e), kept verbatim except for
their imports of each other: the migration tests write old-format graphs with them and check that
the current stores convert them. Not used by the package."""
