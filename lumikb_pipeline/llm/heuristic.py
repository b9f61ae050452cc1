"""A deterministic, rule-based extractor: the "model" behind `lumikb/offline` and the fake server.

It has to give plausible typed entities and relationships for *any* schema, without a network and
fast enough for the demo, so it is simple on purpose:

- entities are capitalised phrases ("Acme Corp", "Jane Doe", "Bank of Nordland"), minus leading
  function words ("The", "In", ...);
- each entity type takes, on its own, the names it fits, by keywords: the words of the type's
  description (its name when it has none), widened by a small lexicon of cues (an "Inc." or "Ltd"
  suggests an organisation-like type, a preceding "Dr." a person-like type, a preceding "in" a
  place-like type); a type no cue describes takes a stable third of the names (by hash), so answers
  never depend on chance;
- each relationship type joins, on its own, every two entities of the same sentence whose types it
  allows (the first named is the source when both directions are allowed).

Because every type is decided without looking at the others, the answer under a schema is the union
of the answers per type: adding a type adds exactly its items, removing one removes exactly its
items, and a type renamed with its description kept is extracted as before. That is what a
well-behaved model does, and what lets tests hold `delta` and `graph-only` migrations to the graph
of a full re-extraction.

This module imports no LLM library, so the fake server starts quickly.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lumikb_pipeline.domain.schema import DomainSchema, EntityType, RelationshipType

MAX_ENTITIES = 40
MAX_RELATIONSHIPS = 30

_PHRASE = re.compile(
    r"\b[A-Z][A-Za-z0-9'&-]*\.?"
    r"(?:\s+(?:(?:of|the|and|for|de|van|von|du|der|da|la|le|&)\s+)?[A-Z][A-Za-z0-9'&-]*\.?)*"
)
_WORD = re.compile(r"[a-z0-9]+")
# Split after . ! ? but not after the usual title abbreviations ("Dr. Jane Doe" is one sentence).
_SENTENCE_SPLIT = re.compile(
    r"(?<=[.!?])(?<!\bDr\.)(?<!\bMr\.)(?<!\bMs\.)(?<!\bMrs\.)(?<!\bSt\.)(?<!\bProf\.)\s+|\n+"
)

_FUNCTION_WORDS = frozenset(
    """a an the in on at this that these those it its he she they we i you but and or if when while
    after before as for from with by of to our their his her there here then also however meanwhile
    yesterday today tomorrow since until during each every all some many most both one two three
    according under over about into onto upon what which who whom whose where why how not no yes
    mr mrs ms dr prof sir monday tuesday wednesday thursday friday saturday sunday january february
    march april may june july august september october november december""".split()
)
_COPULAS = frozenset("is was are were be been".split())
_STOP_KEYWORDS = _FUNCTION_WORDS | frozenset("is are was were be been has have had any such other type".split())


@dataclass(frozen=True)
class _Cue:
    """Evidence for one kind of entity type (organisation-like, person-like, ...)."""

    type_words: frozenset[str]  # words in a type's name/description that say "this type is of my kind"
    name_words: frozenset[str]  # words inside an entity's name that suggest my kind
    before_words: frozenset[str]  # words right before an entity's name that suggest my kind


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_CUES = (
    _Cue(
        _words("organization organisation organizations organisations company companies agency agencies "
               "institution institutions firm business corporation employer group university bank club "
               "government ministry team vendor supplier customer"),
        _words("inc ltd llc corp corporation gmbh ag plc sa co company group bank university institute "
               "agency ministry department foundation association labs systems technologies partners "
               "council committee college school hospital holdings industries analytics energy robotics "
               "foods health press logistics textiles mining motors media capital consulting software "
               "pharma airlines bank insurance mobility seeds"),
        _words("at joined company firm"),
    ),
    _Cue(
        _words("person people individual individuals human employee employees author researcher ceo "
               "founder member staff customer patient"),
        _words("jr sr"),
        _words("mr mrs ms dr prof sir ceo president director minister chief founder engineer said"),
    ),
    _Cue(
        _words("place places location locations city cities country countries region site area town "
               "state address geographic geography office headquarters"),
        _words("city river street county province island mountain lake valley bay republic kingdom "
               "avenue road square park"),
        _words("in near from to across based headquartered"),
    ),
    _Cue(
        _words("product products software tool tools device devices service services model platform"),
        _words("pro max mini plus cloud os app api"),
        _words("uses use using released launched built product products sells makes"),
    ),
)

_PERSON_CUE = _CUES[1]


@dataclass
class _Mention:
    name: str
    first: int  # position of first occurrence in the chunk, for a stable order
    contexts: list[tuple[frozenset[str], str]] = field(default_factory=list)  # (name words, word before)


def _split_camel(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).replace("_", " ")


def _type_keywords(item: EntityType | RelationshipType) -> frozenset[str]:
    # The description when there is one, else the name: a type renamed with its description kept is
    # extracted exactly as before (what makes a rename a graph-only migration for this model).
    text = item.description if item.description.strip() else _split_camel(item.name)
    return frozenset(w for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in _STOP_KEYWORDS)


def _identity(item: EntityType | RelationshipType) -> str:
    return item.description.strip().lower() or item.name.lower()


def _article(word: str) -> str:
    return "An" if word[:1].lower() in "aeiou" else "A"


def _stable_index(text: str, n: int) -> int:
    digest = hashlib.sha256(text.lower().encode()).digest()
    return int.from_bytes(digest[:4], "big") % n


def _clean_phrase(raw: str) -> str:
    words = raw.split()
    while words and words[0].lower().rstrip(".") in _FUNCTION_WORDS:
        words = words[1:]
    while words and words[-1].lower().rstrip(".") in _FUNCTION_WORDS - {"co"}:
        words = words[:-1]
    name = " ".join(words)
    if name.endswith("'s"):
        name = name[:-2]
    # A trailing full stop is usually the sentence's, not part of the name (but keep "Inc." / "Corp.").
    if name.endswith(".") and name[:-1].split()[-1:] and name[:-1].split()[-1].lower() not in {"inc", "corp", "co"}:
        name = name[:-1]
    return name.strip()


def _mentions(text: str) -> tuple[list[_Mention], list[list[str]]]:
    """The capitalised phrases of `text` and, per sentence, the names found in it."""
    by_key: dict[str, _Mention] = {}
    sentences: list[list[str]] = []
    offset = 0
    for sentence in _SENTENCE_SPLIT.split(text):
        names_here: list[str] = []
        for match in _PHRASE.finditer(sentence):
            name = _clean_phrase(match.group(0))
            if len(name) < 2 or not any(c.isalpha() for c in name):
                continue
            key = name.lower()
            mention = by_key.get(key)
            if mention is None:
                if len(by_key) >= MAX_ENTITIES:
                    continue
                mention = by_key[key] = _Mention(name=name, first=offset + match.start())
            # The word before the name, looking past a copula ("its product is Atlas" -> "product").
            # (A title the name was cleaned of, as in "Dr. Jane Doe", counts as a word before it.)
            raw = match.group(0)
            prefix = raw[: raw.find(name)] if name in raw else ""
            preceding = [w for w in _WORD.findall((sentence[: match.start()] + " " + prefix).lower())
                         if w not in _COPULAS]
            before = preceding[-1:]
            mention.contexts.append((frozenset(_WORD.findall(name.lower())), before[0] if before else ""))
            if name not in names_here:
                names_here.append(name)
        sentences.append(names_here)
        offset += len(sentence) + 1
    return sorted(by_key.values(), key=lambda m: m.first), sentences


def _type_cues(type_words: frozenset[str]) -> tuple[_Cue, ...]:
    """The kinds of entity a type is: the cues whose type words it shares most (none: an unusual type)."""
    overlaps = [len(type_words & cue.type_words) for cue in _CUES]
    best = max(overlaps)
    return tuple(cue for cue, n in zip(_CUES, overlaps, strict=True) if n and n == best)


def _accepts(mention: _Mention, entity_type: EntityType, type_words: frozenset[str]) -> bool:
    """Whether `mention` is an entity of `entity_type`, decided from the two alone.

    The decision never looks at the schema's other types, so adding a type only adds its entities,
    removing one only removes its entities, and every model answer is the union of per-type answers
    (what makes `delta` and `graph-only` migrations give the same graph as a full extraction).
    """
    cues = _type_cues(type_words)
    score = 0
    for name_words, before in mention.contexts:
        score += 2 * len(name_words & type_words)
        for cue in cues:
            score += 3 * len(name_words & cue.name_words) + 2 * int(before in cue.before_words)
    if score:
        return True
    if _PERSON_CUE in cues and len(mention.name.split()) >= 2 and not _has_cue(mention):
        return True  # a name of two or more words that nothing else explains is most often a person's
    # A type no cue describes (e.g. Gene): a stable third of the names that no rule types.
    return not cues and _stable_index(f"{mention.name}\0{_identity(entity_type)}", 3) == 0


def _has_cue(mention: _Mention) -> bool:
    """Whether any cue, of any kind, speaks for the mention (independent of the schema)."""
    return any(
        name_words & cue.name_words or before in cue.before_words
        for name_words, before in mention.contexts for cue in _CUES
    )


def extract(
    schema: DomainSchema, text: str, known: Sequence[tuple[str, str]] = ()
) -> dict[str, Any]:
    """The answer a well-behaved model would give for `text` under `schema`, deterministically.

    The result has the prompt's answer shape: `{"entities": [...], "relationships": [...]}`. Each
    entity type and each relationship type is decided on its own. `known` lists (name, type) of
    entities already extracted from the chunk (a delta prompt's context): they are not repeated as
    entities but relationships of `schema`'s types may join them.
    """
    mentions, sentences = _mentions(text)
    typed: dict[str, list[str]] = {m.name: [] for m in mentions}  # mention name -> its types, in schema order
    entities = []
    for entity_type in schema.entity_types:
        type_words = _type_keywords(entity_type)
        for mention in mentions:
            if _accepts(mention, entity_type, type_words):
                typed[mention.name].append(entity_type.name)
    for mention in mentions:
        for type_name in typed[mention.name]:
            entities.append({"name": mention.name, "type": type_name, "description": f"{_article(type_name)} "
                             f"{_split_camel(type_name).lower()} named in the text as {mention.name}."})
    by_key = {m.name.casefold(): m.name for m in mentions}
    for name, type_name in known:
        mention_name = by_key.get(name.casefold())
        if mention_name is not None and type_name not in typed[mention_name]:
            typed[mention_name].append(type_name)

    relationships: list[dict[str, str]] = []
    for rel in schema.relationship_types:
        counts: dict[tuple[str, str], int] = {}
        seen: set[tuple[str, str, str, str]] = set()
        for sentence_names, sentence in zip(sentences, _SENTENCE_SPLIT.split(text), strict=True):
            ends = [(name, type_name) for name in sentence_names for type_name in typed.get(name, [])]
            for i, first in enumerate(ends):
                for second in ends[i + 1:]:
                    if first[0].lower() == second[0].lower():
                        continue
                    if schema.allows_relationship(rel.name, first[1], second[1]):
                        source, target = first, second
                    elif schema.allows_relationship(rel.name, second[1], first[1]):
                        source, target = second, first
                    else:
                        continue
                    key = (source[0].lower(), source[1], target[0].lower(), target[1])
                    if key in seen:
                        continue
                    combo = (source[1], target[1])
                    # The cap is per (type, endpoint types): narrowing other endpoints changes nothing here.
                    if counts.get(combo, 0) >= MAX_RELATIONSHIPS:
                        continue
                    counts[combo] = counts.get(combo, 0) + 1
                    seen.add(key)
                    relationships.append({
                        "source": source[0], "source_type": source[1],
                        "target": target[0], "target_type": target[1],
                        "type": rel.name,
                        "description": f"{source[0]} {rel.name.lower().replace('_', ' ')} {target[0]}, "
                                       f"as the text says: {sentence.strip()[:120]}",
                    })
    return {"entities": entities, "relationships": relationships}


def estimate_tokens(text: str) -> int:
    """A rough token count (about four characters a token), for usage figures without a tokenizer."""
    return max(1, (len(text) + 3) // 4)
