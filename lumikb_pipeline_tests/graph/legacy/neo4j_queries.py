"""Every Cypher statement of the Neo4j graph store, named for what it does.

Rules that hold for every query here:
- Every value is a parameter (`$kb_id`, `row[1]`, ...); no text from a document or the LLM is
  ever formatted into a query string.
- Relationship types are dynamic (`[r:$(row[0])]`, Neo4j 5.26+), so they are parameters too; the
  store has already checked each against the KB's schema and `^[A-Z][A-Z0-9_]{0,63}$`.
- A write is one query in the document's transaction, each kind of change an `UNWIND` batch.
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

# --- writing a document: one query ------------------------------------------------------------

# The whole write of one document is one query in the document's transaction: the store sends the
# new contribution and Neo4j computes and applies the changes, merging provenance with the rules of
# `graph.merging` expressed in Cypher (the embedded store applies the same rules in Python through
# `graph.plan`; `test_graph_store_differential.py` checks the two against each other). So a
# document costs one round trip and one commit, and no stored provenance travels to the client.
#
# Parameters (positional rows: packing maps costs the driver a string per key per row):
#   $chunks          [chunk id, ordinal, [indexes into $entities of the entities it mentions]]
#   $entities        [type, key, name, [description] or [] when blank]
#   $relationships   [type, source index, target index, description ("" when blank),
#                     chunk ids (unique, in `text_order`)]
#   $merge           merge mode (else replace); $remove: delete the document at the end
#   $max_description `merging.MAX_MERGED_DESCRIPTION`
#
# Steps, in order:
# 1. The document's write lock (taken by the prefix, MERGE or MATCH + SET), so two writes of one
#    document are serialised before either reads anything. No row comes out when a new chunk id
#    belongs to another document of the KB (the store then reports which, and rolls back).
# 2. The footprint, read under that lock: the document's chunks, the entities they mention, the
#    relationships that list one of its chunks (reached from those entities: a relationship's
#    endpoints are entities of the same contribution). Relationships are read as references; their
#    properties are read only after step 3 holds their endpoints' locks.
# 3. Lock every touched entity, old and new, *in one global order* (ORDER BY type, key), so that
#    concurrent writers take entity locks in the same order, which avoids most deadlocks (the driver
#    retries the rest). MERGE creates missing entities now, so a concurrent writer of the same new
#    entity waits on the uniqueness constraint. `SET e.kb_id = $kb_id` writes nothing new but takes
#    the node's exclusive lock, held until commit: no other writer changes the provenance of a
#    touched entity under us. An entity is *created* when MERGE made it (it has no name yet) and
#    *fresh* when no chunk mentions it: its name and description are then this document's, set
#    here, and need no recomputation.
# 4. Chunks: a new chunk gets HAS_CHUNK and its MENTIONS with CREATE; an existing one is updated
#    with MERGE and, in replace mode, loses the MENTIONS the new graph no longer has (in merge mode
#    names and descriptions are unioned).
# 5. Relationships: one with a created endpoint cannot exist yet and is CREATEd; the others are
#    MERGEd and their provenance records recomputed: other documents' records, plus ours (replace)
#    or ours old and new (merge).
# 6. Replace mode: relationships of the footprint that the new graph does not list keep only other
#    documents' records, or are deleted when none is left; chunks no longer there are deleted with
#    their MENTIONS.
# 7. Touched entities that are not fresh get their name and description recomputed from every
#    MENTIONS edge, or are deleted when none is left.
#
# Provenance records: a MENTIONS edge carries `names` and `descriptions` (sorted lists); a
# relationship carries parallel lists `source_chunk_ids[i]`, `source_descriptions[i]` (sorted by
# chunk id, then description), from which `chunk_ids` and `description` are derived. Cypher sorts
# strings by UTF-16 code unit, which is `merging.text_order`; `size` and `left` count code points
# like Python. Descriptions are joined with a bounded `reduce` (Cypher has no string join).

_JOINED_DESCRIPTIONS = """left(reduce(joined = '', x IN {items} |
      CASE WHEN joined = '' THEN x WHEN size(joined) >= $max_description THEN joined
      ELSE joined + '\\n' + x END), $max_description)"""

_FOOTPRINT = """
WITH d, [row IN $chunks | row[0]] AS new_chunk_ids,
     COLLECT { MATCH (d)-[:HAS_CHUNK]->(c:Chunk) RETURN c } AS old_chunks
WHERE NOT EXISTS {
  UNWIND new_chunk_ids AS cid
  MATCH (c:Chunk {kb_id: $kb_id, id: cid})
  WHERE c.doc_id <> $doc_id
}
WITH d, new_chunk_ids, old_chunks, [c IN old_chunks | c.id] AS old_chunk_ids,
     COLLECT { UNWIND old_chunks AS c MATCH (c)-[:MENTIONS]->(e:Entity) RETURN DISTINCT e } AS old_entities
WITH *, old_chunk_ids + new_chunk_ids AS doc_chunk_ids,
     COLLECT {
       UNWIND old_entities AS a
       MATCH (a)-[r]->(:Entity)
       WHERE any(cid IN r.chunk_ids WHERE cid IN old_chunk_ids)
       RETURN r
     } AS old_relationships
"""

# `locked` rows: [index into $entities or -1 for footprint-only entities, entity, created, fresh];
# `entities[i]` and `created[i]` are aligned with $entities.
_LOCK_ENTITIES = """
CALL (old_entities) {
  UNWIND [e IN old_entities | [e.type, e.key, -1]]
         + [i IN range(0, size($entities) - 1) | [$entities[i][0], $entities[i][1], i]] AS ref
  WITH ref[0] AS type, ref[1] AS key, max(ref[2]) AS i
  ORDER BY type, key
  MERGE (e:Entity {kb_id: $kb_id, type: type, key: key})
  WITH i, e, e.name IS NULL AS created
  SET e.kb_id = $kb_id
  WITH i, e, created, i >= 0 AND (created OR NOT EXISTS { (e)<-[:MENTIONS]-() }) AS fresh
  CALL (i, e, fresh) {
    WITH i, e WHERE fresh
    SET e.name = $entities[i][2], e.description = left(coalesce($entities[i][3][0], ''), $max_description)
  }
  RETURN collect([i, e, created, fresh]) AS locked
}
WITH *, [x IN locked WHERE NOT x[3] | x[1]] AS recompute,
     COLLECT { UNWIND locked AS x WITH x WHERE x[0] >= 0 RETURN x ORDER BY x[0] } AS written
WITH *, [x IN written | x[1]] AS entities, [x IN written | x[2]] AS created
"""

_WRITE_CHUNKS = """
CALL (d, entities) {
  UNWIND $chunks AS row
  MERGE (c:Chunk {kb_id: $kb_id, id: row[0]})
  WITH row, c, c.doc_id IS NULL AS chunk_created
  SET c.doc_id = $doc_id, c.ordinal = row[1]
  WITH row, c, chunk_created
  CALL (d, c, chunk_created, row, entities) {
    WITH * WHERE chunk_created
    CREATE (d)-[:HAS_CHUNK]->(c)
    WITH c, row
    UNWIND row[2] AS i
    WITH c, entities[i] AS e, $entities[i] AS entity
    CREATE (c)-[:MENTIONS {names: [entity[2]], descriptions: entity[3]}]->(e)
  }
  CALL (d, c, chunk_created, row, entities) {
    WITH * WHERE NOT chunk_created
    MERGE (d)-[:HAS_CHUNK]->(c)
    WITH c, row
    CALL (c, row, entities) {
      MATCH (c)-[m:MENTIONS]->(e)
      WHERE NOT $merge AND NOT e IN [i IN row[2] | entities[i]]
      DELETE m
      RETURN count(m) AS removed
    }
    CALL (c, row, entities) {
      UNWIND row[2] AS i
      WITH entities[i] AS e, $entities[i] AS entity
      MERGE (c)-[m:MENTIONS]->(e)
      SET m.names = CASE WHEN $merge AND m.names IS NOT NULL
                    THEN COLLECT { UNWIND m.names + [entity[2]] AS n WITH DISTINCT n RETURN n ORDER BY n }
                    ELSE [entity[2]] END,
          m.descriptions = CASE WHEN $merge AND m.descriptions IS NOT NULL
                    THEN COLLECT { UNWIND m.descriptions + entity[3] AS x WITH DISTINCT x RETURN x ORDER BY x }
                    ELSE entity[3] END
    }
    RETURN removed
  }
  RETURN sum(removed) AS stale_mentions_removed
}
"""

# The relationship type is dynamic (`$(row[0])`) and was checked against the schema; `type` is also
# a property so that property-only consumers (exports, GraphRAG retrievers) see it.
_WRITE_RELATIONSHIPS = """
CALL (entities, created) {
  UNWIND $relationships AS row
  WITH row WHERE created[row[1]] OR created[row[2]]
  WITH row, entities[row[1]] AS a, entities[row[2]] AS b
  CREATE (a)-[r:$(row[0])]->(b)
  SET r.type = row[0], r.kb_id = $kb_id, r.description = left(row[3], $max_description),
      r.chunk_ids = row[4], r.source_chunk_ids = row[4], r.source_descriptions = [cid IN row[4] | row[3]]
  RETURN count(r) AS relationships_added
}
CALL (entities, created, doc_chunk_ids) {
  UNWIND $relationships AS row
  WITH row WHERE NOT (created[row[1]] OR created[row[2]])
  WITH row, entities[row[1]] AS a, entities[row[2]] AS b
  MERGE (a)-[r:$(row[0])]->(b)
  WITH row, r, r.source_chunk_ids IS NULL AS relationship_created,
       [i IN range(0, size(coalesce(r.source_chunk_ids, [])) - 1)
        | [r.source_chunk_ids[i], r.source_descriptions[i]]] AS stored
  WITH r, relationship_created,
       [s IN stored WHERE $merge OR NOT s[0] IN doc_chunk_ids] + [cid IN row[4] | [cid, row[3]]] AS sources
  CALL (r, sources) {
    WITH r, CASE WHEN size(sources) = 1 THEN sources
            ELSE COLLECT { UNWIND sources AS s WITH DISTINCT s RETURN s ORDER BY s[0], s[1] } END AS merged
    WITH r, merged,
         CASE WHEN size(merged) = 1 THEN [s IN merged WHERE s[1] <> '' | s[1]]
         ELSE COLLECT { UNWIND merged AS s WITH DISTINCT s[1] AS x WHERE x <> '' RETURN x ORDER BY x } END
         AS descriptions
    SET r.type = type(r), r.kb_id = $kb_id,
        r.chunk_ids = CASE WHEN size(merged) = 1 THEN [merged[0][0]]
                      ELSE COLLECT { UNWIND merged AS s WITH DISTINCT s[0] AS cid RETURN cid ORDER BY cid } END,
        r.description = """ + _JOINED_DESCRIPTIONS.format(items="descriptions") + """,
        r.source_chunk_ids = [s IN merged | s[0]],
        r.source_descriptions = [s IN merged | s[1]]
  }
  RETURN collect(r) AS rewritten, sum(CASE WHEN relationship_created THEN 1 ELSE 0 END) AS relationships_merged
}
"""

_DROP_OLD_PROVENANCE = """
CALL (old_relationships, rewritten, doc_chunk_ids) {
  UNWIND old_relationships AS r
  WITH r WHERE NOT $merge AND NOT r IN rewritten
  WITH r, [i IN range(0, size(r.source_chunk_ids) - 1) WHERE NOT r.source_chunk_ids[i] IN doc_chunk_ids
           | [r.source_chunk_ids[i], r.source_descriptions[i]]] AS sources
  CALL (r, sources) {
    WITH r, sources WHERE size(sources) = 0
    DELETE r
  }
  CALL (r, sources) {
    WITH r, sources WHERE size(sources) > 0
    WITH r, sources,
         COLLECT { UNWIND sources AS s WITH DISTINCT s[1] AS x WHERE x <> '' RETURN x ORDER BY x } AS descriptions
    SET r.chunk_ids = COLLECT { UNWIND sources AS s WITH DISTINCT s[0] AS cid RETURN cid ORDER BY cid },
        r.description = """ + _JOINED_DESCRIPTIONS.format(items="descriptions") + """,
        r.source_chunk_ids = [s IN sources | s[0]],
        r.source_descriptions = [s IN sources | s[1]]
  }
  RETURN sum(CASE WHEN size(sources) = 0 THEN 1 ELSE 0 END) AS relationships_deleted
}
CALL (old_chunks, new_chunk_ids) {
  UNWIND old_chunks AS c
  WITH c WHERE NOT $merge AND NOT c.id IN new_chunk_ids
  WITH c, COUNT { (c)-[:MENTIONS]->() } AS mentions
  DETACH DELETE c
  RETURN count(*) AS chunks_removed, sum(mentions) AS chunk_mentions_removed
}
"""

# With one MENTIONS edge the name is its smallest name (the lists are sorted) and the description
# its descriptions joined; with several, the name given in most records (ties: smallest text).
_RECOMPUTE_ENTITIES = """
CALL (recompute) {
  UNWIND recompute AS e
  WITH e, COLLECT { MATCH (:Chunk)-[m:MENTIONS]->(e) RETURN m } AS mentions
  CALL (e, mentions) {
    WITH e WHERE size(mentions) = 0
    DETACH DELETE e
  }
  CALL (e, mentions) {
    WITH e, mentions WHERE size(mentions) = 1
    SET e.name = mentions[0].names[0],
        e.description = """ + _JOINED_DESCRIPTIONS.format(items="mentions[0].descriptions") + """
  }
  CALL (e, mentions) {
    WITH e, mentions WHERE size(mentions) > 1
    CALL (mentions) {
      UNWIND mentions AS m
      UNWIND m.names AS n
      WITH n, count(*) AS k
      ORDER BY k DESC, n
      LIMIT 1
      RETURN n AS name
    }
    WITH e, name,
         COLLECT { UNWIND mentions AS m UNWIND m.descriptions AS x WITH DISTINCT x RETURN x ORDER BY x }
         AS descriptions
    SET e.name = name,
        e.description = """ + _JOINED_DESCRIPTIONS.format(items="descriptions") + """
  }
  RETURN sum(CASE WHEN size(mentions) = 0 THEN 1 ELSE 0 END) AS entities_deleted
}
CALL (d) {
  WITH d WHERE $remove
  DETACH DELETE d
}
RETURN chunks_removed,
       stale_mentions_removed + chunk_mentions_removed AS mentions_removed,
       size([x IN written WHERE x[3]]) AS entities_created,
       entities_deleted,
       relationships_added + relationships_merged AS relationships_created,
       relationships_deleted
"""

_WRITE_BODY = (
    _FOOTPRINT + _LOCK_ENTITIES + _WRITE_CHUNKS + _WRITE_RELATIONSHIPS + _DROP_OLD_PROVENANCE + _RECOMPUTE_ENTITIES
)

# Writes are ordered by schema version: the document's lock is taken first (`SET d.kb_id`, a no-op
# write), then its recorded version is read under it; a write older than that version yields no row
# and changes nothing (the store then reads `DOCUMENT_VERSION` to say why, as it reads
# `FOREIGN_CHUNKS` for the other no-row case).
WRITE_DOCUMENT = (
    """
MERGE (d:Document {kb_id: $kb_id, id: $doc_id})
SET d.kb_id = $kb_id
WITH d WHERE coalesce(d.schema_version, $schema_version) <= $schema_version
SET d.schema_version = $schema_version
"""
    + _WRITE_BODY
)

# For removal: a document that does not exist yields no row (nothing to remove). Setting kb_id to its
# own value is a no-op that takes the node's write lock.
REMOVE_DOCUMENT = (
    """
MATCH (d:Document {kb_id: $kb_id, id: $doc_id})
SET d.kb_id = $kb_id
"""
    + _WRITE_BODY
)

# Run only after WRITE_DOCUMENT returned no row: the version the graph holds the document at (a newer
# one refused the write), else the chunks of other documents that made it fail.
DOCUMENT_VERSION = """
MATCH (d:Document {kb_id: $kb_id, id: $doc_id})
RETURN d.schema_version AS schema_version
"""

# Run only after WRITE_DOCUMENT returned no row, to name the offending chunks in the error.
FOREIGN_CHUNKS = """
UNWIND $chunk_ids AS cid
MATCH (c:Chunk {kb_id: $kb_id, id: cid})
WHERE c.doc_id <> $doc_id
RETURN c.id AS chunk_id, c.doc_id AS doc_id
ORDER BY chunk_id
LIMIT 3
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
