"""`lumikb demo`."""

from __future__ import annotations

from lumikb_pipeline.cli.app import app, console, handle_errors
from lumikb_pipeline.core.config import load_settings


@app.command("demo")
@handle_errors
def demo() -> None:
    """Load the bundled sample corpus into KB `demo`, extract it, evolve the schema, re-extract the
    outdated documents through the production Dagster job code, and print a summary. Needs no
    services and no network on the embedded defaults."""
    from lumikb_pipeline.demo import print_summary, run_demo
    from lumikb_pipeline.infra.redis_client import embedded_redis_running, stop_embedded_redis

    settings = load_settings()
    # The demo starts the embedded Redis if nothing of this installation runs it yet; it then stops
    # it when it exits, however it exits. One that `lumikb up` started is left alone.
    started_redis = settings.uses_embedded_redis and not embedded_redis_running(settings.home_dir)
    try:
        print_summary(run_demo(settings, console), settings, console)
    finally:
        if started_redis:
            stop_embedded_redis(settings.home_dir)
