"""`lumikb/offline`: the deterministic local model, registered with LiteLLM as a custom provider.

It is the demo's default model (`LUMIKB_LLM_MODEL`): no network, no key, no sleeps. It reads the
schema and the chunk back from the prompt (`prompt.read_prompt`) and answers with what
`heuristic.extract` finds, so it goes through exactly the same code path as a real provider:
LiteLLM, the rate limiter, parsing, validation and checkpoints.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import litellm
from litellm.llms.custom_llm import CustomLLM, CustomLLMError
from litellm.types.utils import Choices, Message, ModelResponse, Usage

from lumikb_pipeline.core.names import OFFLINE_MODEL
from lumikb_pipeline.domain.chunking import count_tokens
from lumikb_pipeline.llm import heuristic
from lumikb_pipeline.llm.prompt import PromptFormatError, chat_prompt_tokens, read_prompt_request

PROVIDER = "lumikb"

_lock = threading.Lock()


class OfflineLLM(CustomLLM):
    """The `lumikb` provider's handler: answers extraction prompts from the prompt alone."""

    def completion(self, *args: Any, **kwargs: Any) -> ModelResponse:
        """Answer one extraction prompt (LiteLLM passes `model`, `messages`, `model_response`, ...)."""
        model = str(kwargs.get("model") or (args[0] if args else "offline"))
        messages = kwargs.get("messages") or (args[1] if len(args) > 1 else [])
        return answer(model, messages)

    async def acompletion(self, *args: Any, **kwargs: Any) -> ModelResponse:
        """The same as `completion`: the work is a few milliseconds of pure Python, so no thread."""
        return self.completion(*args, **kwargs)


def answer(model: str, messages: list[Any]) -> ModelResponse:
    """The offline model's response to `messages` (built by `prompt.build_messages`)."""
    try:
        schema, text, known = read_prompt_request(messages)
    except PromptFormatError as exc:
        # A 400 in LiteLLM's terms: the caller sent something that is not an extraction prompt.
        raise CustomLLMError(
            status_code=400, message=f"lumikb/offline only answers extraction prompts: {exc}"
        ) from None
    content = json.dumps(heuristic.extract(schema, text, known), ensure_ascii=False)
    # Counted like OpenAI counts (cl100k_base and the chat format's framing), as a provider reports usage.
    prompt_tokens = chat_prompt_tokens([m for m in messages if isinstance(m, dict)])
    completion_tokens = count_tokens(content)
    return ModelResponse(
        model=model if model.startswith(f"{PROVIDER}/") else f"{PROVIDER}/{model}",
        created=int(time.time()),
        choices=[Choices(index=0, finish_reason="stop", message=Message(role="assistant", content=content))],
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens),
    )


def register_offline_model() -> None:
    """Make `lumikb/offline` callable through LiteLLM (idempotent, thread-safe).

    Registers the provider handler and the model's price (zero), so `completion_cost` and
    `estimate_cost` work for it like for any priced model.
    """
    with _lock:
        if any(item.get("provider") == PROVIDER for item in litellm.custom_provider_map):
            return
        litellm.custom_provider_map = [
            *litellm.custom_provider_map, {"provider": PROVIDER, "custom_handler": OfflineLLM()}
        ]
        # LiteLLM reads custom_provider_map into its provider list only in this setup step.
        from litellm.utils import custom_llm_setup

        custom_llm_setup()
        litellm.register_model({
            OFFLINE_MODEL: {
                "litellm_provider": PROVIDER,
                "mode": "chat",
                "input_cost_per_token": 0.0,
                "output_cost_per_token": 0.0,
                "cache_creation_input_token_cost": 0.0,
                "cache_read_input_token_cost": 0.0,
                "max_input_tokens": 1_000_000,
                "max_output_tokens": 100_000,
                "max_tokens": 100_000,
            }
        })
