"""Entity identity: the normalised key that decides when two names are the same entity.

Within a KB an entity is identified by (type, key) where key = `normalise_key(name)`. The rule is
deliberately conservative: it removes differences of presentation (Unicode compatibility forms, case,
spacing, most punctuation) and nothing else, so "Acme Corp." and "ACME  corp" are one entity while
"C" and "C#" stay two.
"""

from __future__ import annotations

import unicodedata

# A key is part of a composite uniqueness constraint in Neo4j, whose index entries are limited to a
# few kB; 512 characters (at most ~2 kB of UTF-8) keeps every key indexable while no real name is
# that long. Names that agree on their first 512 normalised characters are the same entity.
MAX_KEY_LENGTH = 512

# Punctuation that separates words: dashes, connectors (underscore) and slashes become a space, so
# "Jean-Paul", "jean_paul" and "Jean Paul" agree.
_SEPARATOR_CATEGORIES = frozenset({"Pd", "Pc"})
_SEPARATOR_CHARACTERS = frozenset("/\\|")
# Punctuation that carries meaning in names ("C#", "AT&T", "@handle", "100%") is kept; all other
# punctuation (quotes, apostrophes, brackets, full stops, commas...) is dropped, so "O'Brien" and
# "O’Brien" agree and "Acme Corp." equals "Acme Corp".
_KEPT_PUNCTUATION = frozenset("#&@%")


def _map_character(char: str) -> str:
    category = unicodedata.category(char)
    if char in _KEPT_PUNCTUATION:
        return char
    if category in _SEPARATOR_CATEGORIES or char in _SEPARATOR_CHARACTERS:
        return " "
    if category.startswith("P"):
        return ""
    if category == "Cc":
        # Control characters: tabs and newlines separate words; the others are noise.
        return " " if char.isspace() else ""
    if category == "Cf":
        # Format characters (zero-width spaces and joiners, bidirectional marks) are invisible and
        # must not make two names that look the same into two entities.
        return ""
    return char


def _normalise_once(text: str) -> str:
    # NFKC folds compatibility forms (full-width letters, ligatures, superscripts); casefold is the
    # Unicode-aware lower(); NFKC again because casefold can yield non-normalised sequences.
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    mapped = "".join(_map_character(char) for char in folded)
    # Removing a character can bring a base letter next to a combining mark, hence the last NFKC.
    collapsed = " ".join(unicodedata.normalize("NFKC", mapped).split())
    return collapsed[:MAX_KEY_LENGTH].rstrip()


# ASCII text is already NFKC and casefolds to lower(); one translate() does the per-character mapping.
# This fast path is what most names take (the slow path is tested to agree with it).
_ASCII_TABLE = str.maketrans({chr(code): _map_character(chr(code)) for code in range(128)})


def normalise_key(name: str) -> str:
    """The identity key of an entity name: NFKC, casefolded, punctuation normalised, spaces collapsed.

    Returns "" when nothing identifying is left (e.g. a name made only of punctuation); such a name
    is not an entity. The result is at most `MAX_KEY_LENGTH` characters, and the function is
    idempotent: `normalise_key(normalise_key(x)) == normalise_key(x)`.
    """
    if name.isascii():
        return " ".join(name.lower().translate(_ASCII_TABLE).split())[:MAX_KEY_LENGTH].rstrip()
    key = _normalise_once(name)
    # Each step is idempotent on its own, but their composition may not be for exotic input (a
    # casefold that produces a character NFKC rewrites into punctuation); iterate to the fixed point,
    # which is reached in one or two rounds in practice.
    for _ in range(4):
        again = _normalise_once(key)
        if again == key:
            return key
        key = again
    return key
