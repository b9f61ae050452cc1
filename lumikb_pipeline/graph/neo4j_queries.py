"""Every Cypher statement of the Neo4j graph store, named for what it does.

Rules that hold for every query here:
- Every value is a parameter (`$kb_id`, `row[1]`, ...); no text from a document or the LLM is
  ever formatted into a query string.
- Relationship types are dynamic (`[r:$(row[0])]`, Neo4j 5.26+), so they are parameters too; the
  store has already checked each against the KB's schema and `^[A-Z][A-Z0-9_]{0,63}$`. The one
  exception is the lookup of existing relationships in the lock step, which names the (checked)
  types literally so that Neo4j can use them (see `lock_document`).
- A write is two or three queries in the document's transaction, each kind of change an `UNWIND` batch.
- Every lookup of an Entity, Chunk or Document by its properties names its `kb_id`; everything else
  is reached from nodes found that way. So nothing crosses KBs.
"""

from __future__ import annotations

import functools

from lumikb_pipeline.domain.schema import RELATIONSHIP_TYPE_PATTERN

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

# A document is written in one transaction of two or three queries (`graph.plan` computes the changes
# in Python before the last one, for both stores). No query reads more than the document's own
# records and one bounded aggregate per touched entity and relationship, so a write costs the same
# whatever the number of documents that mention the same entities (hub entities).
#
# Provenance records:
# - an entity's: its MENTIONS edges `(:Chunk)-[:MENTIONS {names, descriptions}]->(:Entity)`;
# - a relationship's: one `Asserts` edge per (chunk, description) record, from the chunk to the
#   relationship's source entity, naming the rest of the relationship's identity:
#   `(:Chunk)-[:Asserts {type, target_type, target_key, description}]->(:Entity)`. The type name
#   has lower-case letters, so it can never be a schema's relationship type (`^[A-Z][A-Z0-9_]*$`).
# An entity or relationship holds `aggregate`, a JSON summary of its records (`plan.EntityState`,
# `plan.RelationshipState`), from which its displayed properties follow.
#
# Lookups: the document, and every entity, through its uniqueness constraint's index, once per
# write (MERGE in the lock step). Everything else is reached from those nodes: a relationship between
# two locked entities with both endpoints bound (`(a)-[r]->(b)`, an Expand(Into) that starts from
# the endpoint with fewer relationships of the type, so never from a hub's side), and the apply step
# addresses the nodes and edges the first steps found by their element ids (valid for the rest of
# the transaction, which holds their locks): no index seek and no expansion per row.

# The entities to lock ($refs, sorted by type, key: one global order, so that concurrent writers
# take entity locks in the same order; the driver retries the rare deadlock) and the touched
# relationships ($rel_lookups, one list per relationship type of the query: [index of the key in the
# write's relationship keys, index of the source in $refs, index of the target in $refs]). MERGE
# creates missing entities now, so concurrent creators of one entity queue on the uniqueness
# constraint; the no-op SET takes the write lock. Then the aggregates of the entities and
# relationships, with their element ids.
#
# The relationship lookup names its type literally (`(a)-[r:EMPLOYS]->(b)`): with a dynamic type
# (`[r:$(type)]`) Neo4j 5.26 expands every relationship of the endpoint with fewer relationships and
# filters the type afterwards, which for a pair of hubs (`Acme Corp -EMPLOYS-> Jane Doe`, both
# mentioned by every document) reads one relationship per document that mentions them. With the
# type known to the planner, Expand(Into) reads only the relationships of that type and direction of
# the endpoint that has fewer of them (a dense node keeps them grouped by type). So these queries are
# built per set of relationship types (`lock_document`, `lock_and_read_aggregates`, cached); each type
# has passed the schema check and `domain.schema.RELATIONSHIP_TYPE_PATTERN` before it reaches the builder, which
# checks the pattern again. Only type names, never text from a document, are part of a query.

def _then_relationships(nodes: str, types: tuple[str, ...]) -> str:
    """`nodes` (a clause that binds `nodes`), then the relationships of $rel_lookups between them."""
    for rel_type in types:
        if not RELATIONSHIP_TYPE_PATTERN.fullmatch(rel_type):
            raise ValueError(f"relationship type {rel_type!r} does not match {RELATIONSHIP_TYPE_PATTERN.pattern}")
    if types:
        lookups = "\n    UNION ALL\n".join(
            f"""    UNWIND $rel_lookups[{i}] AS k
    WITH nodes[k[1]] AS a, nodes[k[2]] AS b, k
    MATCH (a)-[r:{rel_type}]->(b)
    RETURN [k[0], r.description, r.aggregate, elementId(r)] AS row"""
            for i, rel_type in enumerate(types)
        )
        relationships = f"""CALL (nodes) {{
  CALL (nodes) {{
{lookups}
  }}
  RETURN collect(row) AS relationships
}}"""
    else:
        relationships = "WITH nodes, [] AS relationships"
    return f"""{nodes}
{relationships}
RETURN [e IN nodes | [e.name, e.description, e.aggregate, elementId(e)]] AS entities, relationships
"""


_LOCK_ENTITIES = """CALL () {
  UNWIND $refs AS ref
  MERGE (e:Entity {kb_id: $kb_id, type: ref[0], key: ref[1]})
  SET e.kb_id = $kb_id
  RETURN collect(e) AS nodes
}"""


# What a document holds now, read by both lock queries (`d` bound): its chunks, their mentions and
# the relationship records they assert, each row with the element id the apply query addresses.
_FOOTPRINT = """  COLLECT { MATCH (d)-[:HAS_CHUNK]->(c:Chunk) RETURN [c.id, c.ordinal, elementId(c)] } AS chunks,
  COLLECT {
    MATCH (d)-[:HAS_CHUNK]->(c:Chunk)-[m:MENTIONS]->(e:Entity)
    RETURN [c.id, e.type, e.key, m.names, m.descriptions, elementId(m)]
  } AS mentions,
  COLLECT {
    MATCH (d)-[:HAS_CHUNK]->(c:Chunk)-[s:Asserts]->(a:Entity)
    RETURN [s.type, a.type, a.key, s.target_type, s.target_key, c.id, s.description, elementId(s)]
  } AS sources"""

# 1. The document's write lock (MERGE + a no-op SET), its recorded schema version, the chunks of other
#    documents among the new chunk ids, and its footprint reached from its own chunks, with element
#    ids. When the write may proceed (not an older version, no foreign chunk) and the footprint names
#    no entity beyond $refs (always so for a new document), the same query takes step 2 too (`locked`
#    says whether it did): one round trip instead of two. (The footprint's relationships that the new
#    graph does not name join entities of $refs, which this query locked; the store reads them with
#    `read_relationships`.)
_LOCK_DOCUMENT = """
MERGE (d:Document {kb_id: $kb_id, id: $doc_id})
SET d.kb_id = $kb_id
WITH d, d.schema_version AS held,
  COLLECT {
    UNWIND $chunk_ids AS cid
    MATCH (c:Chunk {kb_id: $kb_id, id: cid})
    WHERE c.doc_id <> $doc_id
    RETURN [c.id, c.doc_id] AS row ORDER BY row LIMIT 3
  } AS foreign,
""" + _FOOTPRINT + """
WITH d, held, foreign, chunks, mentions, sources,
  (held IS NULL OR held <= $schema_version) AND size(foreign) = 0
  AND all(m IN mentions WHERE [m[1], m[2]] IN $refs) AS locked
OPTIONAL CALL (locked) {
  WITH locked WHERE locked
"""


@functools.cache
def lock_document(types: tuple[str, ...]) -> str:
    """Steps 1 and 2 in one query, for a write whose new graph has relationships of `types` (sorted)."""
    body = "\n".join("  " + line for line in _then_relationships(_LOCK_ENTITIES, types).strip().splitlines())
    return _LOCK_DOCUMENT + body + """
}
RETURN elementId(d) AS document, held, foreign, chunks, mentions, sources, locked, entities, relationships
"""


# For removal: a document that does not exist yields no row (nothing to remove).
LOCK_EXISTING_DOCUMENT = """
MATCH (d:Document {kb_id: $kb_id, id: $doc_id})
SET d.kb_id = $kb_id
RETURN elementId(d) AS document, d.schema_version AS held, [] AS foreign,
""" + _FOOTPRINT + """,
  false AS locked, [] AS entities, [] AS relationships
"""


@functools.cache
def lock_and_read_aggregates(types: tuple[str, ...]) -> str:
    """2. Step 2 alone, when the footprint holds entities or relationships the new graph does not
    name (a re-extraction that dropped some, a removal); `types` as in `lock_document`."""
    return _then_relationships(_LOCK_ENTITIES, types)


@functools.cache
def read_relationships(types: tuple[str, ...]) -> str:
    """The relationships of $rel_lookups between the entities of $entities (element ids, locked by
    this transaction), of `types` as in `lock_document`."""
    return _then_relationships("""CALL () {
  UNWIND $entities AS id
  MATCH (e:Entity) WHERE elementId(e) = id
  RETURN collect(e) AS nodes
}
WITH nodes WHERE size(nodes) = size($entities)""", types)


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

# 3. Apply the plan, each kind of change an UNWIND batch, on the elements the first steps found:
#    $document, $entities and $chunks are element ids; the entities and the chunks are bound once,
#    into lists that the rows index (`e` = index in $entities; `c` = index in the document's chunks:
#    those of $chunks, then the new ones of $chunks_new in order). Existing edges and relationships
#    are addressed by their element ids. New chunks, edges and relationships are CREATEd.
#   $chunks_new           [chunk id, ordinal]
#   $chunks_ordinal       [c, ordinal]            (an existing chunk whose ordinal changed)
#   $entities_upsert      [e, name, description, aggregate]
#   $mentions_delete      [element id]
#   $mentions_create      [c, e, names, descriptions]
#   $mentions_update      [element id, names, descriptions]
#   $sources_delete       [element id]
#   $sources_add          [c, e (the source), rel type, target type, target key, description]
#   $relationships_delete [element id]
#   $relationships_create [e source, e target, rel type, description, aggregate]
#   $relationships_update [element id, description, aggregate]
#   $chunks_delete        [c];  $entities_delete [e]
# When an element id does not resolve (it cannot, under the locks the transaction holds) nothing is
# applied and no row is returned; the store then raises, which rolls the transaction back.
#
# The query holds only the parts whose rows are not empty (`apply_plan(parts)`, cached): a new
# document needs four of the twelve optional parts, and each part left out is a subquery Neo4j
# neither plans nor sets up per execution.
_APPLY_PARTS: dict[str, str] = {
    "chunks_ordinal": """CALL (chunks) {
  UNWIND $chunks_ordinal AS row
  WITH chunks[row[0]] AS c, row
  SET c.ordinal = row[1]
}""",
    "entities_upsert": """CALL (nodes) {
  UNWIND $entities_upsert AS row
  WITH nodes[row[0]] AS e, row
  SET e.name = row[1], e.description = row[2], e.aggregate = row[3]
}""",
    "mentions_delete": """CALL () {
  UNWIND $mentions_delete AS id
  MATCH ()-[m:MENTIONS]->() WHERE elementId(m) = id
  DELETE m
}""",
    "mentions_create": """CALL (chunks, nodes) {
  UNWIND $mentions_create AS row
  WITH chunks[row[0]] AS c, nodes[row[1]] AS e, row
  CREATE (c)-[:MENTIONS {names: row[2], descriptions: row[3]}]->(e)
}""",
    "mentions_update": """CALL () {
  UNWIND $mentions_update AS row
  MATCH ()-[m:MENTIONS]->() WHERE elementId(m) = row[0]
  SET m.names = row[1], m.descriptions = row[2]
}""",
    "sources_delete": """CALL () {
  UNWIND $sources_delete AS id
  MATCH ()-[s:Asserts]->() WHERE elementId(s) = id
  DELETE s
}""",
    "relationships_delete": """CALL () {
  UNWIND $relationships_delete AS id
  MATCH ()-[r]->() WHERE elementId(r) = id
  DELETE r
}""",
    "relationships_create": """CALL (nodes) {
  UNWIND $relationships_create AS row
  WITH nodes[row[0]] AS a, nodes[row[1]] AS b, row
  CREATE (a)-[:$(row[2]) {type: row[2], kb_id: $kb_id, description: row[3], aggregate: row[4]}]->(b)
}""",
    "relationships_update": """CALL () {
  UNWIND $relationships_update AS row
  MATCH ()-[r]->() WHERE elementId(r) = row[0]
  SET r.description = row[1], r.aggregate = row[2]
}""",
    "sources_add": """CALL (chunks, nodes) {
  UNWIND $sources_add AS row
  WITH chunks[row[0]] AS c, nodes[row[1]] AS a, row
  CREATE (c)-[:Asserts {type: row[2], target_type: row[3], target_key: row[4], description: row[5]}]->(a)
}""",
    "chunks_delete": """CALL (chunks) {
  UNWIND $chunks_delete AS i
  WITH chunks[i] AS c
  DETACH DELETE c
}""",
    "entities_delete": """CALL (nodes) {
  UNWIND $entities_delete AS i
  WITH nodes[i] AS e
  DETACH DELETE e
}""",
}
APPLY_PARTS = tuple(_APPLY_PARTS)  # in the order they run
"""The row lists of `apply_plan` that are parts of their own (the others are always present)."""


@functools.cache
def apply_plan(parts: frozenset[str]) -> str:
    """The apply step with the parts (of `APPLY_PARTS`) that have rows."""
    return """MATCH (d:Document) WHERE elementId(d) = $document
CALL () {
  UNWIND $entities AS id
  MATCH (e:Entity) WHERE elementId(e) = id
  RETURN collect(e) AS nodes
}
CALL () {
  UNWIND $chunks AS id
  MATCH (c:Chunk) WHERE elementId(c) = id
  RETURN collect(c) AS existing
}
WITH d, nodes, existing
WHERE size(nodes) = size($entities) AND size(existing) = size($chunks)
CALL (d) {
  WITH d WHERE NOT $remove
  SET d.schema_version = $schema_version
}
CALL (d) {
  UNWIND $chunks_new AS row
  CREATE (d)-[:HAS_CHUNK]->(c:Chunk {kb_id: $kb_id, id: row[0], doc_id: $doc_id, ordinal: row[1]})
  RETURN collect(c) AS created
}
WITH d, nodes, existing + created AS chunks
""" + "\n".join(_APPLY_PARTS[part] for part in APPLY_PARTS if part in parts) + """
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
