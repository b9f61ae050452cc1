"""`lumikb`: the command line (PRODUCT.md section 5). Each module registers its commands on `app`."""

from lumikb_pipeline.cli import catalog, demo, ops, progress  # noqa: F401  (each registers its commands)
from lumikb_pipeline.cli.app import app

__all__ = ["app"]
