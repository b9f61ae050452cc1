"""The product's re-extraction jobs: choosing documents and starting a job (`service`), the jobs of
backfills launched in the Dagster UI (`backfills`), their status (`status`), cancel, the `--dry-run`
estimate and the drift report."""
