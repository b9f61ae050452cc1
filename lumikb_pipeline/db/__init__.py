"""The app database: models, sessions, migrations, the extraction ledger, the catalog of KBs and
documents, the sync queries of the partitions sensor, and run-time settings."""
