"""Token usage and cost of LLM calls, from LiteLLM's bundled price map (no network).

`lumikb/__init__` sets `LITELLM_LOCAL_MODEL_COST_MAP`, so prices are those of the installed LiteLLM.
Models LiteLLM does not price (a self-hosted model, say) cost 0.0 here; `is_priced` tells them
apart so a dry run can say "unknown" instead of "free".
"""

from __future__ import annotations

import logging
from typing import Any

import litellm

from lumikb_pipeline.llm.offline import register_offline_model

log = logging.getLogger(__name__)


def _ready() -> None:
    # The offline model's (zero) price exists once it is registered; and LiteLLM's "Provider List"
    # banner on an unknown model belongs on no user's terminal.
    register_offline_model()
    litellm.suppress_debug_info = True


def is_priced(model: str) -> bool:
    """True when LiteLLM knows prices for `model` (the offline model counts: its price is zero)."""
    _ready()
    try:
        litellm.cost_per_token(model=model, prompt_tokens=1, completion_tokens=1)
    except Exception:  # LiteLLM raises several types for "unknown model"
        return False
    return True


def estimate_cost(model: str, prompt_tokens: int, completion_tokens: int) -> float:
    """The price in USD of `prompt_tokens` in and `completion_tokens` out on `model` (0.0 if unpriced)."""
    _ready()
    try:
        prompt_cost, completion_cost = litellm.cost_per_token(
            model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
    except Exception:  # unknown models are "no known price", not an error
        return 0.0
    return float(prompt_cost) + float(completion_cost)


def response_cost(response: Any, model: str) -> float:
    """The cost of one completed call: LiteLLM's `completion_cost`, else the token estimate."""
    try:
        return float(litellm.completion_cost(completion_response=response))
    except Exception:  # e.g. a provider-renamed model missing from the map
        usage = getattr(response, "usage", None)
        return estimate_cost(model, int(getattr(usage, "prompt_tokens", 0) or 0),
                             int(getattr(usage, "completion_tokens", 0) or 0))
