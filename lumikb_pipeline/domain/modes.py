"""How a re-extraction writes a document's graph (PRODUCT.md sections 1 and 2)."""

from __future__ import annotations

import enum

from lumikb_pipeline.core.errors import UsageError


class WriteMode(enum.StrEnum):
    """`replace`: the document's contribution becomes exactly the new extraction (what only it
    contributed and no longer finds goes). `merge`: the new extraction is added to what is there."""

    REPLACE = "replace"
    MERGE = "merge"

    @classmethod
    def parse(cls, value: str, where: str = "mode") -> WriteMode:
        """The mode named `value`; UsageError naming `where` and the accepted values otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise UsageError(
                f"{where} {value!r} is not one of {', '.join(m.value for m in cls)}"
            ) from None
