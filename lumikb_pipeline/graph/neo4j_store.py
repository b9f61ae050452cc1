"""The Neo4j graph store: batched, idempotent writes, one transaction per document.

One driver per process (a connection pool; created lazily, re-created after a fork, closed at exit)
is shared by every store opened in the process. Writes run in the driver's managed `execute_write`,
which retries transient errors, deadlocks included, with the same transaction function; the
function only reads and writes through its transaction, so a retry starts from scratch.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any

from neo4j import Driver, GraphDatabase, ManagedTransaction
from neo4j.exceptions import ClientError

from lumikb_pipeline.domain.results import DocumentGraph
from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.graph import neo4j_queries as q
from lumikb_pipeline.graph.plan import (
    Footprint,
    Mention,
    Ref,
    RelKey,
    StoredEntity,
    StoredRelationship,
    StoredState,
    WritePlan,
    plan_write,
    rel_key,
)
from lumikb_pipeline.graph.store import (
    INVARIANT_EXAMPLES,
    DocumentCounts,
    GraphCounts,
    GraphDump,
    InvariantReport,
    WriteMode,
    WriteSummary,
)
from lumikb_pipeline.graph.validation import foreign_chunks_error, validate_document_graph

# Generous: under heavy contention (many workers writing documents that share popular entities) a
# transaction may need several deadlock retries; giving up early would lose a write.
MAX_TRANSACTION_RETRY_TIME_S = 120.0
INDEX_WAIT_S = 300

_drivers: dict[tuple[str, str, str], Driver] = {}
_drivers_pid = os.getpid()
_schema_ready: set[tuple[str, str]] = set()  # (uri, database) whose schema this process ensured
_drivers_lock = threading.Lock()


def shared_driver(uri: str, user: str, password: str) -> Driver:
    """The process's driver for these credentials, created on first use.

    After a fork (Celery's prefork pool) the parent's connections are unusable, so a child starts
    with fresh drivers; the parent's are dropped without closing them, which would close the
    parent's sockets.
    """
    global _drivers_pid
    with _drivers_lock:
        if _drivers_pid != os.getpid():
            _drivers.clear()
            _schema_ready.clear()
            _drivers_pid = os.getpid()
        key = (uri, user, password)
        driver = _drivers.get(key)
        if driver is None:
            auth = (user, password) if password else None
            driver = GraphDatabase.driver(uri, auth=auth, max_transaction_retry_time=MAX_TRANSACTION_RETRY_TIME_S)
            _drivers[key] = driver
        return driver


def close_shared_drivers() -> None:
    """Close every driver of this process (at exit, or in tests that need a clean slate)."""
    with _drivers_lock:
        if _drivers_pid == os.getpid():
            for driver in _drivers.values():
                driver.close()
        _drivers.clear()
        _schema_ready.clear()


atexit.register(close_shared_drivers)


def _rel_key(row: Any) -> RelKey:
    return (row[0], row[1], row[2], row[3], row[4])


class Neo4jGraphStore:
    """The graph store on a Neo4j 5.26+ database (Community is enough)."""

    def __init__(self, uri: str, user: str, password: str, database: str = "neo4j") -> None:
        self._uri = uri
        self.database = database
        self._driver = shared_driver(uri, user, password)

    # --- schema ---

    def ensure_schema(self) -> None:
        """Create the uniqueness constraints if missing (dropping indexes of earlier versions), then wait
        for them to come online.

        Runs once per process and database; several processes racing to create the same constraint
        is harmless (`IF NOT EXISTS`, and an "equivalent already exists" answer is accepted).
        """
        ready_key = (self._uri, self.database)
        if ready_key in _schema_ready:
            return
        for statement in (*q.CONSTRAINTS, *q.DROPPED_INDEXES):
            try:
                self._driver.execute_query(statement, database_=self.database)
            except ClientError as exc:
                if "EquivalentSchemaRuleAlreadyExists" not in (exc.code or ""):
                    raise
        self._driver.execute_query(q.AWAIT_INDEXES, timeout_s=INDEX_WAIT_S, database_=self.database)
        _schema_ready.add(ready_key)

    # --- writes ---

    def write_document(self, graph: DocumentGraph, schema: DomainSchema, mode: WriteMode) -> WriteSummary:
        """Write one document's contribution in one transaction (see `GraphStore.write_document`)."""
        # Every check runs before the transaction opens: a rejected document writes nothing.
        validate_document_graph(graph, schema, mode)
        self.ensure_schema()
        with self._driver.session(database=self.database) as session:
            return session.execute_write(self._write, graph.kb_id, graph.doc_id, graph, mode)

    def remove_document(self, kb_id: str, doc_id: str) -> WriteSummary:
        """Remove a document, its chunks and exactly the provenance only it gave (idempotent)."""
        self.ensure_schema()
        with self._driver.session(database=self.database) as session:
            return session.execute_write(self._write, kb_id, doc_id, None, "replace")

    def _write(
        self,
        tx: ManagedTransaction,
        kb_id: str,
        doc_id: str,
        graph: DocumentGraph | None,
        mode: WriteMode,
    ) -> WriteSummary:
        locked = self._lock_and_read(tx, kb_id, doc_id, graph)
        if locked is None:  # removal of a document that is not there
            return WriteSummary(kb_id=kb_id, doc_id=doc_id, mode=mode)
        footprint, state, element_ids = locked
        plan = plan_write(kb_id, doc_id, graph, mode, footprint, state)
        self._apply(tx, kb_id, doc_id, plan, element_ids)
        return plan.summary

    def _lock_and_read(
        self, tx: ManagedTransaction, kb_id: str, doc_id: str, graph: DocumentGraph | None
    ) -> tuple[Footprint, StoredState, dict[Ref, str]] | None:
        """Steps 1 and 2 in one round trip: lock the document, read its footprint, lock and read every
        touched entity and relationship. Also returns each touched entity's element id, valid for the
        rest of this transaction. None when removing a document that does not exist."""
        params: dict[str, Any] = {"kb_id": kb_id, "doc_id": doc_id}
        if graph is None:
            result = tx.run(q.LOCK_AND_READ_FOR_REMOVAL, params, chunk_ids=[], refs=[], rels=[])
        else:
            result = tx.run(
                q.LOCK_AND_READ_FOR_WRITE,
                params,
                schema_version=graph.schema_version,
                chunk_ids=[c.id for c in graph.chunks],
                refs=[[e.type, e.key] for e in graph.entities],
                rels=[list(rel_key(r)) for r in graph.relationships],
            )
        record = result.single()
        if record is None:
            return None
        if record["foreign_chunks"]:
            raise foreign_chunks_error(kb_id, doc_id, record["foreign_chunks"])
        footprint = Footprint(
            exists=True,
            chunks={cid: ordinal for cid, ordinal in record["chunks"]},
            refs={(t, k) for t, k in record["refs"]},
            rel_keys={_rel_key(row) for row in record["rel_keys"]},
        )
        state = StoredState()
        element_ids: dict[Ref, str] = {}
        for entity_type, key, element_id, name, description, mentions in record["entities"]:
            ref = (entity_type, key)
            element_ids[ref] = element_id
            state.entities[ref] = StoredEntity(name=name, description=description)
            state.mentions[ref] = [
                Mention(chunk_id=cid, ref=ref, names=tuple(names or ()), descriptions=tuple(descs or ()))
                for cid, names, descs in mentions
            ]
        for row in record["relationships"]:
            description, chunk_ids, source_chunk_ids, source_descriptions = row[5:]
            state.relationships[_rel_key(row)] = StoredRelationship(
                description=description or "",
                chunk_ids=tuple(chunk_ids or ()),
                sources=tuple(zip(source_chunk_ids or (), source_descriptions or (), strict=True)),
            )
        return footprint, state, element_ids

    def _apply(
        self, tx: ManagedTransaction, kb_id: str, doc_id: str, plan: WritePlan, element_ids: dict[Ref, str]
    ) -> None:
        """All changes of the plan in one query (one round trip), each kind as one UNWIND batch."""
        # Row shapes are documented beside each part of `APPLY_PLAN`.
        mentions_by_chunk: dict[str, list[list[Any]]] = {}
        for m in plan.mentions_upsert:
            mentions_by_chunk.setdefault(m.chunk_id, []).append(
                [element_ids[m.ref], list(m.names), list(m.descriptions)]
            )
        tx.run(
            q.APPLY_PLAN,
            kb_id=kb_id,
            doc_id=doc_id,
            chunks_upsert=[{"id": cid, "ordinal": ordinal} for cid, ordinal in plan.chunks_upsert],
            entities_upsert=[[element_ids[ref], e.name, e.description] for ref, e in plan.entities_upsert],
            mentions_delete=[{"chunk_id": cid, "entity": element_ids[ref]} for cid, ref in plan.mentions_delete],
            mentions_upsert=[{"chunk_id": cid, "mentions": rows} for cid, rows in mentions_by_chunk.items()],
            relationships_delete=[
                {"type": key[0], "source": element_ids[key[1:3]], "target": element_ids[key[3:5]]}
                for key in plan.relationships_delete
            ],
            relationships_upsert=[
                [key[0], element_ids[key[1:3]], element_ids[key[3:5]], rel.description, list(rel.chunk_ids),
                 [cid for cid, _ in rel.sources], [desc for _, desc in rel.sources]]
                for key, rel in plan.relationships_upsert
            ],
            chunks_delete=plan.chunks_delete,
            entities_delete=[element_ids[ref] for ref in plan.entities_delete],
            delete_document=plan.delete_document,
        ).consume()

    # --- reads ---

    def _single(self, query: str, **params: Any) -> dict[str, Any]:
        records, _, _ = self._driver.execute_query(query, params, database_=self.database, routing_="r")
        return dict(records[0]) if records else {}

    def counts(self, kb_id: str) -> GraphCounts:
        """Sizes of one KB's graph."""
        return GraphCounts(**self._single(q.COUNTS, kb_id=kb_id))

    def document_counts(self, kb_id: str, doc_id: str) -> DocumentCounts:
        """Sizes of one document's contribution (zeros for an unknown document)."""
        return DocumentCounts(**self._single(q.DOCUMENT_COUNTS, kb_id=kb_id, doc_id=doc_id))

    def _invariant(self, name: str, query: str, kb_id: str) -> InvariantReport:
        row = self._single(query, kb_id=kb_id, limit=INVARIANT_EXAMPLES)
        return InvariantReport(name=name, count=row.get("count", 0), examples=row.get("examples", []))

    def duplicate_entities(self, kb_id: str) -> InvariantReport:
        """Entities that share (kb_id, type, key) (the uniqueness constraint should make this 0)."""
        return self._invariant("duplicate_entities", q.DUPLICATE_ENTITIES, kb_id)

    def duplicate_relationships(self, kb_id: str) -> InvariantReport:
        """Pairs of entities joined more than once by the same relationship type."""
        return self._invariant("duplicate_relationships", q.DUPLICATE_RELATIONSHIPS, kb_id)

    def entities_without_provenance(self, kb_id: str) -> InvariantReport:
        """Entities no chunk of their KB mentions."""
        return self._invariant("entities_without_provenance", q.ENTITIES_WITHOUT_PROVENANCE, kb_id)

    def relationships_without_provenance(self, kb_id: str) -> InvariantReport:
        """Relationships with no chunk ids, or naming a chunk that is not in their KB."""
        return self._invariant("relationships_without_provenance", q.RELATIONSHIPS_WITHOUT_PROVENANCE, kb_id)

    def edges_across_kbs(self, kb_id: str) -> InvariantReport:
        """HAS_CHUNK, MENTIONS and entity relationships between this KB and another."""
        return self._invariant("edges_across_kbs", q.EDGES_ACROSS_KBS, kb_id)

    def dump(self, kb_id: str) -> GraphDump:
        """Every node and relationship of the KB with all their properties."""
        nodes, _, _ = self._driver.execute_query(q.DUMP_NODES, kb_id=kb_id, database_=self.database)
        rels, _, _ = self._driver.execute_query(q.DUMP_RELATIONSHIPS, kb_id=kb_id, database_=self.database)
        return GraphDump.build(
            ((r["labels"], r["properties"]) for r in nodes),
            ((r["type"], r["start_labels"], r["start"], r["end_labels"], r["end"], r["properties"]) for r in rels),
        )

    def close(self) -> None:
        """Nothing to release per store: the process-wide driver stays open for reuse and is closed
        at exit (or by `close_shared_drivers`)."""
