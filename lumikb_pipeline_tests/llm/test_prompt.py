"""The prompt carries the schema (types, endpoints, descriptions) and the chunk, and has a version."""

from __future__ import annotations

import json

import pytest

from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.llm import prompt


def test_the_prompt_embeds_the_schema_and_the_chunk_so_both_can_be_read_back(schema_v1: DomainSchema) -> None:
    text = "Acme Corp hired Jane Doe.\n</chunk> and <schema> in a chunk must not confuse anyone."

    messages = prompt.build_messages(schema_v1, text)

    assert prompt.read_prompt(messages) == (schema_v1, text)
    system = messages[0]["content"]
    block = json.loads(system.split("<schema>\n")[1].split("\n</schema>")[0])
    assert block["relationship_types"][0] == {
        "name": "EMPLOYS", "source": ["Organization"], "target": ["Person"],
        "description": "The organisation employs the person.",
    }
    assert "A company, agency or institution." in system
    assert '"relationships"' in system and "source_type" in system


def test_the_effective_prompt_version_changes_with_the_template_and_with_the_schema(
    schema_v1: DomainSchema, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = prompt.effective_prompt_version(schema_v1)
    bumped_schema = schema_v1.model_copy(update={"prompt_version": 2})

    assert prompt.effective_prompt_version(bumped_schema) != base
    monkeypatch.setattr(prompt, "PROMPT_VERSION", prompt.PROMPT_VERSION + 1)
    assert prompt.effective_prompt_version(schema_v1) != base


def test_a_prompt_without_the_blocks_is_refused() -> None:
    with pytest.raises(prompt.PromptFormatError):
        prompt.read_prompt([{"role": "user", "content": "hello"}])


# The prompts' exact bytes at PROMPT_VERSION 1 and DELTA_PROMPT_VERSION 1. Checkpoints are keyed by
# these versions, so a change of wording that keeps the versions would make stored results answer a
# prompt that was never sent: change the text only with a version bump, and then these digests.
_GOLDEN_SCHEMA = """\
entity_types:
  - name: Organization
    description: A company.
  - name: Person
    description: A person.
relationship_types:
  - name: EMPLOYS
    source: [Organization]
    target: [Person]
"""


def test_the_prompts_bytes_change_only_with_their_versions() -> None:
    import hashlib

    from lumikb_pipeline.domain.schema import parse_schema_text

    schema = parse_schema_text(_GOLDEN_SCHEMA)
    full = json.dumps(prompt.build_messages(schema, "Acme employs Jane."), sort_keys=True)
    delta = json.dumps(
        prompt.build_delta_messages(schema, "Acme employs Jane.", [("Acme", "Organization")]), sort_keys=True
    )
    assert (prompt.PROMPT_VERSION, prompt.DELTA_PROMPT_VERSION) == (1, 1)
    digests = {name: hashlib.sha256(text.encode()).hexdigest() for name, text in (("full", full), ("delta", delta))}
    assert digests == {
        "full": "89953def716f6aac5b72b90d348105392f53ff13674dd7fbcf6ca4b8d05e1afd",
        "delta": "e0a7368de83f5c94bb3843fc6020d257ed0a62e7a9ff7bc412954a3e99e33740",
    }
