"""The scheduler's embedded store: what a restarted scheduler reads back."""

from __future__ import annotations

import time
from pathlib import Path

from cicada_scheduler.state import JobRecord
from cicada_scheduler.store import Store
from cicada_shared.contracts import InferJob, JobResult, Tensor


def test_a_job_is_written_once_then_only_its_fate(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    ids = Tensor(name="input_ids", datatype="INT64", shape=[1, 2], data=bytes(16))
    job = InferJob(job_id="j", model="m", inputs=[ids], submitted_at=time.time())
    record = JobRecord(job, "reply-queue", state="running", loader_id="L")
    store.save_job(record)
    record.state, record.finished_at = "succeeded", time.time()
    record.result = JobResult(job_id="j", model="m", state="succeeded", outputs=[ids])
    store.save_job(record)
    store.close()

    (back,) = Store(tmp_path / "db.sqlite").load_jobs()
    assert back.job == job and back.reply_to == "reply-queue" and back.loader_id == "L"
    assert back.state == "succeeded" and back.finished_at == record.finished_at
    assert back.result == record.result
