"""lumikb_pipeline: the batch (re-)extraction engine behind LumiKB's GraphRAG."""

import os

# LiteLLM fetches its model cost map from the network at import time unless told otherwise; the
# package must import (and estimate costs) offline, so the bundled map is used everywhere.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__version__ = "0.1.0"
