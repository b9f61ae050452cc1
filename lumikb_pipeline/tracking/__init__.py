"""Per-job state shared by every worker: stop conditions (cancel, budget), progress in Redis, and how
progress looks in a terminal."""
