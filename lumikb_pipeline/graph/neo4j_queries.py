"""Every Cypher statement of the Neo4j graph store, named for what it does.

Rules that hold for every query here:
- Every value is a parameter (`$kb_id`, `row[1]`, ...); no text from a document or the LLM is
  ever formatted into a query string.
- Relationship types are dynamic (`[r:$(row[0])]`, Neo4j 5.26+), so they are parameters too; the
  store has already checked each against the KB's schema and `^[A-Z][A-Z0-9_]{0,63}$`.
- A write is three queries in the document's transaction, each kind of change an `UNWIND` batch.
- Every lookup of an Entity, Chunk or Document by its properties names its `kb_id`; everything else
  is reached from nodes found that way. So nothing crosses KBs.
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

# --- writing a document -------------------------------------------------------------------------

# A document is written in one transaction of three queries (`graph.plan` computes the changes in
# Python between the second and the third, for both stores). No query reads more than the document's
# own records and one bounded aggregate per touched entity and relationship, so a write costs the
# same whatever the number of documents that mention the same entities (hub entities).
#
# Provenance records:
# - an entity's: its MENTIONS edges `(:Chunk)-[:MENTIONS {names, descriptions}]->(:Entity)`;
# - a relationship's: one `Asserts` edge per (chunk, description) record, from the chunk to the
#   relationship's source entity, naming the rest of the relationship's identity:
#   `(:Chunk)-[:Asserts {type, target_type, target_key, description}]->(:Entity)`. The type name
#   has lower-case letters, so it can never be a schema's relationship type (`^[A-Z][A-Z0-9_]*$`).
# An entity or relationship holds `aggregate`, a JSON summary of its records (`plan.EntityState`,
# `plan.RelationshipState`), from which its displayed properties follow.

# 1. The document's write lock (MERGE + a no-op SET), its recorded schema version, the chunks of other
#    documents among the new chunk ids, and its footprint reached from its own chunks.
_FOOTPRINT = """
RETURN d.schema_version AS held,
  COLLECT {
    UNWIND $chunk_ids AS cid
    MATCH (c:Chunk {kb_id: $kb_id, id: cid})
    WHERE c.doc_id <> $doc_id
    RETURN [c.id, c.doc_id] AS row ORDER BY row LIMIT 3
  } AS foreign,
  COLLECT { MATCH (d)-[:HAS_CHUNK]->(c:Chunk) RETURN [c.id, c.ordinal] } AS chunks,
  COLLECT {
    MATCH (d)-[:HAS_CHUNK]->(c:Chunk)-[m:MENTIONS]->(e:Entity)
    RETURN [c.id, e.type, e.key, m.names, m.descriptions]
  } AS mentions,
  COLLECT {
    MATCH (d)-[:HAS_CHUNK]->(c:Chunk)-[s:Asserts]->(a:Entity)
    RETURN [s.type, a.type, a.key, s.target_type, s.target_key, c.id, s.description]
  } AS sources
"""

LOCK_DOCUMENT = """
MERGE (d:Document {kb_id: $kb_id, id: $doc_id})
SET d.kb_id = $kb_id
""" + _FOOTPRINT

# For removal: a document that does not exist yields no row (nothing to remove).
LOCK_EXISTING_DOCUMENT = """
MATCH (d:Document {kb_id: $kb_id, id: $doc_id})
SET d.kb_id = $kb_id
""" + _FOOTPRINT

# 2. Lock every touched entity in one global order ($refs is sorted by type, key), so that concurrent
#    writers take entity locks in the same order (the driver retries the rare deadlock). MERGE creates
#    missing entities now, so concurrent creators of one entity queue on the uniqueness constraint; the
#    no-op SET takes the write lock. Then read the aggregates of the touched entities and relationships
#    (a relationship's endpoints are among the locked entities).
LOCK_AND_READ_AGGREGATES = """
CALL () {
  UNWIND $refs AS ref
  MERGE (e:Entity {kb_id: $kb_id, type: ref[0], key: ref[1]})
  SET e.kb_id = $kb_id
  RETURN collect([ref[0], ref[1], e.name, e.description, e.aggregate]) AS entities
}
CALL () {
  UNWIND $rel_keys AS k
  MATCH (a:Entity {kb_id: $kb_id, type: k[1], key: k[2]})-[r:$(k[0])]->(b:Entity)
  WHERE b.kb_id = $kb_id AND b.type = k[3] AND b.key = k[4]
  RETURN collect([k, r.description, r.aggregate]) AS relationships
}
RETURN entities, relationships
"""

# Every record of one element, for the plan's rare recount (`plan.RecordLoader`).
ENTITY_RECORDS = """
MATCH (:Entity {kb_id: $kb_id, type: $type, key: $key})<-[m:MENTIONS]-(c:Chunk)
RETURN c.id AS chunk_id, m.names AS names, m.descriptions AS descriptions
"""

RELATIONSHIP_RECORDS = """
MATCH (:Entity {kb_id: $kb_id, type: $source_type, key: $source_key})<-[s:Asserts]-(c:Chunk)
WHERE s.type = $type AND s.target_type = $target_type AND s.target_key = $target_key
RETURN c.id AS chunk_id, s.description AS description
"""

# 3. Apply the plan, each kind of change an UNWIND batch. Edges are always reached from the chunk
#    (few edges), never from the entity (a hub has one per mentioning chunk); new chunks, edges and
#    relationships are CREATEd, which reads nothing.
#   $chunks_upsert        [chunk id, ordinal, new]
#   $entities_upsert      [type, key, name, description, aggregate]
#   $mentions_delete      [chunk id, type, key]
#   $mentions_upsert      [chunk id, type, key, names, descriptions, new]
#   $sources_delete / $sources_add   [rel type, source type, source key, target type, target key,
#                                     chunk id, description]
#   $relationships_delete [rel type, source type, source key, target type, target key]
#   $relationships_upsert [rel type, source type, source key, target type, target key, description,
#                          aggregate, new]
#   $chunks_delete        [chunk id];  $entities_delete [type, key]
APPLY_PLAN = """
MATCH (d:Document {kb_id: $kb_id, id: $doc_id})
CALL (d) {
  WITH d WHERE NOT $remove
  SET d.schema_version = $schema_version
}
CALL (d) {
  UNWIND $chunks_upsert AS row
  CALL (d, row) {
    WITH d, row WHERE row[2]
    CREATE (d)-[:HAS_CHUNK]->(:Chunk {kb_id: $kb_id, id: row[0], doc_id: $doc_id, ordinal: row[1]})
  }
  CALL (row) {
    WITH row WHERE NOT row[2]
    MATCH (c:Chunk {kb_id: $kb_id, id: row[0]})
    SET c.ordinal = row[1]
  }
}
CALL () {
  UNWIND $entities_upsert AS row
  MATCH (e:Entity {kb_id: $kb_id, type: row[0], key: row[1]})
  SET e.name = row[2], e.description = row[3], e.aggregate = row[4]
}
CALL () {
  UNWIND $mentions_delete AS row
  MATCH (:Chunk {kb_id: $kb_id, id: row[0]})-[m:MENTIONS]->(e:Entity)
  WHERE e.type = row[1] AND e.key = row[2]
  DELETE m
}
CALL () {
  UNWIND $mentions_upsert AS row
  MATCH (c:Chunk {kb_id: $kb_id, id: row[0]})
  CALL (c, row) {
    WITH c, row WHERE row[5]
    MATCH (e:Entity {kb_id: $kb_id, type: row[1], key: row[2]})
    CREATE (c)-[:MENTIONS {names: row[3], descriptions: row[4]}]->(e)
  }
  CALL (c, row) {
    WITH c, row WHERE NOT row[5]
    MATCH (c)-[m:MENTIONS]->(e:Entity)
    WHERE e.type = row[1] AND e.key = row[2]
    SET m.names = row[3], m.descriptions = row[4]
  }
}
CALL () {
  UNWIND $sources_delete AS row
  MATCH (:Chunk {kb_id: $kb_id, id: row[5]})-[s:Asserts]->(a:Entity)
  WHERE a.type = row[1] AND a.key = row[2] AND s.type = row[0] AND s.target_type = row[3]
    AND s.target_key = row[4] AND s.description = row[6]
  DELETE s
}
CALL () {
  UNWIND $relationships_delete AS row
  MATCH (a:Entity {kb_id: $kb_id, type: row[1], key: row[2]})-[r:$(row[0])]->(b:Entity)
  WHERE b.kb_id = $kb_id AND b.type = row[3] AND b.key = row[4]
  DELETE r
}
CALL () {
  UNWIND $relationships_upsert AS row
  MATCH (a:Entity {kb_id: $kb_id, type: row[1], key: row[2]})
  MATCH (b:Entity {kb_id: $kb_id, type: row[3], key: row[4]})
  CALL (a, b, row) {
    WITH a, b, row WHERE row[7]
    CREATE (a)-[:$(row[0]) {type: row[0], kb_id: $kb_id, description: row[5], aggregate: row[6]}]->(b)
  }
  CALL (a, b, row) {
    WITH a, b, row WHERE NOT row[7]
    MATCH (a)-[r:$(row[0])]->(b)
    SET r.description = row[5], r.aggregate = row[6]
  }
}
CALL () {
  UNWIND $sources_add AS row
  MATCH (c:Chunk {kb_id: $kb_id, id: row[5]})
  MATCH (a:Entity {kb_id: $kb_id, type: row[1], key: row[2]})
  CREATE (c)-[:Asserts {type: row[0], target_type: row[3], target_key: row[4], description: row[6]}]->(a)
}
CALL () {
  UNWIND $chunks_delete AS cid
  MATCH (c:Chunk {kb_id: $kb_id, id: cid})
  DETACH DELETE c
}
CALL () {
  UNWIND $entities_delete AS row
  MATCH (e:Entity {kb_id: $kb_id, type: row[0], key: row[1]})
  DETACH DELETE e
}
CALL (d) {
  WITH d WHERE $remove
  DETACH DELETE d
}
RETURN 1 AS applied
"""

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
    MATCH (d)-[:HAS_CHUNK]->(:Chunk)-[s:Asserts]->(a:Entity)
    RETURN DISTINCT a, s.type, s.target_type, s.target_key
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
WHERE r.aggregate IS NULL
   OR NOT EXISTS {
     MATCH (c:Chunk)-[s:Asserts]->(a)
     WHERE c.kb_id = $kb_id AND s.type = type(r) AND s.target_type = b.type AND s.target_key = b.key
   }
WITH collect(a.type + ':' + a.key + ' -[' + type(r) + ']-> ' + b.type + ':' + b.key) AS found
RETURN size(found) AS count, found[..$limit] AS examples
"""

EDGES_ACROSS_KBS = """
CALL () {
  MATCH (d:Document {kb_id: $kb_id} WHERE d.id IS NOT NULL)-[:HAS_CHUNK]-(c)
  WHERE c.kb_id <> $kb_id
  RETURN 'HAS_CHUNK ' + d.id + ' -> ' + coalesce(c.kb_id, '?') + '/' + coalesce(c.id, '?') AS edge
  UNION ALL
  MATCH (c:Chunk {kb_id: $kb_id} WHERE c.id IS NOT NULL)-[m:MENTIONS|Asserts]-(e)
  WHERE e.kb_id <> $kb_id
  RETURN type(m) + ' ' + c.id + ' -> ' + coalesce(e.kb_id, '?') + '/' + coalesce(e.key, '?') AS edge
  UNION ALL
  MATCH (e:Entity {kb_id: $kb_id} WHERE e.type IS NOT NULL AND e.key IS NOT NULL)<-[m:MENTIONS|Asserts]-(c)
  WHERE c.kb_id <> $kb_id
  RETURN type(m) + ' ' + coalesce(c.kb_id, '?') + '/' + coalesce(c.id, '?') + ' -> ' + e.key AS edge
  UNION ALL
  MATCH (a:Entity {kb_id: $kb_id} WHERE a.type IS NOT NULL AND a.key IS NOT NULL)-[r]-(b:Entity)
  WHERE type(r) <> 'Asserts' AND (b.kb_id <> $kb_id OR r.kb_id <> $kb_id)
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
RETURN labels(n) AS labels, n {.*, aggregate: null} AS properties
"""

DUMP_RELATIONSHIPS = """
MATCH (a)-[r]->(b)
WHERE a.kb_id = $kb_id OR b.kb_id = $kb_id
RETURN type(r) AS type, labels(a) AS start_labels, a {.*, aggregate: null} AS start,
       labels(b) AS end_labels, b {.*, aggregate: null} AS end, r {.*, aggregate: null} AS properties
"""

# --- migration of graphs written before provenance records (`Neo4jGraphStore.migrate_provenance`) ----

# Which model the database holds; absent on databases written before the marker existed. Every batch
# of the migration takes this node's write lock first, so concurrent migrators run one after another.
MODEL_VERSION = """
OPTIONAL MATCH (m:LumikbGraphModel {id: 'provenance'})
RETURN m.version AS version
"""

LOCK_MODEL = """
MERGE (m:LumikbGraphModel {id: 'provenance'})
SET m.locked = true
RETURN m.version AS version
"""

SET_MODEL_VERSION = """
MERGE (m:LumikbGraphModel {id: 'provenance'})
SET m.version = $version
"""

# Relationships between entities that still hold provenance as list properties.
OLD_RELATIONSHIPS = """
MATCH (:Entity)-[r]->(:Entity)
WHERE r.source_chunk_ids IS NOT NULL
RETURN elementId(r) AS id
"""

READ_OLD_RELATIONSHIPS = """
UNWIND $ids AS id
MATCH (a:Entity)-[r]->(b:Entity)
WHERE elementId(r) = id AND r.source_chunk_ids IS NOT NULL
RETURN id, [i IN range(0, size(r.source_chunk_ids) - 1)
           WHERE EXISTS { MATCH (:Chunk {kb_id: a.kb_id, id: r.source_chunk_ids[i]}) }
           | [r.source_chunk_ids[i], coalesce(r.source_descriptions[i], '')]] AS pairs
"""

# Rows: [element id, description, aggregate, [[chunk id, description], ...]]. A record naming a chunk
# that no longer exists was already no provenance: it was dropped when read.
CONVERT_OLD_RELATIONSHIPS = """
UNWIND $rows AS row
MATCH (a:Entity)-[r]->(b:Entity)
WHERE elementId(r) = row[0] AND r.source_chunk_ids IS NOT NULL
SET r.description = row[1], r.aggregate = row[2]
REMOVE r.chunk_ids, r.source_chunk_ids, r.source_descriptions
WITH a, b, r, row
CALL (a, b, r, row) {
  UNWIND row[3] AS source
  MATCH (c:Chunk {kb_id: a.kb_id, id: source[0]})
  CREATE (c)-[:Asserts {type: type(r), target_type: b.type, target_key: b.key, description: source[1]}]->(a)
}
"""

# Entities with no aggregate yet.
OLD_ENTITIES = """
MATCH (e:Entity)
WHERE e.aggregate IS NULL AND e.name IS NOT NULL
RETURN elementId(e) AS id
"""

READ_OLD_ENTITIES = """
UNWIND $ids AS id
MATCH (e:Entity)
WHERE elementId(e) = id AND e.aggregate IS NULL
RETURN id, COLLECT { MATCH (e)<-[m:MENTIONS]-(:Chunk) RETURN [m.names, m.descriptions] } AS records
"""

CONVERT_OLD_ENTITIES = """
UNWIND $rows AS row
MATCH (e:Entity)
WHERE elementId(e) = row[0] AND e.aggregate IS NULL
SET e.name = row[1], e.description = row[2], e.aggregate = row[3]
"""
