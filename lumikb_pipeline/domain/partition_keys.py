"""A document's Dagster partition key: readable, stable and valid (`legal/master-services-agreement-3f9c2a1b`).

The key names the document's KB (its slug), the document (a slug of its title at ingest, else of its
file name) and a short id (the first hex digits of the document id), so an admin can tell documents
apart in the Dagster UI, filter the partitions list by a KB or a word of a title, and pick a range
for a backfill. It is computed once, when the document is created, stored on its row and never
changed: a renamed or re-ingested document keeps its key (its partition, materialization history
and backfills stay attached to it).

Keys use only `a-z`, `0-9`, `-` and one `/`, so they are valid wherever Dagster takes a partition
key: none of Dagster's forbidden substrings (`...`, control characters), nothing the UI's partition
selection syntax needs to quote (`[`, `]`, `,`, quotes, spaces; its unquoted characters are
`-a-zA-Z0-9_:/@`), no `|` (the multi-partition delimiter). They are short enough to read in the
UI's partition list: at most `MAX_KEY_LENGTH` characters.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import PurePath

from lumikb_pipeline.domain.schema import KB_SLUG_PATTERN

# The title part is cut at a word boundary to at most this many characters.
MAX_TITLE_SLUG = 48
# Hex digits of the document id in a key; more (`id_digits`) only when a key is already taken.
SHORT_ID_DIGITS = 8
# 63 (KB slug) + "/" + 48 (title) + "-" + 32 (a whole id, the last resort against collisions).
MAX_KEY_LENGTH = 63 + 1 + MAX_TITLE_SLUG + 1 + 32
FALLBACK_TITLE = "document"

# The KB part is the KB slug as it is (`KB_SLUG_PATTERN`), so filtering by a slug finds its documents.
KEY_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}/(?:[a-z0-9]+-)+[a-z0-9]+")


def slugify(text: str, max_length: int = MAX_TITLE_SLUG) -> str:
    """Lowercase ASCII words of `text` joined by `-`, cut at a word boundary to `max_length`; "" if
    `text` has no ASCII letter or digit. Accents are dropped (`Müller` -> `muller`); everything else
    (punctuation, control and format characters, other scripts) separates words."""
    decomposed = unicodedata.normalize("NFKD", text)
    ascii_text = "".join(c for c in decomposed if not unicodedata.combining(c)).lower()
    words = re.findall(r"[a-z0-9]+", ascii_text)
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > max_length:
            if not slug:  # one very long word: cut it
                slug = word[:max_length]
            break
        slug = candidate
    return slug


def short_id(doc_id: str, digits: int = SHORT_ID_DIGITS) -> str:
    """The first `digits` lowercase hex/alphanumeric characters of a document id (a UUID: its hex)."""
    compact = re.sub(r"[^a-z0-9]", "", doc_id.lower())
    return compact[:digits] or "0"


def document_partition_key(kb_slug: str, title: str, doc_id: str, *, source: str = "",
                           id_digits: int = SHORT_ID_DIGITS) -> str:
    """The partition key of a new document: `<kb slug>/<slug of title>-<short id>`. The title slug
    falls back to the slug of the source's file name, then to `document`, so any title (empty,
    unicode only, control characters, very long) gives a valid key."""
    kb = kb_slug if KB_SLUG_PATTERN.fullmatch(kb_slug) else (slugify(kb_slug, 63) or "kb")
    name = slugify(title) or slugify(PurePath(source).stem if source else "") or FALLBACK_TITLE
    return f"{kb}/{name}-{short_id(doc_id, id_digits)}"


def is_valid_partition_key(key: str) -> bool:
    """Whether `key` has the shape `document_partition_key` gives and fits `MAX_KEY_LENGTH`."""
    return len(key) <= MAX_KEY_LENGTH and KEY_PATTERN.fullmatch(key) is not None
