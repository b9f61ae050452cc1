"""Hypothesis strategies for hostile input, shared by the fuzz tests."""

from __future__ import annotations

from hypothesis import strategies as st

# Text as an attacker or a confused model writes it: any code point, lone surrogates and control
# characters included, markup and Cypher look-alikes, and now and then something huge.
CYPHER_LIKE = [
    "'}) DETACH DELETE n //", '"}) MATCH (n) DETACH DELETE n RETURN 1 //', "$kb_id {kb_id: 'other'}",
    "`Acme` Corp``", "MENTIONS", "HAS_CHUNK", "[/]", "[link=https://evil.example]x[/link]", "\x00", "\ud800",
    "\u202eevil", "Robert'); DROP TABLE entities;--", "../../etc/passwd", "%s%n", "{{7*7}}",
]
any_char = st.characters(codec=None, categories=None)
hostile_text = st.one_of(
    st.text(any_char, max_size=40),
    st.sampled_from(CYPHER_LIKE),
    st.builds(lambda base, n: base * n, st.sampled_from(["A", "é", "\x07", "\udc80", "x "]),
              st.sampled_from([513, 5_000, 70_000])),
    st.text(st.characters(min_codepoint=0, max_codepoint=0x1F), max_size=10),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), hostile_text)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(hostile_text, children, max_size=4)),
    max_leaves=12,
)
