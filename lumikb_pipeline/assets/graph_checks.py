"""The graph invariants of PRODUCT.md section 2, per KB, as asset checks on `knowledge_graph`.

`knowledge_graph` stands for the Neo4j graph as a whole (all KBs); Dagster does not materialize it,
`document_entities` feeds it. The checks query the whole graph, so they run in
`graph_invariants_job` and with the daily drift check. They are not checks of `document_entities`
because Dagster runs every check of an asset in each run of a backfill of that asset: a 50-run
backfill would query the whole graph 50 times.
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
from lumikb_pipeline.db.models import KnowledgeBase
from lumikb_pipeline.resources import DatabaseResource, GraphStoreResource

KNOWLEDGE_GRAPH = AssetKey("knowledge_graph")
knowledge_graph = AssetSpec(
    KNOWLEDGE_GRAPH,
    deps=[DOCUMENT_ENTITIES],
    description="The entity/relationship graph in Neo4j, all KBs (written by document_entities; checked, "
    "not materialized, by Dagster).",
)

# check name -> the graph store's invariant queries it runs (GraphStore protocol method names)
INVARIANT_CHECKS: dict[str, tuple[str, ...]] = {
    "no_duplicate_entities_or_relationships": ("duplicate_entities", "duplicate_relationships"),
    "provenance_present": ("entities_without_provenance", "relationships_without_provenance"),
    "nothing_across_kbs": ("edges_across_kbs",),
}
DESCRIPTIONS = {
    "no_duplicate_entities_or_relationships": (
        "No two entities share (KB, type, key); no two relationships share (type, source, target)."
    ),
    "provenance_present": "Every entity and relationship has at least one provenance chunk in its own KB.",
    "nothing_across_kbs": "No edge or reference joins elements of two KBs.",
}


@multi_asset_check(
    specs=[
        AssetCheckSpec(name=name, asset=KNOWLEDGE_GRAPH, description=DESCRIPTIONS[name]) for name in INVARIANT_CHECKS
    ],
    description="The graph invariants of PRODUCT.md section 2, over every KB.",
)
def graph_invariants(
    context: AssetCheckExecutionContext, database: DatabaseResource, graph_store: GraphStoreResource
) -> Iterator[AssetCheckResult]:
    with database.session() as session:
        kb_slugs: Sequence[str] = list(session.scalars(select(KnowledgeBase.slug).order_by(KnowledgeBase.slug)))
    with graph_store.open() as store:
        for check_name, queries in INVARIANT_CHECKS.items():
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
                    "kbs_checked": len(kb_slugs),
                    "violations": violations,
                    "details": MetadataValue.json(details),
                },
            )
