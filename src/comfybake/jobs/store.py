"""The job store: one SQLite file (WAL, mode 0600) in the state root, safe with several threads
and processes.

A job moves through explicit transitions, each one transaction that reads the job's state and
refuses a move the table below does not allow (`IllegalTransitionError`, naming both states):

    queued -> submitting -> running -> succeeded | failed | cancelled | timed_out
    (queued and submitting may also end in failed, cancelled or timed_out)

Each job gets its ComfyUI prompt_id (a canonical lowercase uuid4) when it is created, before
it is posted. A process that restarts calls `recover()` for the jobs it must resume (submitting,
running): each is looked up on its instance by that prompt_id and adopted if found, posted again
(`submit` once more) only if absent, so no job is lost or run twice.

Inputs' data are never stored: only each input's name and size, so no image and no token
reaches the file. A job that reaches a final state writes one log line (`log_finished`).
"""

from __future__ import annotations

import datetime
import json
import os
import sqlite3
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfybake import logs

FILE_NAME = "jobs.sqlite"
BUSY_TIMEOUT = 30.0  # seconds a writer waits for another's transaction
STATES = ("queued", "submitting", "running", "succeeded", "failed", "cancelled", "timed_out")
FINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
RESUMED = ("submitting", "running")  # what recover() lists
# target state -> the states a job may move to it from
TRANSITIONS: dict[str, frozenset[str]] = {
    # submitting again: a recovered job whose prompt its instance does not know is posted once more
    "submitting": frozenset({"queued", "submitting"}),
    "running": frozenset({"submitting"}),
    "succeeded": frozenset({"running"}),
    "failed": frozenset({"queued", "submitting", "running"}),
    "cancelled": frozenset({"queued", "submitting", "running"}),
    "timed_out": frozenset({"queued", "submitting", "running"}),
}
LOG_LEVELS = {"succeeded": "info", "cancelled": "warning", "failed": "error", "timed_out": "error"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('queued', 'submitting', 'running', 'succeeded', 'failed',
                                          'cancelled', 'timed_out')),
    workflow TEXT NOT NULL,
    environment TEXT NOT NULL DEFAULT '',
    instance TEXT NOT NULL DEFAULT '',
    prompt_id TEXT NOT NULL UNIQUE,
    inputs TEXT NOT NULL DEFAULT '{}',
    created TEXT NOT NULL,
    started TEXT,
    finished TEXT,
    result TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
"""


class StoreError(Exception):
    """The job store refuses an operation; the message names the job and the reason."""


class JobNotFoundError(StoreError):
    pass


class IllegalTransitionError(StoreError):
    def __init__(self, job_id: str, state: str, target: str) -> None:
        allowed = " or ".join(sorted(TRANSITIONS[target]))
        super().__init__(f"job {job_id} is {state}: it cannot become {target} (only a job {allowed} can)")
        self.job_id, self.state, self.target = job_id, state, target


@dataclass(frozen=True)
class Job:
    id: str
    state: str
    workflow: str
    environment: str
    instance: str
    prompt_id: str
    inputs: dict[str, int]  # input name to its size in bytes; never its data
    created: str
    started: str | None
    finished: str | None
    result: Any
    error: Any
    attempts: int

    def duration(self) -> float | None:
        """Seconds from start (or creation, for a job that never started) to its end."""
        if not self.finished:
            return None
        begin = datetime.datetime.fromisoformat(self.started or self.created)
        return round((datetime.datetime.fromisoformat(self.finished) - begin).total_seconds(), 3)


def now() -> str:
    """UTC, ISO 8601, to the microsecond."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")  # noqa: UP017 - Python 3.10 hosts


def _row(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        state=row["state"],
        workflow=row["workflow"],
        environment=row["environment"],
        instance=row["instance"],
        prompt_id=row["prompt_id"],
        inputs=json.loads(row["inputs"]),
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        result=None if row["result"] is None else json.loads(row["result"]),
        error=None if row["error"] is None else json.loads(row["error"]),
        attempts=row["attempts"],
    )


def input_sizes(inputs: Mapping[str, bytes | bytearray | int]) -> dict[str, int]:
    """Each input's name and size: data becomes its length, a size stays as it is."""
    return {str(name): value if isinstance(value, int) else len(value) for name, value in inputs.items()}


class JobStore:
    """Jobs in `<state root>/jobs.sqlite`. Every call opens its own connection, so one store may
    be shared by threads, and several processes may open the same file."""

    def __init__(self, state_root: str | Path) -> None:
        root = Path(state_root)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = root / FILE_NAME
        # Created 0600 before SQLite opens it (its -wal and -shm files take the same mode), and
        # put back to 0600 if someone widened it.
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(descriptor).st_mode & 0o077:
                os.fchmod(descriptor, 0o600)
        finally:
            os.close(descriptor)
        connection = self.connect()
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(SCHEMA)
        finally:
            connection.close()

    def connect(self) -> sqlite3.Connection:
        """A connection in autocommit mode (transactions are explicit), waiting on busy writers."""
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable at each checkpoint, never corrupt
        return connection

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: the write lock first, so reads see the latest)."""
        connection = self.connect()
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        finally:
            connection.close()

    # ----------------------------------------------------------------------- reading

    def get(self, job_id: str) -> Job:
        connection = self.connect()
        try:
            row = connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        finally:
            connection.close()
        if row is None:
            raise JobNotFoundError(f"no job {job_id} in {self.path}")
        return _row(row)

    def jobs(self, *states: str) -> list[Job]:
        """The jobs in `states` (all when none), oldest first."""
        unknown = set(states) - set(STATES)
        if unknown:
            raise StoreError(f"{', '.join(sorted(unknown))} is not a job state (states: {', '.join(STATES)})")
        query = "SELECT * FROM jobs"
        if states:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
        connection = self.connect()
        try:
            rows = connection.execute(query + " ORDER BY created, id", states).fetchall()
        finally:
            connection.close()
        return [_row(row) for row in rows]

    def recent(self, states: tuple[str, ...] = (), limit: int = 100) -> list[Job]:
        """The newest `limit` jobs in `states` (all when none), newest first, each without its
        result (None): a list of many jobs must not read every inline output's data."""
        unknown = set(states) - set(STATES)
        if unknown:
            raise StoreError(f"{', '.join(sorted(unknown))} is not a job state (states: {', '.join(STATES)})")
        columns = "id, state, workflow, environment, instance, prompt_id, inputs, created, started, finished"
        query = f"SELECT {columns}, NULL AS result, error, attempts FROM jobs"  # noqa: S608 - names from this module
        if states:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
        connection = self.connect()
        try:
            rows = connection.execute(query + " ORDER BY created DESC, id DESC LIMIT ?", (*states, limit)).fetchall()
        finally:
            connection.close()
        return [_row(row) for row in rows]

    def recover(self) -> list[Job]:
        """The jobs a restarted runner must resume (submitting, running), oldest first: look each
        up on its instance by prompt_id; adopt it if found, post it again only if absent."""
        return self.jobs(*RESUMED)

    # ----------------------------------------------------------------------- transitions

    def create(self, workflow: str, inputs: Mapping[str, bytes | bytearray | int] | None = None) -> Job:
        """A new queued job with its id and prompt_id (canonical lowercase uuid4s)."""
        job_id, prompt_id = str(uuid.uuid4()), str(uuid.uuid4())
        with self.transaction() as connection:
            connection.execute(
                "INSERT INTO jobs (id, state, workflow, prompt_id, inputs, created) VALUES (?, 'queued', ?, ?, ?, ?)",
                (job_id, workflow, prompt_id, json.dumps(input_sizes(inputs or {})), now()),
            )
        return self.get(job_id)

    def _move(self, job_id: str, target: str, **fields: Any) -> Job:
        with self.transaction() as connection:
            row = connection.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"no job {job_id} in {self.path}")
            if row["state"] not in TRANSITIONS[target]:
                raise IllegalTransitionError(job_id, row["state"], target)
            columns = {"state": target, **fields}
            if target in FINAL:
                columns["finished"] = now()
            assignments = ", ".join(f"{name} = ?" for name in columns)
            increment = ", attempts = attempts + 1" if target == "submitting" else ""
            connection.execute(
                f"UPDATE jobs SET {assignments}{increment} WHERE id = ?",  # noqa: S608 - names from this module
                (*columns.values(), job_id),
            )
        job = self.get(job_id)
        if target in FINAL:
            log_finished(job)
        return job

    def submit(self, job_id: str, environment: str, instance: str) -> Job:
        """queued (or submitting, when posted again after a restart) -> submitting on `instance`."""
        return self._move(job_id, "submitting", environment=environment, instance=instance)

    def start(self, job_id: str) -> Job:
        """submitting -> running: the instance accepted the prompt."""
        return self._move(job_id, "running", started=now())

    def succeed(self, job_id: str, result: Any) -> Job:
        return self._move(job_id, "succeeded", result=json.dumps(result))

    def fail(self, job_id: str, error: Any) -> Job:
        return self._move(job_id, "failed", error=json.dumps(error))

    def cancel(self, job_id: str) -> Job:
        return self._move(job_id, "cancelled")

    def time_out(self, job_id: str, error: Any = None) -> Job:
        return self._move(job_id, "timed_out", error=None if error is None else json.dumps(error))


def log_finished(job: Job) -> None:
    """One JSON line on stderr for a finished job: its id, workflow name, environment, instance,
    duration and state (never its inputs), through comfybake's log setup: an object of the
    command's JSON log stream in JSON mode, the same object on its own line otherwise."""
    fields: dict[str, Any] = {
        "job": job.id,
        "workflow": job.workflow,
        "environment": job.environment,
        "instance": job.instance,
        "duration": job.duration(),
        "state": job.state,
        "attempts": job.attempts,
    }
    message = f"job {job.id} {job.state}"
    level = LOG_LEVELS[job.state]
    if logs.json_mode():
        logs.emit(message, level, **fields)
    else:
        line = json.dumps(logs.record(message, "jobs", level, **fields), ensure_ascii=False)
        print(line, file=sys.stderr, flush=True)
