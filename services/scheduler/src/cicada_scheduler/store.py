"""The scheduler's registry and jobs in SQLite, so that a restart loses no accepted job.

Jobs still waiting are safe in RabbitMQ anyway (their messages stay unacked until dispatch);
the store adds what the broker cannot know: registered models, which loader runs which
job, and finished jobs with their results for ``GET /v2/jobs/{id}``. Write-through, WAL.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from cicada_scheduler.state import JobRecord, ModelRecord
from cicada_shared.contracts import ErrorInfo, InferJob, JobResult, TensorSpec, decode, encode

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, job BLOB NOT NULL, doc TEXT NOT NULL, result BLOB,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at);
"""


class Store:
    def __init__(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path) if path else ":memory:", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- models ----------------------------------------------------------------------------

    def save_model(self, record: ModelRecord) -> None:
        doc = {
            "name": record.name,
            "uri": record.uri,
            "state": record.state,
            "nbytes": record.nbytes,
            "model_type": record.model_type,
            "order": record.order,
            "inputs": [s.model_dump() for s in record.inputs],
            "outputs": [s.model_dump() for s in record.outputs],
            "error": record.error.model_dump() if record.error else None,
            "registered_at": record.registered_at,
        }
        self.db.execute(
            "INSERT OR REPLACE INTO models VALUES (?, ?)", (record.name, json.dumps(doc))
        )

    def delete_model(self, name: str) -> None:
        self.db.execute("DELETE FROM models WHERE name = ?", (name,))

    def load_models(self) -> list[ModelRecord]:
        out = []
        for (doc,) in self.db.execute("SELECT doc FROM models"):
            d: dict[str, Any] = json.loads(doc)
            out.append(
                ModelRecord(
                    d["name"],
                    d["uri"],
                    d["state"],
                    d["nbytes"],
                    d["model_type"],
                    d["order"],
                    [TensorSpec(**s) for s in d["inputs"]],
                    [TensorSpec(**s) for s in d["outputs"]],
                    ErrorInfo(**d["error"]) if d["error"] else None,
                    d["registered_at"],
                )
            )
        return out

    # -- jobs ------------------------------------------------------------------------------

    def save_job(self, record: JobRecord) -> None:
        doc = {
            "state": record.state,
            "reply_to": record.reply_to,
            "accepted_at": record.accepted_at,
            "dispatched_at": record.dispatched_at,
            "loader_id": record.loader_id,
        }
        result = encode(record.result) if record.result is not None else None
        job_id, state = record.job.job_id, json.dumps(doc)
        # the job (its inputs) never changes: written once, then only what happened to it
        changed = self.db.execute(
            "UPDATE jobs SET doc = ?, result = ?, finished_at = ? WHERE job_id = ?",
            (state, result, record.finished_at, job_id),
        )
        if changed.rowcount == 0:
            self.db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?)",
                (job_id, encode(record.job), state, result, record.finished_at),
            )

    def load_jobs(self) -> list[JobRecord]:
        out = []
        for job, doc, result, finished in self.db.execute(
            "SELECT job, doc, result, finished_at FROM jobs ORDER BY rowid"
        ):
            d = json.loads(doc)
            infer = decode(job)
            assert isinstance(infer, InferJob)
            record = JobRecord(
                infer,
                d["reply_to"],
                d["state"],
                d["accepted_at"],
                d["dispatched_at"],
                finished,
                d["loader_id"],
            )
            if result is not None:
                decoded = decode(result)
                assert isinstance(decoded, JobResult)
                record.result = decoded
            out.append(record)
        return out

    def delete_jobs(self, job_ids: list[str]) -> None:
        self.db.executemany("DELETE FROM jobs WHERE job_id = ?", [(j,) for j in job_ids])
