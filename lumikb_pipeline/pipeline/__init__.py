"""The pipeline stages between the database and the graph (extract, write) and the migration plan
that decides, per document, how much of a schema change needs the LLM."""
