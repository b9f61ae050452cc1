"""The deterministic rules that turn several provenance records into one entity or relationship.

The same rules serve both levels: `build_document_graph` merges the chunks of one document, and the
stores merge the documents of one KB. Each rule is a function of the *set* of inputs (never of their
order or of how often a write ran), which is what makes writes idempotent and order-independent.

Both stores apply these functions through `graph.plan` (incrementally, through bounded aggregates).
Texts are ordered as Neo4j orders strings (by UTF-16 code unit, `text_order`), so that a query
sorting them in Cypher agrees; lengths are counted in code points; a blank description is stored
as "" so that "non-blank" means "not empty".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

# Bound of a merged description: many documents describing a popular entity must not grow it without
# limit; one description of up to this size is kept literally.
MAX_MERGED_DESCRIPTION = 16_384
DESCRIPTION_SEPARATOR = "\n"


def text_order(text: str) -> bytes:
    """Sort key that orders texts as Neo4j (and Java) do: by UTF-16 code unit. It differs from
    Python's code point order only between characters above U+FFFF and those in U+E000-U+FFFF."""
    return text.encode("utf-16-be", "surrogatepass")


def provenance_text(description: str) -> str:
    """A description as one provenance record stores it: blank (whitespace only) becomes ""."""
    return description if description.strip() else ""


def merge_descriptions(descriptions: Iterable[str]) -> str:
    """Unique non-blank descriptions in `text_order`, joined by a newline, cut at
    `MAX_MERGED_DESCRIPTION` characters."""
    unique = sorted({d for d in descriptions if d.strip()}, key=text_order)
    return DESCRIPTION_SEPARATOR.join(unique)[:MAX_MERGED_DESCRIPTION]


def choose_name(names: Counter[str]) -> str:
    """The displayed name: the one given most often (counted per provenance record); ties go to the
    smallest text in `text_order`, so that the choice never depends on write order."""
    if not names:
        return ""
    return min(names, key=lambda name: (-names[name], text_order(name)))
