"""The body of one writer process of the concurrency test (importable, so `spawn` can start it)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from threading import Barrier

from lumikb_pipeline.domain.results import DocumentGraph
from lumikb_pipeline.graph.store import GraphStore

# A write is either a document graph to write in replace mode, or (kb_id, doc_id) to remove.
Operation = DocumentGraph | tuple[str, str]


class _RetryCounter(logging.Handler):
    """Counts the driver's "transaction failed and will be retried" warnings (deadlocks included)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retried" in record.getMessage():
            self.retries += 1


def open_store(target: tuple[str, ...]) -> GraphStore:
    if target[0] == "embedded":
        from lumikb_pipeline.graph.embedded_store import EmbeddedGraphStore

        return EmbeddedGraphStore(Path(target[1]))
    from lumikb_pipeline.graph.neo4j_store import Neo4jGraphStore

    _, uri, user, password, database = target
    return Neo4jGraphStore(uri, user, password, database=database)


def run_writer(target: tuple[str, ...], operations: list[Operation], barrier: Barrier) -> tuple[int, float, float]:
    """Apply `operations` in order once every writer is ready (`barrier` is a Manager's proxy of a
    threading barrier, shared by the processes); return how many transactions the
    driver retried (transient errors and deadlocks), and when the writer started and finished."""
    from lumikb_pipeline_tests.graph.factories import SCHEMA

    counter = _RetryCounter()
    logging.getLogger("neo4j").addHandler(counter)
    store = open_store(target)
    store.ensure_schema()
    barrier.wait(timeout=120)
    started = time.time()
    for operation in operations:
        if isinstance(operation, DocumentGraph):
            store.write_document(operation, SCHEMA, "replace")
        else:
            store.remove_document(*operation)
    store.close()
    return counter.retries, started, time.time()
