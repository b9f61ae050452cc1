"""Every Cypher statement of the Neo4j graph store, named for what it does.

Rules that hold for every query here:
- Every value is a parameter (`$kb_id`, `row[1]`, ...); no text from a document or the LLM is
  ever formatted into a query string.
- Relationship types are dynamic (`[r:$(row[0])]`, Neo4j 5.26+), so they are parameters too; the
  store has already checked each against the KB's schema and `^[A-Z][A-Z0-9_]{0,63}$`.
- A write is two queries in the document's transaction: lock-and-read, then apply, each kind of
  change an `UNWIND` batch.
- Every lookup of an Entity, Chunk or Document by its properties names its `kb_id`; the apply step
  addresses entities by the element ids that the same transaction's kb-scoped MERGE returned. So
  nothing crosses KBs.
"""

from __future__ import annotations

# --- schema ------------------------------------------------------------------------------------

CONSTRAINTS: tuple[str, ...] = (
    "CREATE CONSTRAINT lumikb_document_identity IF NOT EXISTS "
    "FOR (d:Document) REQUIRE (d.kb_id, d.id) IS UNIQUE",
    "CREATE CONSTRAINT lumikb_chunk_identity IF NOT EXISTS "
    "FOR (c:Chunk) REQUIRE (c.kb_id, c.id) IS UNIQUE",
    "CREATE CONSTRAINT lumikb_entity_identity IF NOT EXISTS "
    "FOR (e:Entity) REQUIRE (e.kb_id, e.type, e.key) IS UNIQUE",
)

# Per-KB scans (counts, invariant checks) use the uniqueness constraints' composite indexes: an
# equality on `kb_id` plus `IS NOT NULL` on the other key properties is an index seek (see the
# counts below). Separate kb_id indexes would cost one more index update per node written; earlier
# versions created them, so they are dropped.
DROPPED_INDEXES: tuple[str, ...] = (
    "DROP INDEX lumikb_document_kb IF EXISTS",
    "DROP INDEX lumikb_chunk_kb IF EXISTS",
    "DROP INDEX lumikb_entity_kb IF EXISTS",
)

AWAIT_INDEXES = "CALL db.awaitIndexes($timeout_s)"

# --- steps 1 and 2: lock and read, in one query -------------------------------------------------

# Step 1, under the document's write lock (taken first, by MERGE or MATCH + SET, so two writes of
# the same document are serialised before either reads anything): the document's footprint, that
# is its chunks, the entities they mention, the relationships that list one of its chunks (reached
# from the entities its chunks mention: a relationship's endpoints are always entities of the same
# contribution), and which of the new chunk ids belong to another document.
#
# Step 2: lock every touched entity, the footprint's and the new graph's (`$refs`), *in one global
# order* (ORDER BY type, key), so that concurrent writers take entity locks in the same order, which
# avoids most deadlocks (the driver retries the rest). MERGE creates missing entities now so that a
# concurrent writer of the same new entity waits on the uniqueness constraint instead of computing
# its name and description without ours. `SET e.kb_id = $kb_id` writes nothing new but takes the
# node's exclusive lock, held until commit: the provenance read here cannot change under us. The
# relationships are read after every lock is held (the entity subquery aggregates, so it completes
# before the next starts). Each entity's element id is returned so that step 3 finds it by id
# instead of by index seek (the ids come from this KB's MERGE and serve only this transaction).
#
# `$refs` rows are [type, key]; `$rels` rows are [type, source type, source key, target type,
# target key] (lists, not maps: this is the largest parameter and lists pack faster).
_LOCK_AND_READ = """
WITH d, COLLECT { MATCH (d)-[:HAS_CHUNK]->(c:Chunk) RETURN c.id } AS chunk_ids
WITH d, chunk_ids,
  COLLECT { MATCH (d)-[:HAS_CHUNK]->(c:Chunk) RETURN [c.id, c.ordinal] } AS chunks,
  COLLECT {
    MATCH (d)-[:HAS_CHUNK]->(:Chunk)-[:MENTIONS]->(e:Entity)
    RETURN DISTINCT [e.type, e.key]
  } AS refs,
  COLLECT {
    MATCH (d)-[:HAS_CHUNK]->(:Chunk)-[:MENTIONS]->(a:Entity)
    WITH DISTINCT a
    MATCH (a)-[r]->(b:Entity)
    WHERE any(cid IN r.chunk_ids WHERE cid IN chunk_ids)
    RETURN [type(r), a.type, a.key, b.type, b.key]
  } AS rel_keys,
  COLLECT {
    UNWIND $chunk_ids AS cid
    MATCH (c:Chunk {kb_id: $kb_id, id: cid})
    WHERE c.doc_id <> $doc_id
    RETURN [c.id, c.doc_id]
  } AS foreign_chunks
CALL (refs) {
  UNWIND refs + $refs AS ref
  WITH DISTINCT ref
  ORDER BY ref[0], ref[1]
  MERGE (e:Entity {kb_id: $kb_id, type: ref[0], key: ref[1]})
  ON CREATE SET e.name = '', e.description = ''
  SET e.kb_id = $kb_id
  RETURN collect([ref[0], ref[1], elementId(e), e.name, e.description,
                  COLLECT { MATCH (c:Chunk)-[m:MENTIONS]->(e) RETURN [c.id, m.names, m.descriptions] }]) AS entities
}
CALL (rel_keys) {
  UNWIND rel_keys + $rels AS row
  WITH DISTINCT row
  MATCH (a:Entity {kb_id: $kb_id, type: row[1], key: row[2]})
        -[r:$(row[0])]->
        (b:Entity {kb_id: $kb_id, type: row[3], key: row[4]})
  RETURN collect(row + [r.description, r.chunk_ids, r.source_chunk_ids, r.source_descriptions]) AS relationships
}
RETURN chunks, refs, rel_keys, foreign_chunks, entities, relationships
"""

LOCK_AND_READ_FOR_WRITE = (
    """
MERGE (d:Document {kb_id: $kb_id, id: $doc_id})
SET d.schema_version = $schema_version
"""
    + _LOCK_AND_READ
)

# For removal: a document that does not exist yields no row (nothing to remove). Setting kb_id to its
# own value is a no-op that takes the node's write lock.
LOCK_AND_READ_FOR_REMOVAL = (
    """
MATCH (d:Document {kb_id: $kb_id, id: $doc_id})
SET d.kb_id = $kb_id
"""
    + _LOCK_AND_READ
)

# --- step 3: apply the plan, in one query ------------------------------------------------------

# Each part is a unit subquery over one parameter list (an empty list makes it a no-op). Entities
# are addressed by the element ids step 2 returned. The large batches (entities, mentions,
# relationships) are positional rows, documented above each part: packing maps costs the Python
# driver a string per key per row, and these batches are most of a write's payload.
# Order: what later parts MATCH is created first; chunks and entities are deleted last because
# DETACH DELETE would otherwise drop edges still being rewritten.

_UPSERT_CHUNKS = """
CALL () {
  MATCH (d:Document {kb_id: $kb_id, id: $doc_id})
  UNWIND $chunks_upsert AS row
  MERGE (c:Chunk {kb_id: $kb_id, id: row.id})
  SET c.doc_id = $doc_id, c.ordinal = row.ordinal
  MERGE (d)-[:HAS_CHUNK]->(c)
}
"""

# row: [entity element id, name, description]
_UPDATE_ENTITIES = """
CALL () {
  UNWIND $entities_upsert AS row
  MATCH (e:Entity) WHERE elementId(e) = row[0]
  SET e.name = row[1], e.description = row[2]
}
"""

_DELETE_MENTIONS = """
CALL () {
  UNWIND $mentions_delete AS row
  MATCH (e:Entity) WHERE elementId(e) = row.entity
  MATCH (:Chunk {kb_id: $kb_id, id: row.chunk_id})-[m:MENTIONS]->(e)
  DELETE m
}
"""

# Grouped by chunk, one chunk lookup per chunk: {chunk_id, mentions: [[entity element id, names,
# descriptions], ...]}
_UPSERT_MENTIONS = """
CALL () {
  UNWIND $mentions_upsert AS chunk_rows
  MATCH (c:Chunk {kb_id: $kb_id, id: chunk_rows.chunk_id})
  UNWIND chunk_rows.mentions AS row
  MATCH (e:Entity) WHERE elementId(e) = row[0]
  MERGE (c)-[m:MENTIONS]->(e)
  SET m.names = row[1], m.descriptions = row[2]
}
"""

_DELETE_RELATIONSHIPS = """
CALL () {
  UNWIND $relationships_delete AS row
  MATCH (a:Entity) WHERE elementId(a) = row.source
  MATCH (b:Entity) WHERE elementId(b) = row.target
  MATCH (a)-[r:$(row.type)]->(b)
  DELETE r
}
"""

# The Neo4j relationship type is the schema's type; `type` is also a property so that property-only
# consumers (exports, GraphRAG retrievers) see it. `source_chunk_ids[i]` and `source_descriptions[i]`
# are one provenance record; `chunk_ids` and `description` are derived from them.
# row: [type, source element id, target element id, description, chunk_ids, source_chunk_ids,
#       source_descriptions]
_UPSERT_RELATIONSHIPS = """
CALL () {
  UNWIND $relationships_upsert AS row
  MATCH (a:Entity) WHERE elementId(a) = row[1]
  MATCH (b:Entity) WHERE elementId(b) = row[2]
  MERGE (a)-[r:$(row[0])]->(b)
  SET r.type = row[0], r.kb_id = $kb_id, r.description = row[3], r.chunk_ids = row[4],
      r.source_chunk_ids = row[5], r.source_descriptions = row[6]
}
"""

_DELETE_CHUNKS = """
CALL () {
  UNWIND $chunks_delete AS cid
  MATCH (c:Chunk {kb_id: $kb_id, id: cid})
  DETACH DELETE c
}
"""

# DETACH: by the invariants an entity without MENTIONS has no relationship left either; detaching
# keeps a broken graph from blocking the delete.
_DELETE_ENTITIES = """
CALL () {
  UNWIND $entities_delete AS eid
  MATCH (e:Entity) WHERE elementId(e) = eid
  DETACH DELETE e
}
"""

_DELETE_DOCUMENT = """
CALL () {
  MATCH (d:Document {kb_id: $kb_id, id: $doc_id})
  WHERE $delete_document
  DETACH DELETE d
}
"""

APPLY_PLAN = (
    _UPSERT_CHUNKS
    + _UPDATE_ENTITIES
    + _DELETE_MENTIONS
    + _UPSERT_MENTIONS
    + _DELETE_RELATIONSHIPS
    + _UPSERT_RELATIONSHIPS
    + _DELETE_CHUNKS
    + _DELETE_ENTITIES
    + _DELETE_DOCUMENT
    + "RETURN 1 AS applied\n"
)

# --- counts ------------------------------------------------------------------------------------

# Per-KB scans name the other key properties of the label's uniqueness constraint with `IS NOT NULL`
# (always true): that makes `kb_id = $kb_id` a seek on the constraint's composite index instead of a
# scan of every node with the label.

COUNTS = """
RETURN
  COUNT { MATCH (d:Document {kb_id: $kb_id} WHERE d.id IS NOT NULL) } AS documents,
  COUNT { MATCH (c:Chunk {kb_id: $kb_id} WHERE c.id IS NOT NULL) } AS chunks,
  COUNT { MATCH (e:Entity {kb_id: $kb_id} WHERE e.type IS NOT NULL AND e.key IS NOT NULL) } AS entities,
  COUNT {
    MATCH (a:Entity {kb_id: $kb_id} WHERE a.type IS NOT NULL AND a.key IS NOT NULL)-[r]->(:Entity)
  } AS relationships,
  COUNT { MATCH (c:Chunk {kb_id: $kb_id} WHERE c.id IS NOT NULL)-[m:MENTIONS]->(:Entity) } AS mentions
"""

DOCUMENT_COUNTS = """
MATCH (d:Document {kb_id: $kb_id, id: $doc_id})
WITH d, COLLECT { MATCH (d)-[:HAS_CHUNK]->(c:Chunk) RETURN c.id } AS chunk_ids
RETURN
  size(chunk_ids) AS chunks,
  COUNT { MATCH (d)-[:HAS_CHUNK]->(:Chunk)-[:MENTIONS]->(e:Entity) RETURN DISTINCT e } AS entities,
  COUNT {
    MATCH (d)-[:HAS_CHUNK]->(:Chunk)-[:MENTIONS]->(a:Entity)
    WITH DISTINCT a
    MATCH (a)-[r]->(:Entity)
    WHERE any(cid IN r.chunk_ids WHERE cid IN chunk_ids)
    RETURN r
  } AS relationships,
  COUNT { MATCH (d)-[:HAS_CHUNK]->(:Chunk)-[m:MENTIONS]->(:Entity) } AS mentions
"""

# --- invariants (each returns `count` and up to $limit `examples`) -------------------------------

DUPLICATE_ENTITIES = """
MATCH (e:Entity {kb_id: $kb_id} WHERE e.type IS NOT NULL AND e.key IS NOT NULL)
WITH e.type AS type, e.key AS key, count(*) AS n
WHERE n > 1
WITH collect(type + ':' + key + ' x' + toString(n)) AS found
RETURN size(found) AS count, found[..$limit] AS examples
"""

DUPLICATE_RELATIONSHIPS = """
MATCH (a:Entity {kb_id: $kb_id} WHERE a.type IS NOT NULL AND a.key IS NOT NULL)-[r]->(b:Entity)
WITH a, b, type(r) AS type, count(r) AS n
WHERE n > 1
WITH collect(a.type + ':' + a.key + ' -[' + type + ']-> ' + b.type + ':' + b.key + ' x' + toString(n))
     AS found
RETURN size(found) AS count, found[..$limit] AS examples
"""

ENTITIES_WITHOUT_PROVENANCE = """
MATCH (e:Entity {kb_id: $kb_id} WHERE e.type IS NOT NULL AND e.key IS NOT NULL)
WHERE NOT EXISTS { MATCH (:Chunk {kb_id: $kb_id})-[:MENTIONS]->(e) }
WITH collect(e.type + ':' + e.key) AS found
RETURN size(found) AS count, found[..$limit] AS examples
"""

# Without provenance: no chunk ids at all, or a chunk id that names no chunk of the KB (stale).
RELATIONSHIPS_WITHOUT_PROVENANCE = """
MATCH (a:Entity {kb_id: $kb_id} WHERE a.type IS NOT NULL AND a.key IS NOT NULL)-[r]->(b:Entity)
WHERE coalesce(size(r.chunk_ids), 0) = 0
   OR any(cid IN r.chunk_ids WHERE NOT EXISTS { MATCH (:Chunk {kb_id: $kb_id, id: cid}) })
WITH collect(a.type + ':' + a.key + ' -[' + type(r) + ']-> ' + b.type + ':' + b.key) AS found
RETURN size(found) AS count, found[..$limit] AS examples
"""

EDGES_ACROSS_KBS = """
CALL () {
  MATCH (d:Document {kb_id: $kb_id} WHERE d.id IS NOT NULL)-[:HAS_CHUNK]-(c)
  WHERE c.kb_id <> $kb_id
  RETURN 'HAS_CHUNK ' + d.id + ' -> ' + coalesce(c.kb_id, '?') + '/' + coalesce(c.id, '?') AS edge
  UNION ALL
  MATCH (c:Chunk {kb_id: $kb_id} WHERE c.id IS NOT NULL)-[:MENTIONS]-(e)
  WHERE e.kb_id <> $kb_id
  RETURN 'MENTIONS ' + c.id + ' -> ' + coalesce(e.kb_id, '?') + '/' + coalesce(e.key, '?') AS edge
  UNION ALL
  MATCH (e:Entity {kb_id: $kb_id} WHERE e.type IS NOT NULL AND e.key IS NOT NULL)<-[:MENTIONS]-(c)
  WHERE c.kb_id <> $kb_id
  RETURN 'MENTIONS ' + coalesce(c.kb_id, '?') + '/' + coalesce(c.id, '?') + ' -> ' + e.key AS edge
  UNION ALL
  MATCH (a:Entity {kb_id: $kb_id} WHERE a.type IS NOT NULL AND a.key IS NOT NULL)-[r]-(b:Entity)
  WHERE b.kb_id <> $kb_id OR r.kb_id <> $kb_id
  RETURN type(r) + ' ' + a.key + ' - ' + coalesce(b.kb_id, '?') + '/' + b.key AS edge
}
WITH collect(edge) AS found
RETURN size(found) AS count, found[..$limit] AS examples
"""

# --- dump --------------------------------------------------------------------------------------

# Label-free on purpose: a dump must show *everything* of the KB, including nodes a bug gave an
# unexpected label, so it scans all nodes; it serves tests and debugging, not production paths.
DUMP_NODES = """
MATCH (n)
WHERE n.kb_id = $kb_id
RETURN labels(n) AS labels, properties(n) AS properties
"""

DUMP_RELATIONSHIPS = """
MATCH (a)-[r]->(b)
WHERE a.kb_id = $kb_id OR b.kb_id = $kb_id
RETURN type(r) AS type, labels(a) AS start_labels, properties(a) AS start,
       labels(b) AS end_labels, properties(b) AS end, properties(r) AS properties
"""
