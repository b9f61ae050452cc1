"""A document's partition key names its KB and the document, and is valid wherever Dagster and its UI
take a partition key, whatever the title."""

from __future__ import annotations

import re
import uuid

import pytest
from dagster._core.definitions.partitions.utils.base import (
    INVALID_PARTITION_SUBSTRINGS,
    raise_error_on_invalid_partition_key_substring,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from lumikb_pipeline.domain.partition_keys import (
    MAX_KEY_LENGTH,
    MAX_TITLE_SLUG,
    document_partition_key,
    is_valid_partition_key,
    short_id,
    slugify,
)
from lumikb_pipeline.domain.schema import KB_SLUG_PATTERN
from lumikb_pipeline_tests.fuzz.strategies import hostile_text

DOC = "3f9c2a1b-9155-45e1-8619-73a882625b59"
# The characters the Dagster UI's partition selection syntax takes unquoted (ui-core
# partitions/SpanRepresentation.tsx: REQUIRES_QUOTING = /[^-a-zA-Z0-9_:/@]/).
UI_UNQUOTED = re.compile(r"^[-a-zA-Z0-9_:/@]+$")


def _assert_usable(key: str) -> None:
    assert is_valid_partition_key(key), key
    assert len(key) <= MAX_KEY_LENGTH
    assert not any(bad in key for bad in INVALID_PARTITION_SUBSTRINGS)
    raise_error_on_invalid_partition_key_substring([key])  # Dagster's own check
    assert UI_UNQUOTED.match(key), key  # ranges `[a...b]` and lists `a, b` need no quoting
    assert "|" not in key and "," not in key and ".." not in key


def test_the_key_names_the_kb_the_title_and_a_short_id() -> None:
    key = document_partition_key("legal", "Master Services Agreement", DOC)
    assert key == "legal/master-services-agreement-3f9c2a1b"
    _assert_usable(key)


def test_the_kb_slug_is_kept_as_it_is_so_filtering_by_it_finds_the_documents() -> None:
    assert document_partition_key("hr--2024-", "Leave policy", DOC).startswith("hr--2024-/leave-policy-")


def test_accents_are_dropped_and_punctuation_separates_words() -> None:
    assert slugify("Müller & Söhne: Vertrag v2.1") == "muller-sohne-vertrag-v2-1"
    assert slugify("  ---  ") == ""


def test_a_long_title_is_cut_at_a_word_boundary() -> None:
    slug = slugify("The quarterly review of every supplier contract signed in the northern region")
    assert slug == "the-quarterly-review-of-every-supplier-contract"
    assert len(slug) <= MAX_TITLE_SLUG
    assert slugify("x" * 200) == "x" * MAX_TITLE_SLUG


def test_a_title_without_latin_letters_falls_back_to_the_file_name_then_to_document() -> None:
    assert document_partition_key("kb", "契約書", DOC, source="/data/nda-acme.md") == "kb/nda-acme-3f9c2a1b"
    assert document_partition_key("kb", "", DOC, source="/data/契約.md") == "kb/document-3f9c2a1b"
    assert document_partition_key("kb", "\x00\x07\n\t", DOC) == "kb/document-3f9c2a1b"


def test_more_id_digits_tell_apart_documents_whose_short_ids_agree() -> None:
    a, b = "3f9c2a1b-0000-4000-8000-000000000001", "3f9c2a1b-0000-4000-8000-000000000002"
    assert document_partition_key("kb", "NDA", a) == document_partition_key("kb", "NDA", b)
    assert document_partition_key("kb", "NDA", a, id_digits=32) != document_partition_key("kb", "NDA", b, id_digits=32)
    assert short_id(a, 12) == "3f9c2a1b0000"


def test_keys_of_another_shape_are_not_valid() -> None:
    for key in ("", DOC, "legal/", "/nda-1", "Legal/nda-1", "legal/nda 1", "legal/a...b-1", "legal/nda-1,x",
                "legal/nda-1\n", "legal/x" + "y" * MAX_KEY_LENGTH):
        assert not is_valid_partition_key(key), key


@pytest.mark.fuzz
@settings(max_examples=300, deadline=None)
@given(
    kb=st.from_regex(KB_SLUG_PATTERN, fullmatch=True),
    title=hostile_text,
    source=hostile_text,
    doc_id=st.uuids().map(str),
    digits=st.sampled_from([8, 12, 16, 32]),
)
def test_any_title_gives_a_valid_key_that_names_its_kb_and_ends_with_its_id(
    kb: str, title: str, source: str, doc_id: str, digits: int
) -> None:
    key = document_partition_key(kb, title, doc_id, source=source, id_digits=digits)
    _assert_usable(key)
    assert key.startswith(f"{kb}/")
    assert key.endswith("-" + doc_id.replace("-", "")[:digits])
    assert key == document_partition_key(kb, title, doc_id, source=source, id_digits=digits)  # stable
    other = str(uuid.UUID(int=uuid.UUID(doc_id).int ^ 1))
    assert document_partition_key(kb, title, other, source=source, id_digits=32) != document_partition_key(
        kb, title, doc_id, source=source, id_digits=32)


@pytest.mark.fuzz
@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.from_regex(r"[A-Za-z][a-z0-9]{0,9}", fullmatch=True), min_size=1, max_size=8))
def test_every_word_of_a_short_plain_title_can_be_found_in_its_key(words: list[str]) -> None:
    title = " ".join(words)
    key = document_partition_key("kb", title, DOC)
    kept = slugify(title).split("-")
    assert kept[0] == words[0].lower()  # the first word is always there
    for word in kept:
        assert word in key
