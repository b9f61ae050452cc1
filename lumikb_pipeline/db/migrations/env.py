"""Alembic environment: the URL comes from `lumikb_pipeline.db.migrate`, never from a file."""

from __future__ import annotations

from alembic import context

from lumikb_pipeline.db.models import Base
from lumikb_pipeline.db.session import get_engine

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "lumikb_pipeline.db.migrate sets sqlalchemy.url"

with get_engine(url).connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
