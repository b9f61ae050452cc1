"""Pure types and rules, no I/O: schemas and their diff, entity keys, chunking, extraction results,
write modes, budgets, partition batching, ETA and cron."""
