"""Test and benchmark helpers shipped with the package: the OpenAI-compatible fake LLM server."""
