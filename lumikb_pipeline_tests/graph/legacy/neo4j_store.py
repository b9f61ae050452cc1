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

import lumikb_pipeline_tests.graph.legacy.neo4j_queries as q
from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.domain.results import DocumentGraph
from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.graph.merging import MAX_MERGED_DESCRIPTION, provenance_text, text_order
from lumikb_pipeline.graph.store import (
    INVARIANT_EXAMPLES,
    DocumentCounts,
    GraphCounts,
    GraphDump,
    InvariantReport,
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


def _write_parameters(graph: DocumentGraph, mode: WriteMode) -> dict[str, Any]:
    """The parameters of `WRITE_DOCUMENT` (row shapes documented there) for a validated graph."""
    index: dict[tuple[str, str], int] = {}
    entities: list[list[Any]] = []
    mentioned: dict[str, list[int]] = {chunk.id: [] for chunk in graph.chunks}
    for i, entity in enumerate(graph.entities):
        index[(entity.type, entity.key)] = i
        descriptions = [entity.description] if entity.description.strip() else []
        entities.append([entity.type, entity.key, entity.name, descriptions])
        for chunk_id in set(entity.chunk_ids):
            mentioned[chunk_id].append(i)
    relationships = [
        [
            rel.type,
            index[(rel.source.type, rel.source.key)],
            index[(rel.target.type, rel.target.key)],
            provenance_text(rel.description),
            rel.chunk_ids if len(rel.chunk_ids) == 1 else sorted(set(rel.chunk_ids), key=text_order),
        ]
        for rel in graph.relationships
    ]
    return {
        "kb_id": graph.kb_id,
        "doc_id": graph.doc_id,
        "schema_version": graph.schema_version,
        "chunks": [[chunk.id, chunk.ordinal, mentioned[chunk.id]] for chunk in graph.chunks],
        "entities": entities,
        "relationships": relationships,
        "merge": mode == WriteMode.MERGE,
        "remove": False,
        "max_description": MAX_MERGED_DESCRIPTION,
    }


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
        params = _write_parameters(graph, mode)
        with self._driver.session(database=self.database) as session:
            return session.execute_write(self._write, q.WRITE_DOCUMENT, params, graph)

    def remove_document(self, kb_id: str, doc_id: str) -> WriteSummary:
        """Remove a document, its chunks and exactly the provenance only it gave (idempotent)."""
        self.ensure_schema()
        params = {
            "kb_id": kb_id, "doc_id": doc_id, "chunks": [], "entities": [], "relationships": [],
            "merge": False, "remove": True, "max_description": MAX_MERGED_DESCRIPTION,
        }
        with self._driver.session(database=self.database) as session:
            return session.execute_write(self._write, q.REMOVE_DOCUMENT, params, None)

    @staticmethod
    def _write(
        tx: ManagedTransaction, query: str, params: dict[str, Any], graph: DocumentGraph | None
    ) -> WriteSummary:
        """The transaction function (the driver may run it again after a transient error)."""
        kb_id, doc_id = params["kb_id"], params["doc_id"]
        mode = WriteMode.MERGE if params["merge"] else WriteMode.REPLACE
        record = tx.run(query, params).single()
        if record is None:
            if graph is None:  # removal of a document that is not there
                return WriteSummary(kb_id=kb_id, doc_id=doc_id, mode=mode)
            held = tx.run(q.DOCUMENT_VERSION, kb_id=kb_id, doc_id=doc_id).single()
            if held is not None and (held["schema_version"] or 0) > graph.schema_version:
                return WriteSummary(kb_id=kb_id, doc_id=doc_id, mode=mode, newer_version_held=held["schema_version"])
            foreign = tx.run(
                q.FOREIGN_CHUNKS, kb_id=kb_id, doc_id=doc_id, chunk_ids=[c.id for c in graph.chunks]
            ).values()
            raise foreign_chunks_error(kb_id, doc_id, [(chunk_id, owner) for chunk_id, owner in foreign])
        changes = record.data()
        if graph is None:
            contribution: dict[str, int] = {}
        elif mode == WriteMode.MERGE:  # the contribution is the old one plus the new: count it
            contribution = dict(tx.run(q.DOCUMENT_COUNTS, kb_id=kb_id, doc_id=doc_id).single() or {})
        else:
            contribution = {
                "chunks": len(graph.chunks),
                "entities": len(graph.entities),
                "relationships": len(graph.relationships),
                "mentions": sum(len(set(e.chunk_ids)) for e in graph.entities),
            }
        return WriteSummary(kb_id=kb_id, doc_id=doc_id, mode=mode, **contribution, **changes)

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
