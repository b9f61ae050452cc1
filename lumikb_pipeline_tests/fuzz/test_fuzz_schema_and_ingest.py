"""Fuzz: any schema file is a valid schema or a SchemaFileError that names the file; any file name
and content is ingested or reported per file, and the other files are still ingested."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from lumikb_pipeline.core.errors import SchemaFileError
from lumikb_pipeline.db import catalog
from lumikb_pipeline.db.models import Base, Document
from lumikb_pipeline.db.session import get_engine, session_scope
from lumikb_pipeline.domain.partition_keys import is_valid_partition_key
from lumikb_pipeline.domain.schema import (
    ENTITY_TYPE_PATTERN,
    RELATIONSHIP_TYPE_PATTERN,
    RESERVED_RELATIONSHIP_TYPES,
    parse_schema_file,
    parse_schema_text,
)
from lumikb_pipeline_tests.fuzz.strategies import hostile_text, json_values

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]  # the slow step: the fast one stays under 5 minutes

names = st.one_of(st.sampled_from(["Person", "Org", "KNOWS", "MENTIONS", "HAS_CHUNK", "person", "A" * 70]),
                  hostile_text, json_values)
type_lists = st.one_of(st.lists(names, max_size=3), names)
schema_like = st.fixed_dictionaries({}, optional={
    "entity_types": st.one_of(st.lists(st.fixed_dictionaries({}, optional={"name": names, "description": names}),
                                       max_size=4), json_values),
    "relationship_types": st.one_of(st.lists(st.fixed_dictionaries({}, optional={
        "name": names, "source": type_lists, "target": type_lists, "description": names}), max_size=3),
        json_values),
    "prompt_version": json_values,
})


def _as_yaml(data: Any) -> str:
    try:
        return yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return str(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=st.one_of(schema_like.map(_as_yaml), json_values.map(_as_yaml), hostile_text,
                          st.text(st.sampled_from("{}[]:,-\n #&*!|>'\"%@`ab1"), max_size=60)))
def test_any_schema_text_is_a_valid_schema_or_an_error_naming_the_file(document: str) -> None:
    try:
        schema = parse_schema_text(document, "fuzz.yaml")
    except SchemaFileError as exc:
        assert str(exc).startswith("fuzz.yaml")
        return
    assert schema.entity_types
    for entity in schema.entity_types:
        assert ENTITY_TYPE_PATTERN.match(entity.name)
    for rel in schema.relationship_types:
        assert RELATIONSHIP_TYPE_PATTERN.match(rel.name) and rel.name not in RESERVED_RELATIONSHIP_TYPES
        assert set(rel.source) | set(rel.target) <= schema.entity_type_names


@settings(max_examples=60, deadline=None)
@given(content=st.binary(max_size=300))
def test_any_bytes_as_a_schema_file_are_a_schema_or_an_error(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "schema.yaml"
        path.write_bytes(content)
        try:
            parse_schema_file(path)
        except SchemaFileError as exc:
            assert str(path) in str(exc)


_workdir = tempfile.TemporaryDirectory(prefix="lumikb-fuzz-ingest-")
_url = f"sqlite:///{Path(_workdir.name) / 'app.sqlite3'}"
# File names as the file system has them: bytes, not always UTF-8 (any byte but '/' and NUL).
file_names = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=60).map(os.fsencode),
    st.binary(min_size=1, max_size=60).map(lambda b: b.replace(b"/", b"_").replace(b"\x00", b"_")),
    st.sampled_from([b"[/]x.md", b"report [draft].md", b"-rf", b".hidden", b"a\nb.md", b"caf\xe9.md"]),
).map(lambda name: name.replace(b"/", b"_")).filter(lambda name: name not in (b".", b"..") and len(name) <= 255)
contents = st.one_of(st.binary(max_size=400), st.text(max_size=400).map(lambda t: t.encode("utf-8", "surrogatepass")),
                     st.sampled_from([b"", b"   \n", b"\xef\xbb\xbf# Title\nJane Doe works at Acme.", b"a\x00b",
                                      b"\xff\xfeh\x00i\x00", "caf\u00e9".encode("latin-1")]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.tuples(file_names, contents), min_size=1, max_size=4, unique_by=lambda f: f[0]))
def test_any_file_names_and_contents_are_ingested_or_reported_per_file(files: list[tuple[bytes, bytes]]) -> None:
    if not Path(_workdir.name, "app.sqlite3").exists():
        Base.metadata.create_all(get_engine(_url))
        with session_scope(_url) as session:
            catalog.create_kb(session, "fuzz", parse_schema_text("entity_types: [{name: Person}]"))
    with tempfile.TemporaryDirectory(dir=_workdir.name) as folder:
        for name, data in files:
            with open(os.fsencode(folder) + b"/" + name, "wb") as handle:  # noqa: PTH123
                handle.write(data)
        (Path(folder) / "zz-control.md").write_text("John Roe works at Initech.")
        report = catalog.ingest(_url, "fuzz", [Path(folder)])
        visible = [name for name, _ in files if not name.startswith(b".")]
        handled = len(report.added) + len(report.changed) + len(report.unchanged) + len(report.errors)
        assert handled == len(visible) + 1
        assert any(path.endswith("zz-control.md") for path in report.added + report.unchanged + report.changed)
        for _, message in report.errors:
            assert message and "Traceback" not in message
        # Whatever the file's name and title, its document has a valid partition key of its own.
        assert len(report.partition_keys) == len(report.document_ids)
        with session_scope(_url) as session:
            keys = list(session.scalars(select(Document.partition_key)))
        assert len(set(keys)) == len(keys) and all(is_valid_partition_key(key) for key in keys)
        assert all(key.startswith("fuzz/") for key in keys)
