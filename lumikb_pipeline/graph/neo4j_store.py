"""The Neo4j graph store: batched, idempotent writes, one transaction per document (two queries: lock
the document and its entities and read the footprint and the aggregates, apply the plan of
`graph.plan`; a third between them when the document loses entities or relationships).

One driver per process (a connection pool; created lazily, re-created after a fork, closed at exit)
is shared by every store opened in the process. Writes run in the driver's managed `execute_write`,
which retries transient errors, deadlocks included, with the same transaction function; the
function only reads and writes through its transaction, so a retry starts from scratch.
"""

from __future__ import annotations

import atexit
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from neo4j import Driver, GraphDatabase, ManagedTransaction
from neo4j.exceptions import ClientError

import lumikb_pipeline.graph.neo4j_queries as q
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
    Tally,
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

# Generous: under heavy contention (many workers writing documents that share popular entities) a
# transaction may need several deadlock retries; giving up early would lose a write.
MAX_TRANSACTION_RETRY_TIME_S = 120.0
INDEX_WAIT_S = 300
MODEL_VERSION = 2  # 2: relationship provenance as `Asserts` records, aggregates on entities and relationships
MIGRATION_BATCH = 500

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


ASSERTS = "Asserts"  # the type of relationship provenance records (see neo4j_queries)
_INTERNAL_PROPERTIES = frozenset({"aggregate"})


def _visible(properties: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in properties.items() if k not in _INTERNAL_PROPERTIES}


class _Records:
    """Every record of one element, read in the write's transaction (`plan.RecordLoader`)."""

    def __init__(self, tx: ManagedTransaction, kb_id: str) -> None:
        self._tx, self._kb_id = tx, kb_id

    def entity_records(self, ref: Ref) -> list[tuple[str, MentionValue]]:
        result = self._tx.run(q.ENTITY_RECORDS, kb_id=self._kb_id, type=ref[0], key=ref[1])
        return [(r["chunk_id"], (frozenset(r["names"]), frozenset(r["descriptions"]))) for r in result]

    def relationship_records(self, key: RelKey) -> list[Source]:
        result = self._tx.run(
            q.RELATIONSHIP_RECORDS, kb_id=self._kb_id, type=key[0], source_type=key[1], source_key=key[2],
            target_type=key[3], target_key=key[4],
        )
        return [(r["chunk_id"], r["description"]) for r in result]


@dataclass
class _Found:
    """What the lock steps found, by element id (valid for the rest of the transaction, which holds
    the locks): the apply step addresses nodes and edges by them instead of looking them up again."""

    document: str
    chunks: dict[str, str] = field(default_factory=dict)  # chunk id -> element id
    mentions: dict[tuple[str, Ref], str] = field(default_factory=dict)
    sources: dict[tuple[RelKey, Source], str] = field(default_factory=dict)
    entities: list[str] = field(default_factory=list)  # in the order of the locked refs
    relationships: dict[RelKey, str] = field(default_factory=dict)


def _footprint(record: Any) -> tuple[Footprint, _Found]:
    footprint = Footprint(exists=record["held"] is not None)
    found = _Found(document=record["document"])
    for cid, ordinal, element in record["chunks"]:
        footprint.chunks[cid] = ordinal
        found.chunks[cid] = element
    for cid, t, k, names, descriptions, element in record["mentions"]:
        footprint.mentions[(cid, (t, k))] = (frozenset(names), frozenset(descriptions))
        found.mentions[(cid, (t, k))] = element
    for t, st, sk, tt, tk, cid, description, element in record["sources"]:
        footprint.sources[(t, st, sk, tt, tk)].add((cid, description))
        found.sources[((t, st, sk, tt, tk), (cid, description))] = element
    return footprint, found


def _relationship_types(rel_keys: list[RelKey]) -> tuple[str, ...]:
    """The relationship types of the lock step's query (`neo4j_queries.lock_document`)."""
    return tuple(sorted({key[0] for key in rel_keys}))


def _lookups(refs: list[Ref], rel_keys: list[RelKey], types: tuple[str, ...]) -> list[list[list[int]]]:
    """`$rel_lookups` of the lock and read queries (shape documented in `neo4j_queries`)."""
    index = {ref: i for i, ref in enumerate(refs)}
    lookups: dict[str, list[list[int]]] = {rel_type: [] for rel_type in types}
    for i, key in enumerate(rel_keys):
        lookups[key[0]].append([i, index[(key[1], key[2])], index[(key[3], key[4])]])
    return [lookups[rel_type] for rel_type in types]


def _read_entities(entities: list[Any], refs: list[Ref], state: StoredState, found: _Found) -> None:
    """The entities' aggregates, as the lock step read them (in the order of `refs`)."""
    found.entities = []
    for ref, (name, description, aggregate, element) in zip(refs, entities, strict=True):
        found.entities.append(element)
        if aggregate is not None:
            state.entities[ref] = EntityState.from_stored(name, description, aggregate)


def _read_relationships(relationships: list[Any], rel_keys: list[RelKey], state: StoredState, found: _Found) -> None:
    """The relationships' aggregates, as a lookup of `rel_keys` read them (absent: no such relationship)."""
    for i, description, aggregate, element in relationships:
        key = rel_keys[i]
        state.relationships[key] = RelationshipState.from_stored(description, aggregate)
        found.relationships[key] = element


def _not_found_again(kb_id: str, doc_id: str) -> RuntimeError:
    # Cannot happen while the transaction holds the locks; raising rolls the transaction back.
    return RuntimeError(f"graph store: an element locked by the write of document {doc_id!r} in KB {kb_id!r} "
                        "was not found again in the same transaction; nothing was written")


def _apply_parameters(
    kb_id: str, doc_id: str, schema_version: int, footprint: Footprint, plan: WritePlan, refs: list[Ref],
    found: _Found, unnamed: list[Ref],
) -> dict[str, Any]:
    """The parameters of `neo4j_queries.apply_plan` (row shapes documented there)."""
    entity = {ref: i for i, ref in enumerate(refs)}
    existing = list(found.chunks)
    new_chunks = [(cid, ordinal) for cid, ordinal in plan.chunks_upsert if cid not in footprint.chunks]
    chunk = {cid: i for i, cid in enumerate([*existing, *(cid for cid, _ in new_chunks)])}
    mentions_create, mentions_update = [], []
    for m in plan.mentions_upsert:
        element = found.mentions.get((m.chunk_id, m.ref))
        if element is None:
            mentions_create.append([chunk[m.chunk_id], entity[m.ref], list(m.names), list(m.descriptions)])
        else:
            mentions_update.append([element, list(m.names), list(m.descriptions)])
    relationships_create, relationships_update = [], []
    for key, rel in plan.relationships_upsert:
        element = found.relationships.get(key)
        if element is None:
            relationships_create.append([entity[(key[1], key[2])], entity[(key[3], key[4])], key[0], rel.description,
                                         rel.aggregate_json()])
        else:
            relationships_update.append([element, rel.description, rel.aggregate_json()])
    return {
        "kb_id": kb_id,
        "doc_id": doc_id,
        "document": found.document,
        "entities": found.entities,
        "chunks": [found.chunks[cid] for cid in existing],
        "schema_version": schema_version,
        "remove": plan.delete_document,
        "chunks_new": [[cid, ordinal] for cid, ordinal in new_chunks],
        "chunks_ordinal": [[chunk[cid], ordinal] for cid, ordinal in plan.chunks_upsert if cid in footprint.chunks],
        "entities_upsert": [
            [entity[ref], e.name, e.description, e.aggregate_json()] for ref, e in plan.entities_upsert
        ],
        "mentions_delete": [found.mentions[edge] for edge in plan.mentions_delete],
        "mentions_create": mentions_create,
        "mentions_update": mentions_update,
        "sources_delete": [found.sources[(key, source)] for key, source in plan.sources_delete],
        "sources_add": [
            [chunk[source[0]], entity[(key[1], key[2])], key[0], key[3], key[4], source[1]]
            for key, source in plan.sources_add
        ],
        "relationships_delete": [found.relationships[key] for key in plan.relationships_delete],
        "relationships_create": relationships_create,
        "relationships_update": relationships_update,
        "chunks_delete": [chunk[cid] for cid in plan.chunks_delete],
        "entities_delete": [entity[ref] for ref in [*plan.entities_delete, *unnamed]],
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
        self.migrate_provenance()
        _schema_ready.add(ready_key)

    def migrate_provenance(self, batch: int = MIGRATION_BATCH, force: bool = False) -> int:
        """Convert a database written before provenance records to the current model; returns the
        relationships and entities converted. Idempotent, and run by `ensure_schema`.

        Earlier versions kept a relationship's provenance as list properties on the relationship
        (`chunk_ids`, `source_chunk_ids`, `source_descriptions`), rewritten by every write. Each pair
        becomes an `Asserts` record, the lists are removed, and every relationship and entity gets its
        `aggregate`. It runs in batches of `batch` elements, one transaction each, each taking the
        model marker's lock, so that concurrent processes run it once; a process that finds the marker
        at the current version skips it with one query (`force` looks for old elements all the same:
        old processes that wrote after the conversion; stop them before starting new ones).
        """
        records, _, _ = self._driver.execute_query(q.MODEL_VERSION, database_=self.database)
        if not force and records and (records[0]["version"] or 0) >= MODEL_VERSION:
            return 0
        converted = 0
        for list_query, convert in ((q.OLD_RELATIONSHIPS, self._convert_relationships),
                                    (q.OLD_ENTITIES, self._convert_entities)):
            found, _, _ = self._driver.execute_query(list_query, database_=self.database)
            ids = [r["id"] for r in found]
            for start in range(0, len(ids), batch):
                with self._driver.session(database=self.database) as session:
                    converted += session.execute_write(convert, ids[start:start + batch])
        self._driver.execute_query(q.SET_MODEL_VERSION, version=MODEL_VERSION, database_=self.database)
        return converted

    @staticmethod
    def _convert_relationships(tx: ManagedTransaction, ids: list[str]) -> int:
        tx.run(q.LOCK_MODEL).consume()
        rows = []
        for r in tx.run(q.READ_OLD_RELATIONSHIPS, ids=ids):
            pairs = [(cid, description) for cid, description in r["pairs"]]
            rel = relationship_state(pairs) or RelationshipState("", 0, Tally())
            rows.append([r["id"], rel.description, rel.aggregate_json(), sorted(set(pairs))])
        tx.run(q.CONVERT_OLD_RELATIONSHIPS, rows=rows).consume()
        return len(rows)

    @staticmethod
    def _convert_entities(tx: ManagedTransaction, ids: list[str]) -> int:
        tx.run(q.LOCK_MODEL).consume()
        rows = []
        for r in tx.run(q.READ_OLD_ENTITIES, ids=ids):
            entity = entity_state((frozenset(names or ()), frozenset(descriptions or ()))
                                  for names, descriptions in r["records"])
            if entity is not None:
                rows.append([r["id"], entity.name, entity.description, entity.aggregate_json()])
        tx.run(q.CONVERT_OLD_ENTITIES, rows=rows).consume()
        return len(rows)

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
            return session.execute_write(self._write, kb_id, doc_id, None, WriteMode.REPLACE)

    @staticmethod
    def _write(
        tx: ManagedTransaction, kb_id: str, doc_id: str, graph: DocumentGraph | None, mode: WriteMode
    ) -> WriteSummary:
        """The transaction function (the driver may run it again after a transient error): lock the
        document and read its footprint, lock the entities and read the aggregates (in the same query
        when the footprint names nothing beyond the new graph), plan, apply."""
        if graph is not None:
            refs = touched_refs(Footprint(), graph)
            rel_keys = touched_rel_keys(Footprint(), graph)
            types = _relationship_types(rel_keys)
            record = tx.run(
                q.lock_document(types), kb_id=kb_id, doc_id=doc_id, chunk_ids=[c.id for c in graph.chunks],
                schema_version=graph.schema_version, refs=[list(ref) for ref in refs],
                rel_lookups=_lookups(refs, rel_keys, types),
            ).single()
            assert record is not None  # MERGE always yields the document's row
            held = record["held"]
            if held is not None and held > graph.schema_version:
                return WriteSummary(kb_id=kb_id, doc_id=doc_id, mode=mode, newer_version_held=held)
            if record["foreign"]:
                raise foreign_chunks_error(kb_id, doc_id, [(cid, owner) for cid, owner in record["foreign"]])
        else:
            record = tx.run(q.LOCK_EXISTING_DOCUMENT, kb_id=kb_id, doc_id=doc_id).single()
            if record is None:  # removal of a document that is not there
                return WriteSummary(kb_id=kb_id, doc_id=doc_id, mode=mode)
        footprint, found = _footprint(record)
        state = StoredState()
        missing: list[RelKey] = []
        locked = bool(record["locked"])
        if locked:
            # The footprint's entities were among the new graph's and are locked; its relationships
            # that the new graph does not name join them (a relationship's endpoints are entities of
            # the same contribution) and are read next.
            missing = sorted(footprint.rel_keys - set(rel_keys))
            ends = set(refs)
            if any((k[1], k[2]) not in ends or (k[3], k[4]) not in ends for k in missing):
                locked = False  # cannot happen for a validated contribution; the full path handles it
        if locked:
            _read_entities(record["entities"], refs, state, found)
            _read_relationships(record["relationships"], rel_keys, state, found)
            if missing:
                types = _relationship_types(missing)
                stored = tx.run(
                    q.read_relationships(types), entities=found.entities, rel_lookups=_lookups(refs, missing, types)
                ).single()
                if stored is None:
                    raise _not_found_again(kb_id, doc_id)
                _read_relationships(stored["relationships"], missing, state, found)
        else:  # the footprint names entities beyond the new graph's: lock them all, in order
            refs = touched_refs(footprint, graph)
            rel_keys = touched_rel_keys(footprint, graph)
            types = _relationship_types(rel_keys)
            stored = tx.run(
                q.lock_and_read_aggregates(types), kb_id=kb_id, refs=[list(ref) for ref in refs],
                rel_lookups=_lookups(refs, rel_keys, types),
            ).single()
            assert stored is not None  # the query always returns its one row
            _read_entities(stored["entities"], refs, state, found)
            _read_relationships(stored["relationships"], rel_keys, state, found)
        plan = plan_write(kb_id, doc_id, graph, mode, footprint, state, _Records(tx, kb_id))
        # Entities the lock step created that the plan does not write (it always writes those the
        # new graph mentions; this only guards against leaving a nameless node behind).
        written = {ref for ref, _ in plan.entities_upsert}
        unnamed = [ref for ref in refs if ref not in state.entities and ref not in written]
        schema_version = graph.schema_version if graph is not None else 0
        parameters = _apply_parameters(kb_id, doc_id, schema_version, footprint, plan, refs, found, unnamed)
        parts = frozenset(part for part in q.APPLY_PARTS if parameters[part])
        if tx.run(q.apply_plan(parts), parameters).single() is None:
            raise _not_found_again(kb_id, doc_id)
        return plan.summary

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
        # Relationship records (`Asserts` edges) are shown as the provenance lists of their
        # relationship, and aggregates are internal, so the dump has the shape of the embedded store's.
        sources: dict[tuple[str, ...], list[tuple[str, str]]] = {}
        for r in rels:
            if r["type"] == ASSERTS:
                props, source = r["properties"], r["end"]
                key = (props.get("type"), source.get("type"), source.get("key"), props.get("target_type"),
                       props.get("target_key"))
                sources.setdefault(key, []).append((r["start"].get("id"), props.get("description")))
        dumped_rels = []
        for r in rels:
            if r["type"] == ASSERTS:
                continue
            props = _visible(r["properties"])
            if "Entity" in r["start_labels"] and "Entity" in r["end_labels"]:
                start, end = r["start"], r["end"]
                key = (r["type"], start.get("type"), start.get("key"), end.get("type"), end.get("key"))
                extra = {k: v for k, v in props.items() if k not in ("type", "kb_id", "description")}
                props = {**extra, **relationship_properties(
                    props.get("type"), props.get("kb_id"), props.get("description"), sources.get(key, [])
                )}
            dumped_rels.append((r["type"], r["start_labels"], _visible(r["start"]), r["end_labels"],
                                _visible(r["end"]), props))
        return GraphDump.build(((r["labels"], _visible(r["properties"])) for r in nodes), dumped_rels)

    def close(self) -> None:
        """Nothing to release per store: the process-wide driver stays open for reuse and is closed
        at exit (or by `close_shared_drivers`)."""
