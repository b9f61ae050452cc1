"""Entity identity: `normalise_key` folds presentation differences and nothing else."""

from __future__ import annotations

import random

import pytest

from lumikb_pipeline.domain.keys import MAX_KEY_LENGTH, normalise_key


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Acme Corp", "ACME  corp"),
        ("Acme Corp.", "Acme Corp"),
        ("  Acme\tCorp\n", "acme corp"),
        ("Ｆｕｌｌｗｉｄｔｈ", "fullwidth"),  # NFKC: full-width letters
        ("ﬁnance", "finance"),  # NFKC: ligature
        ("Straße", "STRASSE"),  # casefold, not lower()
        ("O'Brien", "O’Brien"),  # straight and curly apostrophes
        ("Jean-Paul", "Jean Paul"),  # a dash separates words
        ("jean_paul", "Jean–Paul"),  # underscore and en dash too
        ("TCP/IP", "tcp ip"),
        ("U.S.A.", "USA"),
        ("Acme (UK)", "acme uk"),
        ("Zero\u200bWidth", "zerowidth"),  # format characters are invisible
        ("\u200fשלום\u200e", "שלום"),  # bidirectional marks
        ("Cafe\u0301", "Café"),  # combining accent composes
    ],
)
def test_presentation_differences_give_the_same_key(a: str, b: str) -> None:
    assert normalise_key(a) == normalise_key(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("C", "C#"),
        ("C", "C++"),
        ("AT&T", "ATT"),
        ("Acme", "Acme 2"),
        ("Café", "Cafe"),  # accents are part of a name
        ("@acme", "acme"),
    ],
)
def test_meaningful_differences_give_different_keys(a: str, b: str) -> None:
    assert normalise_key(a) != normalise_key(b)


def test_key_examples() -> None:
    assert normalise_key("  ACME   Corp. ") == "acme corp"
    assert normalise_key("Jean-Paul Sartre") == "jean paul sartre"
    assert normalise_key("AT&T Inc.") == "at&t inc"
    assert normalise_key("🚀 Rocket Co") == "🚀 rocket co"


@pytest.mark.parametrize("name", ["", "   ", "...", "—", "'\"", "\u200b\u200e", "()[]{}", "\n\t"])
def test_a_name_without_identifying_characters_has_an_empty_key(name: str) -> None:
    assert normalise_key(name) == ""


def test_keys_are_bounded_so_they_stay_indexable() -> None:
    key = normalise_key("x" * 10_000)
    assert len(key) == MAX_KEY_LENGTH
    assert normalise_key("word " * 1000) == normalise_key("word " * 1000).rstrip()
    assert not normalise_key(("a" * (MAX_KEY_LENGTH - 1)) + " b").endswith(" ")


def test_normalise_key_is_idempotent_on_random_unicode() -> None:
    rng = random.Random(20240601)
    alphabet = (
        [chr(c) for c in range(0x20, 0x250)]
        + list("\u0301\u0308\u200b\u200d\u200e\u200f\u2013\u2014\u2019\u00a0\u3000ﬁﬀＡｚ①ⅷ㎏ß İı ǅ ΐ")
        + ["😀", "👩‍🔬", "\U0001d400", "ﷺ", "ᾈ"]
    )
    for _ in range(5000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        key = normalise_key(name)
        assert normalise_key(key) == key, (name, key)
        assert key == key.strip() and "  " not in key


def test_the_ascii_fast_path_agrees_with_the_full_unicode_rules() -> None:
    from lumikb_pipeline.domain.keys import _normalise_once

    rng = random.Random(99)
    alphabet = [chr(c) for c in range(128)]
    for _ in range(5000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert normalise_key(name) == _normalise_once(name), repr(name)
    assert normalise_key("A" * 600 + " b") == _normalise_once("A" * 600 + " b")
