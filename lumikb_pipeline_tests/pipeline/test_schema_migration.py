"""Schema evolution at the lowest cost (issue 14): for a deterministic model (the fake LLM server),
`--strategy auto` gives the same graph as `full` over added, removed, renamed and mixed changes, on
both graph stores; removals and renames make no LLM call; an addition costs a fraction of `full`."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lumikb_pipeline_tests.pipeline.conftest import DEMO, Graph, Pass, Scenario

# About two minutes on both graph stores: in the slow step, which CI runs too.
pytestmark = pytest.mark.slow

V1 = (DEMO / "schema_v1.yaml").read_text()
PRODUCT = "  - name: Product\n    description: A product, service or piece of software that a company makes.\n"
MAKES = ("  - name: MAKES\n    source: [Organization]\n    target: [Product]\n"
         "    description: The organisation makes or sells the product.\n")
LOCATION = "  - name: Location\n    description: A city, region or country.\n"
LOCATED_IN = ("  - name: LOCATED_IN\n    source: [Organization]\n    target: [Location]\n"
              "    description: The organisation is based in the place.\n")


def _edit(text: str, *replacements: tuple[str, str]) -> str:
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    return text


ADD = _edit(V1, (LOCATION, LOCATION + PRODUCT), (LOCATED_IN, LOCATED_IN + MAKES))
REMOVE = _edit(V1, (LOCATION, ""), (LOCATED_IN, ""))
RENAME = _edit(
    V1, ("  - name: Organization\n", "  - name: Company\n    renamed_from: Organization\n"),
    ("  - name: EMPLOYS\n", "  - name: HIRES\n    renamed_from: EMPLOYS\n"), ("[Organization]", "[Company]"),
)
MIXED = _edit(ADD, (LOCATION, ""), (LOCATED_IN, ""),
              ("  - name: Organization\n", "  - name: Company\n    renamed_from: Organization\n"),
              ("[Organization]", "[Company]"))

CORPUS = sorted((DEMO / "corpus").glob("*.md"))


def _migrate(make: Callable[[str], Scenario], name: str, change: str, strategy: str) -> tuple[Scenario, Pass, Graph]:
    scenario = make(f"{name}-{strategy}")
    scenario.create(V1, CORPUS)
    scenario.run("full")
    before = scenario.graph()
    scenario.set_schema(change)
    return scenario, scenario.run(strategy), before


def _renamed(graph: Graph, entity_types: dict[str, str], rel_types: dict[str, str]) -> Graph:
    def t(name: str) -> str:
        return entity_types.get(name, name)

    return Graph(
        {(t(type_), key): docs for (type_, key), docs in graph.entities.items()},
        {(rel_types.get(r, r), t(st), sk, t(tt), tk): docs
         for (r, st, sk, tt, tk), docs in graph.relationships.items()},
    )


@pytest.mark.parametrize(
    ("name", "change", "strategy"),
    [("add", ADD, "delta"), ("remove", REMOVE, "graph-only"), ("rename", RENAME, "graph-only"),
     ("mixed", MIXED, "delta")],
)
def test_auto_gives_the_same_graph_as_full(
    scenario_factory: Callable[[str], Scenario], name: str, change: str, strategy: str
) -> None:
    auto, auto_pass, before = _migrate(scenario_factory, name, change, "auto")
    full, full_pass, _ = _migrate(scenario_factory, name, change, "full")

    assert auto_pass.strategies == {strategy}
    assert full_pass.strategies == {"full"}
    auto_graph, full_graph = auto.graph(), full.graph()
    assert auto_graph.entities == full_graph.entities
    assert auto_graph.relationships == full_graph.relationships
    assert auto_graph != before  # the change did change the graph
    if strategy == "graph-only":
        assert auto_pass.llm_calls == 0 and auto_pass.server_calls == 0
    else:
        assert 0 < auto_pass.server_calls <= full_pass.server_calls
    print(f"\n{name}: auto ({strategy}) {auto_pass.llm_calls} calls, {auto_pass.prompt_tokens} prompt + "
          f"{auto_pass.completion_tokens} completion tokens, ${auto_pass.cost_usd:.6f}; full {full_pass.llm_calls} "
          f"calls, {full_pass.prompt_tokens} + {full_pass.completion_tokens} tokens, ${full_pass.cost_usd:.6f}")


def test_a_rename_keeps_every_entity_relationship_and_provenance_under_the_new_name(
    scenario_factory: Callable[[str], Scenario],
) -> None:
    scenario, migration, before = _migrate(scenario_factory, "rename", RENAME, "auto")

    assert migration.llm_calls == 0 and migration.server_calls == 0
    expected = _renamed(before, {"Organization": "Company"}, {"EMPLOYS": "HIRES"})
    after = scenario.graph()
    assert after.entities == expected.entities
    assert after.relationships == expected.relationships


def test_adding_a_type_costs_a_fraction_of_full(scenario_factory: Callable[[str], Scenario]) -> None:
    _, delta, _ = _migrate(scenario_factory, "cost", ADD, "auto")
    _, full, _ = _migrate(scenario_factory, "cost", ADD, "full")

    assert delta.completion_tokens <= 0.5 * full.completion_tokens
    assert delta.cost_usd <= 0.7 * full.cost_usd
    assert full.cost_usd > 0


def test_auto_after_auto_composes_across_versions(scenario_factory: Callable[[str], Scenario]) -> None:
    # v1 -> v2 (add, delta) -> v3 (remove and rename, graph-only) equals a full extraction at v3.
    auto = scenario_factory("chain-auto")
    auto.create(V1, CORPUS)
    auto.run("full")
    auto.set_schema(ADD)
    auto.run("auto")
    v3 = _edit(ADD, (LOCATION, ""), (LOCATED_IN, ""),
               ("  - name: Organization\n", "  - name: Company\n    renamed_from: Organization\n"),
               ("[Organization]", "[Company]"))
    auto.set_schema(v3)
    last = auto.run("auto")
    assert last.strategies == {"graph-only"} and last.server_calls == 0

    full = scenario_factory("chain-full")
    full.create(v3.replace("    renamed_from: Organization\n", ""), CORPUS)
    full.run("full")
    assert auto.graph().entities == full.graph().entities
    assert auto.graph().relationships == full.graph().relationships


def test_derived_checkpoints_are_never_taken_for_a_full_extraction(
    scenario_factory: Callable[[str], Scenario],
) -> None:
    from sqlalchemy import select

    from lumikb_pipeline.db import catalog
    from lumikb_pipeline.db.models import Chunk
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.llm.extractor import ChunkExtractor, ChunkInput

    scenario, migration, _ = _migrate(scenario_factory, "force", REMOVE, "auto")
    assert migration.server_calls == 0
    with session_scope(scenario.settings.effective_database_url) as session:
        kb = catalog.get_kb(session, scenario.slug)
        kb_id, version, schema = kb.id, kb.current_schema_version, catalog.current_schema(session, kb)
        chunks = [ChunkInput(c.id, c.text, c.content_hash) for c in session.scalars(
            select(Chunk).where(Chunk.document_id.in_(scenario.doc_ids)))]
    scenario.fake.reset()
    results = ChunkExtractor(scenario.settings).extract_sync(kb_id, version, schema, chunks)
    assert len(scenario.fake.calls()) == len({c.content_hash for c in chunks})
    assert not any(getattr(r, "from_checkpoint", True) for r in results[:1])
