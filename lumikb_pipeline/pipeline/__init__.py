"""Extraction of documents, in the two stages that Dagster runs as two ops (and the demo in-process):

1. `extract.extract_documents`: claim each document's ledger row, send its chunks to the LLM
   (rate-limited, checkpointed: every validated chunk result is stored as a chunk checkpoint as soon
   as it exists).
2. `write.write_documents`: read those checkpoints back, build each document's graph contribution,
   write it in one transaction, and close the ledger row.

The checkpoint table is the hand-over between the stages, so nothing large passes between steps and
a crash between them costs no LLM call. One document's failure never fails the others: each stage
returns one `DocumentOutcome` per document.

For documents of a job, both stages also obey the job's stop conditions (`lumikb cancel`, the
`--max-cost` budget: `tracking.control.JobControl`), report every final outcome to the job's progress in
Redis, and close the job once its last document is final.

After a schema change, `migration` plans each document from the version it was extracted at: its
previous extraction migrated with no LLM call (`graph-only`), the added types asked of the LLM
(`delta`), or a `full` extraction.

The package imports none of its modules: `extract` brings LiteLLM (seconds to import), which the
processes that only load the definitions (the code server, every run's process) never call. Import
`pipeline.extract`, `pipeline.write` and `pipeline.work` (`DocumentOutcome`) directly.
"""
