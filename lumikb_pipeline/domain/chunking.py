"""Splitting a document's text into ordered chunks with token counts (pure functions).

Text is split at paragraph boundaries (blank lines, Markdown headings) and paragraphs are packed
into chunks of at most `max_tokens` tokens; a paragraph longer than that is split at sentence ends,
and a sentence longer than that at token boundaries. Tokens are counted with tiktoken's
`cl100k_base`, loaded from the copy LiteLLM ships, so chunking works offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import tiktoken

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n|\n(?=#{1,6}\s)")
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")


@dataclass(frozen=True)
class TextChunk:
    ordinal: int
    text: str
    token_count: int
    content_hash: str


def content_hash(text: str) -> str:
    """The SHA-256 of a text, the identity of document and chunk contents."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    # Point tiktoken at LiteLLM's bundled encodings: no download, ever.
    spec = importlib.util.find_spec("litellm")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(list(spec.submodule_search_locations)[0]) / "litellm_core_utils" / "tokenizers"
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(bundled))
    return tiktoken.get_encoding("cl100k_base")


def count_tokens(text: str) -> int:
    """Tokens of `text` in cl100k_base (a good estimate for current chat models)."""
    return len(_encoding().encode(text, disallowed_special=()))


def _split_long(text: str, max_tokens: int) -> list[str]:
    """Split one paragraph that is too long: at sentence ends, then hard at token boundaries."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        tokens = _encoding().encode(sentence, disallowed_special=())
        if len(tokens) <= max_tokens:
            pieces.append(sentence)
            continue
        for start in range(0, len(tokens), max_tokens):
            pieces.append(_encoding().decode(tokens[start : start + max_tokens]))
    return pieces


def chunk_text(text: str, max_tokens: int = 400) -> list[TextChunk]:
    """Ordered chunks of at most `max_tokens` tokens each; empty text gives no chunks."""
    paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n")) if p.strip()]
    # (text, tokens, separator before it): sentences of one paragraph rejoin with a space.
    pieces: list[tuple[str, int, str]] = []
    for paragraph in paragraphs:
        tokens = count_tokens(paragraph)
        if tokens <= max_tokens:
            pieces.append((paragraph, tokens, "\n\n"))
            continue
        parts = [part for part in _split_long(paragraph, max_tokens) if part.strip()]
        pieces.extend((part, count_tokens(part), "\n\n" if i == 0 else " ") for i, part in enumerate(parts))

    chunks: list[str] = []
    current = ""
    current_tokens = 0
    for piece, tokens, separator in pieces:
        # +2 for the separator; the final count is measured, not summed.
        if current and current_tokens + tokens + 2 > max_tokens:
            chunks.append(current)
            current, current_tokens = "", 0
        current = f"{current}{separator}{piece}" if current else piece
        current_tokens += tokens + 2
    if current:
        chunks.append(current)
    return [
        TextChunk(ordinal=i, text=chunk, token_count=count_tokens(chunk), content_hash=content_hash(chunk))
        for i, chunk in enumerate(chunks)
    ]


def document_title(text: str, fallback: str) -> str:
    """The first Markdown heading, else the first non-empty line if short, else `fallback`."""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        heading = re.match(r"^#{1,6}\s+(.*)$", stripped)
        if heading:
            return heading.group(1).strip()[:512] or fallback
        return fallback
    return fallback
