"""A deterministic, rule-based extractor: the "model" behind `lumikb/offline` and the fake server.

It has to give plausible typed entities and relationships for *any* schema, without a network and
fast enough for the demo, so it is simple on purpose:

- entities are capitalised phrases ("Acme Corp", "Jane Doe", "Bank of Nordland"), minus leading
  function words ("The", "In", ...);
- an entity's type is chosen among the schema's entity types by keywords: the words of each type's
  name and description, widened by a small lexicon of cues (an "Inc." or "Ltd" suggests an
  organisation-like type, a preceding "Dr." a person-like type, a preceding "in" a place-like type);
  when nothing matches, a stable hash of the name picks the type, so answers never depend on chance;
- relationships join entities of the same sentence when the schema allows their endpoint types,
  the relationship type whose description words best match the sentence winning.

This module imports no LLM library, so the fake server starts quickly.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from lumikb_pipeline.domain.schema import DomainSchema, EntityType

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
               "council committee college school hospital holdings industries"),
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
        _words("uses use using released launched built"),
    ),
)


@dataclass
class _Mention:
    name: str
    first: int  # position of first occurrence in the chunk, for a stable order
    contexts: list[tuple[frozenset[str], str]] = field(default_factory=list)  # (name words, word before)


def _split_camel(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).replace("_", " ")


def _type_keywords(entity_type: EntityType) -> frozenset[str]:
    text = f"{_split_camel(entity_type.name)} {entity_type.description}".lower()
    return frozenset(w for w in _WORD.findall(text) if len(w) > 2 and w not in _STOP_KEYWORDS)


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
            before = _WORD.findall(sentence[: match.start()].lower())[-1:]
            mention.contexts.append((frozenset(_WORD.findall(name.lower())), before[0] if before else ""))
            if name not in names_here:
                names_here.append(name)
        sentences.append(names_here)
        offset += len(sentence) + 1
    return sorted(by_key.values(), key=lambda m: m.first), sentences


def _choose_type(mention: _Mention, schema: DomainSchema, keywords: dict[str, frozenset[str]]) -> str:
    best_name, best_score = "", 0
    for entity_type in schema.entity_types:
        type_words = keywords[entity_type.name]
        score = 0
        for name_words, before in mention.contexts:
            score += 2 * len(name_words & type_words)
            for cue in _CUES:
                if type_words & cue.type_words:
                    score += 3 * len(name_words & cue.name_words) + 2 * int(before in cue.before_words)
        if score > best_score:
            best_name, best_score = entity_type.name, score
    if best_score == 0:
        return schema.entity_types[_stable_index(mention.name, len(schema.entity_types))].name
    return best_name


def extract(schema: DomainSchema, text: str) -> dict[str, Any]:
    """The answer a well-behaved model would give for `text` under `schema`, deterministically.

    The result has the prompt's answer shape: `{"entities": [...], "relationships": [...]}`.
    """
    keywords = {t.name: _type_keywords(t) for t in schema.entity_types}
    mentions, sentences = _mentions(text)
    types = {m.name: _choose_type(m, schema, keywords) for m in mentions}
    entities = [
        {"name": m.name, "type": types[m.name], "description": f"{_article(types[m.name])} "
         f"{_split_camel(types[m.name]).lower()} named in the text as {m.name}."}
        for m in mentions
    ]
    rel_keywords = {
        r.name: frozenset(
            w for w in _WORD.findall(f"{r.name.replace('_', ' ')} {r.description}".lower())
            if len(w) > 2 and w not in _STOP_KEYWORDS
        )
        for r in schema.relationship_types
    }
    relationships: list[dict[str, str]] = []
    seen: set[frozenset[str]] = set()
    for sentence_names, sentence in zip(sentences, _SENTENCE_SPLIT.split(text), strict=True):
        sentence_words = frozenset(_WORD.findall(sentence.lower()))
        for i, first in enumerate(sentence_names):
            for second in sentence_names[i + 1:]:
                pair = frozenset((first.lower(), second.lower()))
                if len(pair) < 2 or pair in seen or len(relationships) >= MAX_RELATIONSHIPS:
                    continue
                best: tuple[int, str, str, str] | None = None
                for source, target in ((first, second), (second, first)):
                    for rel in schema.relationship_types:
                        if not schema.allows_relationship(rel.name, types[source], types[target]):
                            continue
                        score = len(rel_keywords[rel.name] & sentence_words)
                        if best is None or score > best[0]:
                            best = (score, rel.name, source, target)
                if best is None:
                    continue
                seen.add(pair)
                _, rel_name, source, target = best
                relationships.append({
                    "source": source, "source_type": types[source],
                    "target": target, "target_type": types[target],
                    "type": rel_name,
                    "description": f"{source} {rel_name.lower().replace('_', ' ')} {target}, "
                                   f"as the text says: {sentence.strip()[:120]}",
                })
    return {"entities": entities, "relationships": relationships}


def estimate_tokens(text: str) -> int:
    """A rough token count (about four characters a token), for usage figures without a tokenizer."""
    return max(1, (len(text) + 3) // 4)
