"""The deterministic rules that turn several provenance records into one entity or relationship.

The same rules serve both levels: `build_document_graph` merges the chunks of one document, and the
stores merge the documents of one KB. Each rule is a function of the *set* of inputs (never of their
order or of how often a write ran), which is what makes writes idempotent and order-independent.
They run in Python for both stores so that Neo4j's and SQLite's string orderings never matter.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

# Bound of a merged description: many documents describing a popular entity must not grow it without
# limit; one description of up to this size is kept literally.
MAX_MERGED_DESCRIPTION = 16_384
DESCRIPTION_SEPARATOR = "\n"


def merge_descriptions(descriptions: Iterable[str]) -> str:
    """Sorted unique non-blank descriptions joined by a newline, cut at `MAX_MERGED_DESCRIPTION`."""
    unique = sorted({d for d in descriptions if d.strip()})
    return DESCRIPTION_SEPARATOR.join(unique)[:MAX_MERGED_DESCRIPTION]


def choose_name(names: Counter[str]) -> str:
    """The displayed name: the one given most often (counted per provenance record); ties go to the
    smallest by (casefolded, exact) text so that the choice never depends on write order."""
    if not names:
        return ""
    return min(names, key=lambda name: (-names[name], name.casefold(), name))
