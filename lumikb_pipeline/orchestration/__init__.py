"""Entry points that run the pipeline: the Celery app, the local processes of `lumikb up`, the in-process runner."""
