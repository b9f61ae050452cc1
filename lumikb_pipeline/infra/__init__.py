"""Clients of the infrastructure: Redis (embedded or configured), the Dagster instance, the Celery
configuration and executor, and the run tags."""
