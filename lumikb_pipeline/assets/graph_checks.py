"""The graph invariants of PRODUCT.md section 2, per KB, as asset checks on `knowledge_graph`.

`knowledge_graph` stands for the graph store as a whole (all KBs: Neo4j when `LUMIKB_NEO4J_URI` is
set, else the embedded store under `LUMIKB_HOME`; the descriptions name the configured one);
Dagster does not materialize it, `document_entities` feeds it. The checks query the whole graph, so
they run in `graph_invariants_job`: after every re-extraction job (`graph_checks_sensor`), with the
drift check, in the demo, and one by one from their tab in the UI (the multi-check is subsettable).
They are not checks of `document_entities` because Dagster runs every check of an asset in each run
of a backfill of that asset: a 50-run backfill would query the whole graph 50 times.
"""


from collections.abc import Iterator, Sequence

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    AssetSpec,
    MetadataValue,
    multi_asset_check,
)
from sqlalchemy import select

from lumikb_pipeline.assets.document_entities import DOCUMENT_ENTITIES
from lumikb_pipeline.core.config import Settings, get_settings
from lumikb_pipeline.core.scrub import scrub
from lumikb_pipeline.db.models import KnowledgeBase
from lumikb_pipeline.resources import DatabaseResource, GraphStoreResource


def graph_store_name(settings: Settings) -> str:
    """The configured graph store, as the descriptions name it (no credentials)."""
    if settings.uses_embedded_graph:
        return "the embedded graph store (graph.sqlite3 under LUMIKB_HOME)"
    return f"Neo4j ({scrub(settings.neo4j_uri or '')})"


STORE = graph_store_name(get_settings())
KNOWLEDGE_GRAPH = AssetKey("knowledge_graph")
knowledge_graph = AssetSpec(
    KNOWLEDGE_GRAPH,
    deps=[DOCUMENT_ENTITIES],
    description=f"The entity/relationship graph of all KBs in {STORE}, written by document_entities and checked "
    "(not materialized) by Dagster.",
)

# check name -> the graph store's invariant queries it runs (GraphStore protocol method names)
INVARIANT_CHECKS: dict[str, tuple[str, ...]] = {
    "no_duplicate_entities_or_relationships": ("duplicate_entities", "duplicate_relationships"),
    "provenance_present": ("entities_without_provenance", "relationships_without_provenance"),
    "nothing_across_kbs": ("edges_across_kbs",),
}
DESCRIPTIONS = {
    "no_duplicate_entities_or_relationships": (
        f"Queries {STORE}: no two entities share (KB, type, key) and no two relationships share (type, source, "
        "target)."
    ),
    "provenance_present": f"Queries {STORE}: every entity and relationship has a provenance chunk in its own KB.",
    "nothing_across_kbs": f"Queries {STORE}: no edge or reference joins elements of two KBs.",
}


@multi_asset_check(
    specs=[
        AssetCheckSpec(name=name, asset=KNOWLEDGE_GRAPH, description=DESCRIPTIONS[name]) for name in INVARIANT_CHECKS
    ],
    description=f"The graph invariants of PRODUCT.md section 2 over every KB, queried in {STORE}.",
    # Each check can run alone (from its tab in the UI); a run computes only the selected ones.
    can_subset=True,
)
def graph_invariants(
    context: AssetCheckExecutionContext, database: DatabaseResource, graph_store: GraphStoreResource
) -> Iterator[AssetCheckResult]:
    with database.session() as session:
        kb_slugs: Sequence[str] = list(session.scalars(select(KnowledgeBase.slug).order_by(KnowledgeBase.slug)))
    with graph_store.open() as store:
        selected = {key.name for key in context.selected_asset_check_keys}
        for check_name, queries in INVARIANT_CHECKS.items():
            if check_name not in selected:
                continue
            violations = 0
            details: dict[str, dict[str, object]] = {}
            for slug in kb_slugs:
                for query in queries:
                    report = getattr(store, query)(slug)
                    violations += report.count
                    if report.count:
                        details.setdefault(slug, {})[query] = {"count": report.count, "examples": report.examples}
            context.log.info(f"{check_name}: {violations} violation(s) over {len(kb_slugs)} KB(s)")
            yield AssetCheckResult(
                check_name=check_name,
                asset_key=KNOWLEDGE_GRAPH,
                passed=violations == 0,
                severity=AssetCheckSeverity.ERROR,
                metadata={
                    "store": STORE,
                    "kbs_checked": len(kb_slugs),
                    "violations": violations,
                    "details": MetadataValue.json(details),
                },
            )
