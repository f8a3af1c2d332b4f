"""Durable state of batch jobs: file and batch rows in SQLite (WAL) under the server's state directory.

Status machine (enforced by `BatchStore.transition`, a compare-and-set on the current status):

    validating ──> in_progress ──> finalizing ──> completed
        │              │               └────────> failed
        │              ├──> expired
        ├──> failed    ├──> failed
        └──> cancelling <┘ ──> cancelled

Result lines themselves live in JSONL files on disk (see runner.py); the rows here say where they are.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled", "expired")
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})
TRANSITIONS: dict[str, frozenset[str]] = {
    "validating": frozenset({"in_progress", "failed", "cancelling"}),
    "in_progress": frozenset({"finalizing", "cancelling", "expired", "failed"}),
    "finalizing": frozenset({"completed", "failed"}),
    "cancelling": frozenset({"cancelled"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
    "expired": frozenset(),
}
# The timestamp column each status sets when entered (validating is the creation time).
STATUS_TIME = {s: f"{s}_at" for s in STATUSES if s != "validating"}
STATUS_TIME["validating"] = "created_at"
# The per-status timestamp columns, in the order OpenAI's batch object lists them.
TIME_COLUMNS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
                "cancelled_at")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    output_file_id TEXT,
    error_file_id TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
    expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    metadata TEXT,
    errors TEXT
);
"""


class StoreError(Exception):
    """A lookup or state change the store refuses; `kind` is 'not_found' or 'conflict'."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class InvalidTransition(StoreError):
    def __init__(self, batch_id: str, current: str, new: str):
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none (terminal)"
        super().__init__("conflict", f"batch {batch_id} is {current}; cannot move to {new} (allowed: {allowed})")
        self.current = current
        self.new = new


@dataclass(frozen=True)
class FileRecord:
    id: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
    path: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed"}


@dataclass(frozen=True)
class Batch:
    id: str
    status: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    output_file_id: str | None = None
    error_file_id: str | None = None
    times: dict[str, int | None] = field(default_factory=dict)  # in_progress_at ... cancelled_at
    total: int = 0
    completed: int = 0
    failed: int = 0
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": None if not self.errors else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "expires_at": self.expires_at,
        }
        for col in TIME_COLUMNS:
            out[col] = self.times.get(col)
        out["request_counts"] = {"total": self.total, "completed": self.completed, "failed": self.failed}
        out["metadata"] = self.metadata
        return out


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


class BatchStore:
    """SQLite rows for files and batches. Thread-safe (one connection behind a lock); every write commits."""

    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir).absolute()
        self.files_dir = self.root / "files"
        self.batches_dir = self.root / "batches"
        self.files_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # uploads are the clients' data
        self.batches_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        db_path = self.root / "batch.sqlite3"
        os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT, 0o600))  # SQLite's -wal/-shm files copy its mode
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- files ----
    def add_file(self, rec: FileRecord) -> FileRecord:
        with self._lock:
            self._insert_file(rec)
        return rec

    def get_file(self, file_id: str) -> FileRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM files WHERE id=?", (file_id,)).fetchone()
        if row is None:
            raise StoreError("not_found", f"No such file: {file_id!r}")
        return self._file(row)

    def list_files(self, purpose: str | None = None, after: str | None = None, limit: int = 10000,
                   order: str = "desc") -> tuple[list[FileRecord], bool]:
        """Files in creation order (`order` asc|desc), starting after the file `after`; returns (page, has_more)."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
        rows = self._page("files", after, limit, order, ("purpose", purpose) if purpose else None)
        return [self._file(r) for r in rows[:limit]], len(rows) > limit

    def file_bytes(self) -> int:
        """Bytes of every stored file (uploads and batch results)."""
        with self._lock:
            row = self._db.execute("SELECT COALESCE(SUM(bytes), 0) AS n FROM files").fetchone()
        return int(row["n"])

    def delete_file(self, file_id: str) -> FileRecord:
        rec = self.get_file(file_id)
        with self._lock:
            busy = self._db.execute(
                "SELECT id, status FROM batches WHERE input_file_id=? AND status NOT IN (?,?,?,?)",
                (file_id, *sorted(TERMINAL))).fetchone()
            if busy is not None:
                raise StoreError("conflict", f"file {file_id} is the input of batch {busy['id']}, which is "
                                             f"{busy['status']}; cancel the batch or wait for it to finish first")
            self._db.execute("DELETE FROM files WHERE id=?", (file_id,))
        Path(rec.path).unlink(missing_ok=True)
        return rec

    # ---- batches ----
    def create_batch(self, endpoint: str, input_file_id: str, completion_window: str, window_s: int,
                     metadata: dict[str, str] | None, now: int | None = None) -> Batch:
        now = int(time.time()) if now is None else now
        bid = new_id("batch_")
        with self._lock:
            self._db.execute(
                "INSERT INTO batches (id, status, endpoint, input_file_id, completion_window, created_at, expires_at,"
                " metadata) VALUES (?,?,?,?,?,?,?,?)",
                (bid, "validating", endpoint, input_file_id, completion_window, now, now + window_s,
                 json.dumps(metadata) if metadata is not None else None))
        return self.get_batch(bid)

    def get_batch(self, batch_id: str) -> Batch:
        with self._lock:
            row = self._db.execute("SELECT * FROM batches WHERE id=?", (batch_id,)).fetchone()
        if row is None:
            raise StoreError("not_found", f"No such batch: {batch_id!r}")
        return _batch(row)

    def list_batches(self, after: str | None = None, limit: int = 20) -> tuple[list[Batch], bool]:
        """Newest first, starting after the batch `after`; returns (page, has_more)."""
        rows = self._page("batches", after, limit, "desc", None)
        return [_batch(r) for r in rows[:limit]], len(rows) > limit

    def unfinished(self) -> list[Batch]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM batches WHERE status NOT IN (?,?,?,?) ORDER BY seq",
                                    tuple(sorted(TERMINAL))).fetchall()
        return [_batch(r) for r in rows]

    def transition(self, batch_id: str, new: str, *, now: int | None = None, new_files: tuple[FileRecord, ...] = (),
                   **fields: Any) -> Batch:
        """Move a batch to `new` if the current status allows it, stamping `<new>_at`; in the same transaction
        insert `new_files` and set `fields` (output_file_id, error_file_id, total, completed, failed, errors)."""
        if new not in TRANSITIONS:
            raise ValueError(f"unknown batch status {new!r}; known: {', '.join(STATUSES)}")
        allowed_fields = {"output_file_id", "error_file_id", "total", "completed", "failed", "errors"}
        unknown = set(fields) - allowed_fields
        if unknown:
            raise ValueError(f"transition cannot set {sorted(unknown)}; allowed: {sorted(allowed_fields)}")
        now = int(time.time()) if now is None else now
        values = dict(fields)
        if "errors" in values:
            values["errors"] = json.dumps(values["errors"]) if values["errors"] else None
        values[STATUS_TIME[new]] = now
        sets = ", ".join(f"{k}=?" for k in values)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # status check and update in one write transaction
            try:
                row = self._db.execute("SELECT status FROM batches WHERE id=?", (batch_id,)).fetchone()
                if row is None:
                    raise StoreError("not_found", f"No such batch: {batch_id!r}")
                cur = row["status"]
                if new not in TRANSITIONS[cur]:
                    raise InvalidTransition(batch_id, cur, new)
                self._db.execute(f"UPDATE batches SET status=?, {sets} WHERE id=?", (new, *values.values(), batch_id))
                for rec in new_files:
                    self._insert_file(rec)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get_batch(batch_id)

    def set_counts(self, batch_id: str, total: int, completed: int, failed: int) -> None:
        with self._lock:
            self._db.execute("UPDATE batches SET total=?, completed=?, failed=? WHERE id=?",
                             (total, completed, failed, batch_id))

    # ---- helpers ----
    def _insert_file(self, rec: FileRecord) -> None:  # the caller holds the lock
        self._db.execute("INSERT INTO files (id, purpose, filename, bytes, created_at, path) VALUES (?,?,?,?,?,?)",
                         (rec.id, rec.purpose, rec.filename, rec.bytes, rec.created_at, self._rel(rec.path)))

    def _rel(self, path: str) -> str:
        """Paths inside the state directory are stored relative to it, so the directory can move."""
        p = Path(path)
        return str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p)

    def _file(self, row: sqlite3.Row) -> FileRecord:
        return FileRecord(row["id"], row["purpose"], row["filename"], row["bytes"], row["created_at"],
                          str(self.root / row["path"]))

    def _page(self, table: str, after: str | None, limit: int, order: str,
              where: tuple[str, str] | None) -> list[sqlite3.Row]:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        conds, args = [], []
        if where is not None:
            conds.append(f"{where[0]}=?")
            args.append(where[1])
        with self._lock:
            if after is not None:
                row = self._db.execute(f"SELECT seq FROM {table} WHERE id=?", (after,)).fetchone()
                if row is None:
                    raise StoreError("not_found", f"after={after!r} names no {table[:-1]}")
                conds.append("seq < ?" if order == "desc" else "seq > ?")
                args.append(row["seq"])
            cond = f"WHERE {' AND '.join(conds)}" if conds else ""
            return self._db.execute(f"SELECT * FROM {table} {cond} ORDER BY seq {order.upper()} LIMIT ?",
                                    (*args, limit + 1)).fetchall()




def _batch(row: sqlite3.Row) -> Batch:
    times = {col: row[col] for col in TIME_COLUMNS}
    return Batch(id=row["id"], status=row["status"], endpoint=row["endpoint"], input_file_id=row["input_file_id"],
                 completion_window=row["completion_window"], created_at=row["created_at"],
                 expires_at=row["expires_at"], output_file_id=row["output_file_id"],
                 error_file_id=row["error_file_id"], times=times, total=row["total"], completed=row["completed"],
                 failed=row["failed"], metadata=json.loads(row["metadata"]) if row["metadata"] else None,
                 errors=json.loads(row["errors"]) if row["errors"] else None)
