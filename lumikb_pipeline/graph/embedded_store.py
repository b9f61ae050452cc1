"""The embedded graph store: one SQLite file (`graph.sqlite3` under LUMIKB_HOME), zero setup.

It honours the same contract as the Neo4j store by running the write semantics of `graph.plan`
(which the Neo4j store runs in Cypher) over tables that mirror the graph model. Several processes
may use the file at once: SQLite's WAL journal lets readers run beside the writer, and each write
takes the database's write lock up front (`BEGIN IMMEDIATE`), so writes are serialised whole and can
never deadlock; a writer waits for the lock (busy timeout) instead of failing.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lumikb_pipeline.core.config import make_private_file
from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.domain.results import DocumentGraph
from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.graph.plan import (
    EntityState,
    Footprint,
    MentionValue,
    Ref,
    RelationshipState,
    RelKey,
    Source,
    StoredState,
    WritePlan,
    entity_state,
    plan_write,
    relationship_state,
    touched_refs,
    touched_rel_keys,
)
from lumikb_pipeline.graph.store import (
    INVARIANT_EXAMPLES,
    DocumentCounts,
    GraphCounts,
    GraphDump,
    InvariantReport,
    WriteSummary,
    relationship_properties,
)
from lumikb_pipeline.graph.validation import foreign_chunks_error, validate_document_graph

BUSY_TIMEOUT_S = 120.0  # how long a writer waits for another process's write to finish
_LOCKED_RETRIES = 5  # "database is locked" despite the timeout (e.g. WAL recovery): retry whole

# Composite keys carry kb_id everywhere, so no row can reference another KB's row; foreign keys make
# a dangling reference an error at write time.
SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    kb_id TEXT NOT NULL, id TEXT NOT NULL, schema_version INTEGER NOT NULL,
    PRIMARY KEY (kb_id, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    kb_id TEXT NOT NULL, id TEXT NOT NULL, doc_id TEXT NOT NULL, ordinal INTEGER NOT NULL,
    PRIMARY KEY (kb_id, id),
    FOREIGN KEY (kb_id, doc_id) REFERENCES documents (kb_id, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks (kb_id, doc_id);
CREATE TABLE IF NOT EXISTS entities (
    kb_id TEXT NOT NULL, type TEXT NOT NULL, key TEXT NOT NULL, name TEXT NOT NULL, description TEXT NOT NULL,
    aggregate TEXT NOT NULL,
    PRIMARY KEY (kb_id, type, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mentions (
    kb_id TEXT NOT NULL, chunk_id TEXT NOT NULL, type TEXT NOT NULL, key TEXT NOT NULL,
    names TEXT NOT NULL, descriptions TEXT NOT NULL,
    PRIMARY KEY (kb_id, chunk_id, type, key),
    FOREIGN KEY (kb_id, chunk_id) REFERENCES chunks (kb_id, id),
    FOREIGN KEY (kb_id, type, key) REFERENCES entities (kb_id, type, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS mentions_by_entity ON mentions (kb_id, type, key);
CREATE TABLE IF NOT EXISTS relationships (
    kb_id TEXT NOT NULL, type TEXT NOT NULL,
    source_type TEXT NOT NULL, source_key TEXT NOT NULL, target_type TEXT NOT NULL, target_key TEXT NOT NULL,
    description TEXT NOT NULL, aggregate TEXT NOT NULL,
    PRIMARY KEY (kb_id, type, source_type, source_key, target_type, target_key),
    FOREIGN KEY (kb_id, source_type, source_key) REFERENCES entities (kb_id, type, key),
    FOREIGN KEY (kb_id, target_type, target_key) REFERENCES entities (kb_id, type, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS relationships_by_target ON relationships (kb_id, target_type, target_key);
CREATE INDEX IF NOT EXISTS relationships_by_source ON relationships (kb_id, source_type, source_key);
CREATE TABLE IF NOT EXISTS relationship_sources (
    kb_id TEXT NOT NULL, type TEXT NOT NULL,
    source_type TEXT NOT NULL, source_key TEXT NOT NULL, target_type TEXT NOT NULL, target_key TEXT NOT NULL,
    chunk_id TEXT NOT NULL, description TEXT NOT NULL,
    PRIMARY KEY (kb_id, type, source_type, source_key, target_type, target_key, chunk_id, description),
    FOREIGN KEY (kb_id, type, source_type, source_key, target_type, target_key)
        REFERENCES relationships (kb_id, type, source_type, source_key, target_type, target_key),
    FOREIGN KEY (kb_id, chunk_id) REFERENCES chunks (kb_id, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS relationship_sources_by_chunk ON relationship_sources (kb_id, chunk_id);
"""

# Statements are literal constants (no formatting): values are always bound parameters.
_SELECT_DOC_SOURCES = (
    "SELECT s.type, s.source_type, s.source_key, s.target_type, s.target_key, s.chunk_id, s.description "
    "FROM relationship_sources s JOIN chunks c ON c.kb_id = s.kb_id AND c.id = s.chunk_id "
    "WHERE c.kb_id = ? AND c.doc_id = ?"
)
_SELECT_RELATIONSHIP = (
    "SELECT description, aggregate FROM relationships WHERE kb_id = ? AND type = ? "
    "AND source_type = ? AND source_key = ? AND target_type = ? AND target_key = ?"
)
_SELECT_RELATIONSHIP_SOURCES = (
    "SELECT chunk_id, description FROM relationship_sources WHERE kb_id = ? AND type = ? "
    "AND source_type = ? AND source_key = ? AND target_type = ? AND target_key = ?"
)
_DELETE_RELATIONSHIP_SOURCE = (
    "DELETE FROM relationship_sources WHERE kb_id = ? AND type = ? AND source_type = ? AND source_key = ? "
    "AND target_type = ? AND target_key = ? AND chunk_id = ? AND description = ?"
)
_DELETE_RELATIONSHIP_SOURCES = (
    "DELETE FROM relationship_sources WHERE kb_id = ? AND type = ? "
    "AND source_type = ? AND source_key = ? AND target_type = ? AND target_key = ?"
)
_DELETE_RELATIONSHIP = (
    "DELETE FROM relationships WHERE kb_id = ? AND type = ? "
    "AND source_type = ? AND source_key = ? AND target_type = ? AND target_key = ?"
)
_UPSERT_RELATIONSHIP = (
    "INSERT INTO relationships (kb_id, type, source_type, source_key, target_type, target_key, description, aggregate) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (kb_id, type, source_type, source_key, target_type, target_key) "
    "DO UPDATE SET description = excluded.description, aggregate = excluded.aggregate"
)
_INSERT_RELATIONSHIP_SOURCE = (
    "INSERT INTO relationship_sources "
    "(kb_id, type, source_type, source_key, target_type, target_key, chunk_id, description) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
# The relationships of an entity, through the indexes by source and by target (an OR over both
# would scan every relationship of the file).
_SELECT_ENTITY_RELATIONSHIPS = (
    "SELECT type, source_type, source_key, target_type, target_key FROM relationships "
    "WHERE kb_id = :kb AND source_type = :type AND source_key = :key "
    "UNION SELECT type, source_type, source_key, target_type, target_key FROM relationships "
    "WHERE kb_id = :kb AND target_type = :type AND target_key = :key"
)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _rel_params(kb_id: str, key: RelKey) -> tuple[str, ...]:
    return (kb_id, *key)


def _rel_key(row: Any) -> RelKey:
    return (row[0], row[1], row[2], row[3], row[4])


def _mention_value(names: str, descriptions: str) -> MentionValue:
    return (frozenset(json.loads(names)), frozenset(json.loads(descriptions)))


def migrate_provenance(conn: sqlite3.Connection) -> int:
    """Convert a file written before provenance aggregates (relationships held a `chunk_ids` list)
    to the current model, inside the caller's transaction; returns the elements converted.

    Idempotent: a file already converted (its entities have `aggregate`) is left alone. The records
    themselves (`mentions`, `relationship_sources`) were already one row each; what is added is each
    entity's and relationship's aggregate, computed once from all its records.
    """
    if "aggregate" in {row[1] for row in conn.execute("PRAGMA table_info(entities)")}:
        return 0
    conn.execute("ALTER TABLE entities ADD COLUMN aggregate TEXT NOT NULL DEFAULT ''")
    conn.execute("ALTER TABLE relationships ADD COLUMN aggregate TEXT NOT NULL DEFAULT ''")
    converted = 0
    for kb_id, t, k in conn.execute("SELECT kb_id, type, key FROM entities").fetchall():
        records = _Records(conn, kb_id).entity_records((t, k))
        entity = entity_state(value for _, value in records)
        if entity is not None:
            conn.execute(
                "UPDATE entities SET name = ?, description = ?, aggregate = ? WHERE kb_id = ? AND type = ? AND key = ?",
                (entity.name, entity.description, entity.aggregate_json(), kb_id, t, k),
            )
            converted += 1
    for kb_id, *key in conn.execute(
        "SELECT kb_id, type, source_type, source_key, target_type, target_key FROM relationships"
    ).fetchall():
        params = _rel_params(kb_id, _rel_key(key))
        rel = relationship_state(_Records(conn, kb_id).relationship_records(_rel_key(key)))
        if rel is not None:
            conn.execute(
                "UPDATE relationships SET description = ?, aggregate = ? WHERE kb_id = ? AND type = ? "
                "AND source_type = ? AND source_key = ? AND target_type = ? AND target_key = ?",
                (rel.description, rel.aggregate_json(), *params),
            )
            converted += 1
    conn.execute("ALTER TABLE relationships DROP COLUMN chunk_ids")
    return converted


class _Records:
    """Every record of one element, for the plan's rare recount (`plan.RecordLoader`)."""

    def __init__(self, conn: sqlite3.Connection, kb_id: str) -> None:
        self._conn, self._kb_id = conn, kb_id

    def entity_records(self, ref: Ref) -> list[tuple[str, MentionValue]]:
        return [
            (cid, _mention_value(names, descriptions))
            for cid, names, descriptions in self._conn.execute(
                "SELECT chunk_id, names, descriptions FROM mentions WHERE kb_id = ? AND type = ? AND key = ?",
                (self._kb_id, *ref),
            )
        ]

    def relationship_records(self, key: RelKey) -> list[Source]:
        return [(cid, d) for cid, d in self._conn.execute(_SELECT_RELATIONSHIP_SOURCES, _rel_params(self._kb_id, key))]


class EmbeddedGraphStore:
    """The graph store in a SQLite file, for the zero-setup default and single-machine use."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._schema_ready = False
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        # A connection per operation: safe across threads and forks, and cheap for a local file.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: durable across process crashes
        return conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        self.ensure_schema()
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    def ensure_schema(self) -> None:
        """Create the file, its tables and indexes if missing, and switch it to WAL; idempotent."""
        with self._lock:
            if self._schema_ready:
                return
            make_private_file(self.path)  # 0600 in a 0700 folder; SQLite's WAL files inherit the mode
            conn = self._connect()
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}")
                try:
                    migrate_provenance(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            finally:
                conn.close()
            self._schema_ready = True

    # --- writes ---

    def write_document(self, graph: DocumentGraph, schema: DomainSchema, mode: WriteMode) -> WriteSummary:
        """Write one document's contribution in one transaction (see `GraphStore.write_document`)."""
        validate_document_graph(graph, schema, mode)
        return self._transaction(graph.kb_id, graph.doc_id, graph, mode)

    def remove_document(self, kb_id: str, doc_id: str) -> WriteSummary:
        """Remove a document, its chunks and exactly the provenance only it gave (idempotent)."""
        return self._transaction(kb_id, doc_id, None, WriteMode.REPLACE)

    def _transaction(
        self, kb_id: str, doc_id: str, graph: DocumentGraph | None, mode: WriteMode
    ) -> WriteSummary:
        self.ensure_schema()
        for attempt in range(_LOCKED_RETRIES + 1):
            conn = self._connect()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    summary = self._write(conn, kb_id, doc_id, graph, mode)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return summary
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == _LOCKED_RETRIES:
                    raise
                time.sleep(0.05 * 2**attempt)
            finally:
                conn.close()
        raise AssertionError("unreachable")

    def _write(
        self, conn: sqlite3.Connection, kb_id: str, doc_id: str, graph: DocumentGraph | None, mode: WriteMode
    ) -> WriteSummary:
        if graph is not None:
            held = conn.execute(
                "SELECT schema_version FROM documents WHERE kb_id = ? AND id = ?", (kb_id, doc_id)
            ).fetchone()
            if held is not None and held[0] > graph.schema_version:
                # Read under the write lock (BEGIN IMMEDIATE): no newer write can slip in after it.
                return WriteSummary(kb_id=kb_id, doc_id=doc_id, mode=mode, newer_version_held=held[0])
        footprint = self._footprint(conn, kb_id, doc_id, graph)
        if graph is None and not footprint.exists:
            return WriteSummary(kb_id=kb_id, doc_id=doc_id, mode=mode)
        state = self._state(conn, kb_id, footprint, graph)
        plan = plan_write(kb_id, doc_id, graph, mode, footprint, state, _Records(conn, kb_id))
        if graph is not None:
            conn.execute(
                "INSERT INTO documents (kb_id, id, schema_version) VALUES (?, ?, ?) "
                "ON CONFLICT (kb_id, id) DO UPDATE SET schema_version = excluded.schema_version",
                (kb_id, doc_id, graph.schema_version),
            )
        self._apply(conn, kb_id, doc_id, plan)
        return plan.summary

    def _footprint(
        self, conn: sqlite3.Connection, kb_id: str, doc_id: str, graph: DocumentGraph | None
    ) -> Footprint:
        """The document's chunks and its own records, reached from its chunks (never from the
        entities, whose records from other documents may be many)."""
        if graph is not None:
            foreign = conn.execute(
                "SELECT id, doc_id FROM chunks WHERE kb_id = ? AND doc_id <> ? "
                "AND id IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT 3",
                (kb_id, doc_id, _json([c.id for c in graph.chunks])),
            ).fetchall()
            if foreign:
                raise foreign_chunks_error(kb_id, doc_id, foreign)
        exists = conn.execute(
            "SELECT 1 FROM documents WHERE kb_id = ? AND id = ?", (kb_id, doc_id)
        ).fetchone() is not None
        if not exists:
            return Footprint()
        footprint = Footprint(exists=True)
        footprint.chunks = dict(conn.execute(
            "SELECT id, ordinal FROM chunks WHERE kb_id = ? AND doc_id = ?", (kb_id, doc_id)
        ).fetchall())
        for cid, t, k, names, descriptions in conn.execute(
            "SELECT m.chunk_id, m.type, m.key, m.names, m.descriptions FROM mentions m JOIN chunks c "
            "ON c.kb_id = m.kb_id AND c.id = m.chunk_id WHERE c.kb_id = ? AND c.doc_id = ?",
            (kb_id, doc_id),
        ):
            footprint.mentions[(cid, (t, k))] = _mention_value(names, descriptions)
        for *key, cid, description in conn.execute(_SELECT_DOC_SOURCES, (kb_id, doc_id)):
            footprint.sources[_rel_key(key)].add((cid, description))
        return footprint

    def _state(
        self, conn: sqlite3.Connection, kb_id: str, footprint: Footprint, graph: DocumentGraph | None
    ) -> StoredState:
        """The aggregates of the touched elements: one row each, whatever their number of records."""
        state = StoredState()
        for ref in touched_refs(footprint, graph):
            row = conn.execute(
                "SELECT name, description, aggregate FROM entities WHERE kb_id = ? AND type = ? AND key = ?",
                (kb_id, *ref),
            ).fetchone()
            if row is not None:
                state.entities[ref] = EntityState.from_stored(*row)
        for key in touched_rel_keys(footprint, graph):
            row = conn.execute(_SELECT_RELATIONSHIP, _rel_params(kb_id, key)).fetchone()
            if row is not None:
                state.relationships[key] = RelationshipState.from_stored(*row)
        return state

    def _apply(self, conn: sqlite3.Connection, kb_id: str, doc_id: str, plan: WritePlan) -> None:
        # Order follows the foreign keys: parents are written before children, children deleted first.
        conn.executemany(
            "INSERT INTO chunks (kb_id, id, doc_id, ordinal) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (kb_id, id) DO UPDATE SET ordinal = excluded.ordinal",
            [(kb_id, cid, doc_id, ordinal) for cid, ordinal in plan.chunks_upsert],
        )
        conn.executemany(
            "INSERT INTO entities (kb_id, type, key, name, description, aggregate) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (kb_id, type, key) DO UPDATE SET name = excluded.name, description = excluded.description, "
            "aggregate = excluded.aggregate",
            [(kb_id, *ref, e.name, e.description, e.aggregate_json()) for ref, e in plan.entities_upsert],
        )
        conn.executemany(
            "DELETE FROM mentions WHERE kb_id = ? AND chunk_id = ? AND type = ? AND key = ?",
            [(kb_id, cid, *ref) for cid, ref in plan.mentions_delete],
        )
        conn.executemany(
            "INSERT INTO mentions (kb_id, chunk_id, type, key, names, descriptions) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (kb_id, chunk_id, type, key) DO UPDATE "
            "SET names = excluded.names, descriptions = excluded.descriptions",
            [
                (kb_id, m.chunk_id, *m.ref, _json(list(m.names)), _json(list(m.descriptions)))
                for m in plan.mentions_upsert
            ],
        )
        conn.executemany(
            _DELETE_RELATIONSHIP_SOURCE, [(*_rel_params(kb_id, key), *source) for key, source in plan.sources_delete]
        )
        deleted = [_rel_params(kb_id, key) for key in plan.relationships_delete]
        conn.executemany(_DELETE_RELATIONSHIP_SOURCES, deleted)
        conn.executemany(_DELETE_RELATIONSHIP, deleted)
        conn.executemany(
            _UPSERT_RELATIONSHIP,
            [(*_rel_params(kb_id, key), rel.description, rel.aggregate_json())
             for key, rel in plan.relationships_upsert],
        )
        conn.executemany(
            _INSERT_RELATIONSHIP_SOURCE, [(*_rel_params(kb_id, key), *source) for key, source in plan.sources_add]
        )
        # A deleted chunk takes its provenance with it (as Neo4j's DETACH DELETE does); the plan has
        # already removed it everywhere, these statements only keep the two stores identical if not.
        for cid in plan.chunks_delete:
            conn.execute("DELETE FROM mentions WHERE kb_id = ? AND chunk_id = ?", (kb_id, cid))
            conn.execute("DELETE FROM relationship_sources WHERE kb_id = ? AND chunk_id = ?", (kb_id, cid))
            conn.execute("DELETE FROM chunks WHERE kb_id = ? AND id = ?", (kb_id, cid))
        for ref in plan.entities_delete:
            named = {"kb": kb_id, "type": ref[0], "key": ref[1]}
            conn.execute("DELETE FROM mentions WHERE kb_id = :kb AND type = :type AND key = :key", named)
            keys = [_rel_params(kb_id, _rel_key(row)) for row in conn.execute(_SELECT_ENTITY_RELATIONSHIPS, named)]
            conn.executemany(_DELETE_RELATIONSHIP_SOURCES, keys)
            conn.executemany(_DELETE_RELATIONSHIP, keys)
            conn.execute("DELETE FROM entities WHERE kb_id = :kb AND type = :type AND key = :key", named)
        if plan.delete_document:
            conn.execute("DELETE FROM documents WHERE kb_id = ? AND id = ?", (kb_id, doc_id))

    # --- reads ---

    def counts(self, kb_id: str) -> GraphCounts:
        """Sizes of one KB's graph."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM documents WHERE kb_id = :kb),"
                " (SELECT count(*) FROM chunks WHERE kb_id = :kb),"
                " (SELECT count(*) FROM entities WHERE kb_id = :kb),"
                " (SELECT count(*) FROM relationships WHERE kb_id = :kb),"
                " (SELECT count(*) FROM mentions WHERE kb_id = :kb)",
                {"kb": kb_id},
            ).fetchone()
        return GraphCounts(documents=row[0], chunks=row[1], entities=row[2], relationships=row[3], mentions=row[4])

    def document_counts(self, kb_id: str, doc_id: str) -> DocumentCounts:
        """Sizes of one document's contribution (zeros for an unknown document)."""
        with self._read() as conn:
            row = conn.execute(
                """
                WITH doc_chunks AS (SELECT id FROM chunks WHERE kb_id = :kb AND doc_id = :doc)
                SELECT
                  (SELECT count(*) FROM doc_chunks),
                  (SELECT count(*) FROM (SELECT DISTINCT type, key FROM mentions
                     WHERE kb_id = :kb AND chunk_id IN doc_chunks)),
                  (SELECT count(*) FROM (SELECT DISTINCT type, source_type, source_key, target_type, target_key
                     FROM relationship_sources WHERE kb_id = :kb AND chunk_id IN doc_chunks)),
                  (SELECT count(*) FROM mentions WHERE kb_id = :kb AND chunk_id IN doc_chunks)
                """,
                {"kb": kb_id, "doc": doc_id},
            ).fetchone()
        return DocumentCounts(chunks=row[0], entities=row[1], relationships=row[2], mentions=row[3])

    def _invariant(self, name: str, sql: str, kb_id: str) -> InvariantReport:
        with self._read() as conn:
            found = [row[0] for row in conn.execute(sql, {"kb": kb_id})]
        return InvariantReport(name=name, count=len(found), examples=found[:INVARIANT_EXAMPLES])

    def duplicate_entities(self, kb_id: str) -> InvariantReport:
        """Entities that share (kb_id, type, key) (the primary key should make this 0)."""
        return self._invariant(
            "duplicate_entities",
            "SELECT type || ':' || key || ' x' || count(*) FROM entities WHERE kb_id = :kb "
            "GROUP BY type, key HAVING count(*) > 1",
            kb_id,
        )

    def duplicate_relationships(self, kb_id: str) -> InvariantReport:
        """Relationships that share (type, source, target) (the primary key should make this 0)."""
        return self._invariant(
            "duplicate_relationships",
            "SELECT source_type || ':' || source_key || ' -[' || type || ']-> ' || target_type || ':' "
            "|| target_key || ' x' || count(*) FROM relationships WHERE kb_id = :kb "
            "GROUP BY type, source_type, source_key, target_type, target_key HAVING count(*) > 1",
            kb_id,
        )

    def entities_without_provenance(self, kb_id: str) -> InvariantReport:
        """Entities no chunk of their KB mentions."""
        return self._invariant(
            "entities_without_provenance",
            "SELECT e.type || ':' || e.key FROM entities e WHERE e.kb_id = :kb AND NOT EXISTS ("
            " SELECT 1 FROM mentions m JOIN chunks c ON c.kb_id = m.kb_id AND c.id = m.chunk_id"
            " WHERE m.kb_id = e.kb_id AND m.type = e.type AND m.key = e.key)",
            kb_id,
        )

    def relationships_without_provenance(self, kb_id: str) -> InvariantReport:
        """Relationships with no chunk ids, or naming a chunk that is not in their KB."""
        return self._invariant(
            "relationships_without_provenance",
            "SELECT r.source_type || ':' || r.source_key || ' -[' || r.type || ']-> ' || r.target_type || ':' "
            "|| r.target_key FROM relationships r WHERE r.kb_id = :kb AND ("
            " NOT EXISTS (SELECT 1 FROM relationship_sources s WHERE s.kb_id = r.kb_id AND s.type = r.type"
            "  AND s.source_type = r.source_type AND s.source_key = r.source_key"
            "  AND s.target_type = r.target_type AND s.target_key = r.target_key)"
            " OR EXISTS (SELECT 1 FROM relationship_sources s WHERE s.kb_id = r.kb_id AND s.type = r.type"
            "  AND s.source_type = r.source_type AND s.source_key = r.source_key"
            "  AND s.target_type = r.target_type AND s.target_key = r.target_key AND NOT EXISTS ("
            "   SELECT 1 FROM chunks c WHERE c.kb_id = s.kb_id AND c.id = s.chunk_id)))",
            kb_id,
        )

    def edges_across_kbs(self, kb_id: str) -> InvariantReport:
        """References of this KB's rows that do not resolve within the KB.

        Every table keys its rows by kb_id, so an edge can only leave its KB by pointing at a row
        that is missing from it; this finds such dangling chunk, mention and relationship references.
        """
        return self._invariant(
            "edges_across_kbs",
            """
            SELECT 'HAS_CHUNK ' || c.doc_id || ' -> ' || c.id FROM chunks c WHERE c.kb_id = :kb
              AND NOT EXISTS (SELECT 1 FROM documents d WHERE d.kb_id = c.kb_id AND d.id = c.doc_id)
            UNION ALL
            SELECT 'MENTIONS ' || m.chunk_id || ' -> ' || m.type || ':' || m.key FROM mentions m
            WHERE m.kb_id = :kb AND (
              NOT EXISTS (SELECT 1 FROM chunks c WHERE c.kb_id = m.kb_id AND c.id = m.chunk_id)
              OR NOT EXISTS (SELECT 1 FROM entities e WHERE e.kb_id = m.kb_id AND e.type = m.type
                             AND e.key = m.key))
            UNION ALL
            SELECT r.type || ' ' || r.source_key || ' -> ' || r.target_key FROM relationships r
            WHERE r.kb_id = :kb AND (
              NOT EXISTS (SELECT 1 FROM entities e WHERE e.kb_id = r.kb_id AND e.type = r.source_type
                          AND e.key = r.source_key)
              OR NOT EXISTS (SELECT 1 FROM entities e WHERE e.kb_id = r.kb_id AND e.type = r.target_type
                             AND e.key = r.target_key))
            """,
            kb_id,
        )

    def dump(self, kb_id: str) -> GraphDump:
        """Every node and relationship of the KB, shaped exactly like the Neo4j store's dump."""
        with self._read() as conn:
            documents = {
                doc_id: {"kb_id": kb_id, "id": doc_id, "schema_version": version}
                for doc_id, version in conn.execute(
                    "SELECT id, schema_version FROM documents WHERE kb_id = ?", (kb_id,)
                )
            }
            chunks = {
                cid: {"kb_id": kb_id, "id": cid, "doc_id": doc_id, "ordinal": ordinal}
                for cid, doc_id, ordinal in conn.execute(
                    "SELECT id, doc_id, ordinal FROM chunks WHERE kb_id = ?", (kb_id,)
                )
            }
            entities = {
                (t, k): {"kb_id": kb_id, "type": t, "key": k, "name": name, "description": description}
                for t, k, name, description in conn.execute(
                    "SELECT type, key, name, description FROM entities WHERE kb_id = ?", (kb_id,)
                )
            }
            mentions = conn.execute(
                "SELECT chunk_id, type, key, names, descriptions FROM mentions WHERE kb_id = ?", (kb_id,)
            ).fetchall()
            relationships = conn.execute(
                "SELECT type, source_type, source_key, target_type, target_key, description "
                "FROM relationships WHERE kb_id = ?",
                (kb_id,),
            ).fetchall()
            sources: dict[tuple[str, ...], list[tuple[str, str]]] = {}
            for *key, cid, desc in conn.execute(
                "SELECT type, source_type, source_key, target_type, target_key, chunk_id, description "
                "FROM relationship_sources WHERE kb_id = ?",
                (kb_id,),
            ):
                sources.setdefault(tuple(key), []).append((cid, desc))

        nodes = [(["Document"], p) for p in documents.values()]
        nodes += [(["Chunk"], p) for p in chunks.values()]
        nodes += [(["Entity"], p) for p in entities.values()]
        rels: list[tuple[str, list[str], dict[str, Any], list[str], dict[str, Any], dict[str, Any]]] = [
            ("HAS_CHUNK", ["Document"], documents[p["doc_id"]], ["Chunk"], p, {})
            for p in chunks.values() if p["doc_id"] in documents
        ]
        rels += [
            ("MENTIONS", ["Chunk"], chunks[cid], ["Entity"], entities[(t, k)],
             {"names": json.loads(names), "descriptions": json.loads(descriptions)})
            for cid, t, k, names, descriptions in mentions
        ]
        for rel_type, st, sk, tt, tk, description in relationships:
            rels.append((
                rel_type, ["Entity"], entities[(st, sk)], ["Entity"], entities[(tt, tk)],
                relationship_properties(rel_type, kb_id, description, sources.get((rel_type, st, sk, tt, tk), [])),
            ))
        return GraphDump.build(nodes, rels)

    def close(self) -> None:
        """Nothing is held between operations (each opens and closes its own connection)."""
