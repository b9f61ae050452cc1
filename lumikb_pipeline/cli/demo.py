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

    settings = load_settings()
    print_summary(run_demo(settings, console), settings, console)
