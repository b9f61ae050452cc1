"""LLM extraction: prompt, parsing and validation, the global rate limiter, chunk checkpoints,
the offline model and the fake OpenAI-compatible server. See docs/llm.md.

Import the submodules you need; this package imports nothing heavy (LiteLLM takes seconds to load,
and the fake server does not need it).
"""
