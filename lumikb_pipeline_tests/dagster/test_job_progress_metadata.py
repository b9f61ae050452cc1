"""The job progress a write step puts in its materializations is read at most once a second per job
(`assets.document_entities.JobProgressMetadata`): a read costs as much as a document's write once a
job has thousands of finishes."""

from __future__ import annotations

import time
from typing import cast

from lumikb_pipeline.assets.document_entities import JobProgressMetadata
from lumikb_pipeline.resources import ReextractionResource


class _Progress:
    """Stands in for the resource's `job_metadata`: counts the reads, one ETA per job."""

    def __init__(self) -> None:
        self.reads: list[str] = []

    def job_metadata(self, job_id: str) -> dict[str, object]:
        self.reads.append(job_id)
        return {"job_documents_done": f"{len(self.reads)} of 10", "job_rate_per_s": 2.0, "job_eta_seconds": 60.0}


def test_progress_is_read_once_per_interval_per_job_and_the_eta_counts_down_between_reads() -> None:
    source = _Progress()
    progress = JobProgressMetadata(cast(ReextractionResource, source), max_age_s=0.3)
    first = progress("job-a")
    time.sleep(0.1)
    again = progress("job-a")
    assert source.reads == ["job-a"]
    assert again["job_documents_done"] == first["job_documents_done"] == "1 of 10"
    assert 59.5 <= float(again["job_eta_seconds"]) < 60.0 == first["job_eta_seconds"]  # type: ignore[arg-type]
    progress("job-b")  # another job of the same run: read on its own
    assert source.reads == ["job-a", "job-b"]
    time.sleep(0.3)
    assert progress("job-a")["job_documents_done"] == "3 of 10" and source.reads[-1] == "job-a"


def test_a_job_without_a_pace_yet_keeps_its_metadata_as_read() -> None:
    class _NoPace(_Progress):
        def job_metadata(self, job_id: str) -> dict[str, object]:
            super().job_metadata(job_id)
            return {"job_documents_done": "0 of 10", "job_rate_per_s": None, "job_eta_seconds": None}

    progress = JobProgressMetadata(cast(ReextractionResource, _NoPace()))
    assert progress("job-a") == {"job_documents_done": "0 of 10", "job_rate_per_s": None, "job_eta_seconds": None}
