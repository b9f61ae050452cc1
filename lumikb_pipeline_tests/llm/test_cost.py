"""Cost estimates come from LiteLLM's bundled price map, offline."""

from __future__ import annotations

import pytest

from lumikb_pipeline.llm.cost import estimate_cost, is_priced
from lumikb_pipeline.llm.offline import OFFLINE_MODEL, register_offline_model


def test_the_estimate_uses_the_models_prices_per_token() -> None:
    import litellm

    prompt_price, completion_price = litellm.cost_per_token(model="gpt-4o-mini", prompt_tokens=1, completion_tokens=1)

    assert estimate_cost("gpt-4o-mini", 1000, 500) == pytest.approx(1000 * prompt_price + 500 * completion_price)
    assert estimate_cost("openai/gpt-4o-mini", 1000, 500) > 0


def test_the_offline_model_is_free_and_unknown_models_are_not_priced() -> None:
    register_offline_model()

    assert is_priced(OFFLINE_MODEL) and estimate_cost(OFFLINE_MODEL, 10_000, 10_000) == 0.0
    assert not is_priced("selfhosted/llama-local") and estimate_cost("selfhosted/llama-local", 10, 10) == 0.0
