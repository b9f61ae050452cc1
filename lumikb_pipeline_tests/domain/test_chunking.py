from lumikb_pipeline.domain.chunking import chunk_text, count_tokens, document_title


def test_short_text_is_one_chunk_with_its_token_count() -> None:
    chunks = chunk_text("Acme Corp employs Jane Doe.")
    assert len(chunks) == 1
    assert chunks[0].ordinal == 0
    assert chunks[0].token_count == count_tokens("Acme Corp employs Jane Doe.") > 0


def test_long_text_is_split_into_ordered_chunks_within_the_limit() -> None:
    paragraphs = [f"Paragraph {i}. " + "Some words about Acme Corp and Jane Doe. " * 20 for i in range(30)]
    chunks = chunk_text("\n\n".join(paragraphs), max_tokens=200)
    assert len(chunks) > 5
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    assert all(c.token_count <= 200 for c in chunks)
    assert chunks[0].text.startswith("Paragraph 0. Some words")
    assert [i for i, c in enumerate(chunks) if "Paragraph 29." in c.text] == [len(chunks) - 2]


def test_a_single_huge_sentence_is_split_at_token_boundaries() -> None:
    chunks = chunk_text("word " * 3000, max_tokens=100)
    assert all(c.token_count <= 101 for c in chunks)
    assert sum(c.text.count("word") for c in chunks) == 3000


def test_chunking_is_deterministic_and_empty_text_has_no_chunks() -> None:
    text = "# Title\n\nOne.\n\nTwo."
    assert chunk_text(text) == chunk_text(text)
    assert chunk_text("   \n\n ") == []


def test_title_is_the_first_markdown_heading() -> None:
    assert document_title("\n# Annual report\n\ntext", "fallback") == "Annual report"
    assert document_title("plain text", "fallback") == "fallback"
