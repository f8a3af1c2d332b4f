"""Runs batch jobs: validate the input, run each request through the OpenAI service, record each result once.

One asyncio task per unfinished job. Requests start through the AdmissionGate (bounded concurrency, and
interactive traffic keeps priority), results are appended and fsynced as they finish (jsonl.py), and a job
found unfinished at start-up resumes from the lines its result files do not yet hold. Cancel and expiry stop
new requests, abort the ones in flight and give every unfinished line a `batch_cancelled` / `batch_expired`
error record, so every input line (every custom_id) ends up in exactly one record.

Every SQLite call runs in a worker thread (`asyncio.to_thread`): a commit waits for an fsync, and the event loop
that serves HTTP must never wait for one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Protocol

from cluster.batch.gate import AdmissionGate
from cluster.batch.jsonl import InputError, InputLine, ResultFiles, parse_input, record_id
from cluster.batch.store import Batch, BatchStore, FileRecord, InvalidTransition, StoreError, new_id

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
BATCH_PRIORITY = 1  # body["priority"] of batch requests: ranks admit > 0 only while their queue is short
RETRY_DELAYS_S = (0.5, 2.0)  # a 5xx or an exception from the service is retried after these pauses


class Service(Protocol):
    async def completions(self, body: dict) -> dict: ...

    async def chat_completions(self, body: dict) -> dict: ...


class BatchRunner:
    def __init__(self, store: BatchStore, service: Service, gate: AdmissionGate):
        self.store = store
        self.service = service
        self.gate = gate
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._cancel: dict[str, asyncio.Event] = {}
        self.retry_delays_s = RETRY_DELAYS_S
        self._write_lock = asyncio.Lock()
        self._writes: dict[str, set[asyncio.Task[None]]] = {}  # batch id -> record writes in flight

    # ---- public ----
    async def resume(self) -> list[str]:
        """Start a task for every job the store holds unfinished."""
        ids = [b.id for b in await asyncio.to_thread(self.store.unfinished)]
        if ids:
            log.info("resuming %d unfinished batch job(s): %s", len(ids), ", ".join(ids))
        for bid in ids:
            self.start(bid)
        return ids

    def start(self, batch_id: str) -> None:
        if batch_id in self._jobs:
            return
        self._cancel.setdefault(batch_id, asyncio.Event())
        task = asyncio.get_running_loop().create_task(self._job(batch_id), name=f"batch {batch_id}")
        self._jobs[batch_id] = task
        task.add_done_callback(lambda t, bid=batch_id: self._job_done(bid, t))

    async def cancel(self, batch_id: str) -> Batch:
        """Move the job to cancelling (raises InvalidTransition when finished) and stop it."""
        batch = await asyncio.to_thread(self.store.transition, batch_id, "cancelling")
        self._cancel.setdefault(batch_id, asyncio.Event()).set()
        self.start(batch_id)  # no-op when its task runs; otherwise a task finishes the cancellation
        return batch

    async def wait(self, batch_id: str) -> None:
        task = self._jobs.get(batch_id)
        if task is not None:
            await asyncio.shield(task)

    async def close(self) -> None:
        """Stop every job task without changing its status: the next start resumes them."""
        tasks = list(self._jobs.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._drain()

    # ---- one job ----
    def _job_done(self, batch_id: str, task: asyncio.Task[None]) -> None:
        self._jobs.pop(batch_id, None)
        if not self._writes.get(batch_id):
            self._writes.pop(batch_id, None)
        if not task.cancelled() and task.exception() is None:  # the job reached a terminal status
            self._cancel.pop(batch_id, None)

    async def _job(self, batch_id: str) -> None:
        try:
            await self._run_job(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.error("batch %s stopped with an error", batch_id, exc_info=err)
            await asyncio.to_thread(self._record_failure, batch_id, err)

    def _record_failure(self, batch_id: str, err: BaseException) -> None:  # in a worker thread
        try:
            batch = self.store.get_batch(batch_id)
            status = "cancelled" if batch.status == "cancelling" else "failed"
            self.store.transition(batch_id, status, errors=[{"code": "server_error", "message": f"{err!r}",
                                                             "param": None, "line": None}] if status == "failed"
                                  else None)
        except Exception:  # already terminal, or the store itself is broken: the log line above says why
            log.exception("batch %s: could not record the failure", batch_id)

    async def _run_job(self, batch_id: str) -> None:
        db = self.store
        batch = await asyncio.to_thread(db.get_batch, batch_id)
        if batch.terminal:
            return
        try:
            path = (await asyncio.to_thread(db.get_file, batch.input_file_id)).path
            lines = await asyncio.to_thread(parse_input, path, batch.endpoint)
        except StoreError:
            await self._fail_or_cancel(batch, f"input file {batch.input_file_id} no longer exists")
            return
        except InputError as e:
            await self._fail_or_cancel(batch, str(e))
            return
        if batch.status == "validating":
            try:
                batch = await asyncio.to_thread(db.transition, batch_id, "in_progress", total=len(lines))
            except InvalidTransition:  # cancelled while validating
                batch = await asyncio.to_thread(db.get_batch, batch_id)
        files = await asyncio.to_thread(ResultFiles, batch_id, db.batches_dir / batch_id, len(lines))
        await asyncio.to_thread(db.set_counts, batch_id, len(lines), files.completed, files.failed)

        outcome = None
        if batch.status == "in_progress":
            outcome = await self._execute(batch, lines, files)
            try:
                if outcome == "done":
                    batch = await asyncio.to_thread(db.transition, batch_id, "finalizing")
            except InvalidTransition:  # a cancel landed after the last request finished
                pass
            batch = await asyncio.to_thread(db.get_batch, batch_id)
        if batch.status == "finalizing":
            await self._finish(batch, files, "completed")
        elif batch.status == "cancelling" or outcome == "expired":
            code, status = ("batch_cancelled", "cancelled") if batch.status == "cancelling" else \
                ("batch_expired", "expired")
            msg = ("The batch was cancelled before this request ran." if code == "batch_cancelled" else
                   "This request could not be executed before the completion window expired.")
            await self._drain(batch_id)  # records of requests that finished while being cancelled are written first
            left = [ln for ln in lines if ln.lineno not in files.done]
            await self._submit([(ln.lineno, _error_record(batch_id, ln, code, msg), False) for ln in left], files)
            await self._finish(batch, files, status)

    async def _fail_or_cancel(self, batch: Batch, msg: str) -> None:
        if batch.status == "cancelling":
            await asyncio.to_thread(self.store.transition, batch.id, "cancelled")
        else:
            await asyncio.to_thread(self.store.transition, batch.id, "failed",
                                    errors=[{"code": "invalid_input_file", "message": msg,
                                             "param": "input_file_id", "line": None}])

    async def _execute(self, batch: Batch, lines: list[InputLine], files: ResultFiles) -> str:
        """Run every line without a record; returns 'done', 'cancelled' or 'expired'."""
        todo = [ln for ln in lines if ln.lineno not in files.done]
        broken = [(ln.lineno, _error_record(batch.id, ln, "invalid_request", ln.error), False)
                  for ln in todo if ln.error is not None]
        await self._submit(broken, files)
        run = asyncio.create_task(self._run_lines(batch, [ln for ln in todo if ln.error is None], files))
        stop = asyncio.create_task(self._cancel[batch.id].wait())
        try:
            timeout = max(0.0, batch.expires_at - time.time())
            done, _ = await asyncio.wait({run, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if run in done:
                run.result()
                return "done"
            return "cancelled" if stop in done else "expired"
        finally:
            for t in (run, stop):
                t.cancel()
            await asyncio.gather(run, stop, return_exceptions=True)

    async def _run_lines(self, batch: Batch, todo: list[InputLine], files: ResultFiles) -> None:
        inflight: set[asyncio.Task[None]] = set()
        try:
            for ln in todo:
                await self.gate.acquire_batch()
                t = asyncio.create_task(self._one(batch, ln, files))
                inflight.add(t)
                t.add_done_callback(inflight.discard)
                t.add_done_callback(lambda _: self.gate.release_batch())
            while inflight:
                await asyncio.gather(*list(inflight))
        finally:
            pending = list(inflight)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, batch: Batch, ln: InputLine, files: ResultFiles) -> None:
        rid = record_id(batch.id, ln.lineno)
        for attempt in range(len(self.retry_delays_s) + 1):
            try:
                body = await self._call(batch.endpoint, dict(ln.body))
                rec = {"id": rid, "custom_id": ln.custom_id, "error": None,
                       "response": {"status_code": 200, "request_id": body.get("id", rid), "body": body}}
                ok = True
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:  # an APIError (OpenAI's error body) or a failure below the service
                status, err = _api_error(e)
                if status >= 500 and attempt < len(self.retry_delays_s):  # transient until proven otherwise
                    log.warning("batch %s line %d: %s; retrying", batch.id, ln.lineno, err["message"])
                    await asyncio.sleep(self.retry_delays_s[attempt])
                    continue
                rec = {"id": rid, "custom_id": ln.custom_id, "error": None,
                       "response": {"status_code": status, "request_id": rid, "body": {"error": err}}}
                ok = False
                break
        # NOTE: shielded, so a cancel that lands while the record is being written cannot make the line look
        # unfinished (and get a second record) after the write went through.
        await asyncio.shield(self._submit([(ln.lineno, rec, ok)], files))

    def _submit(self, records: list[tuple[int, dict[str, Any], bool]], files: ResultFiles) -> asyncio.Task[None]:
        """Write records in a task of its own (cancelling the caller does not stop it); `_drain` awaits them."""
        task = asyncio.get_running_loop().create_task(self._write(records, files))
        pending = self._writes.setdefault(files.batch_id, set())
        pending.add(task)
        task.add_done_callback(pending.discard)
        return task

    async def _drain(self, batch_id: str | None = None) -> None:
        """Wait for the writes of one job (or of all jobs)."""
        while True:
            tasks = [t for bid, ts in self._writes.items() if batch_id in (None, bid) for t in ts]
            if not tasks:
                return
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _call(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        fn = self.service.chat_completions if endpoint == "/v1/chat/completions" else self.service.completions
        prio = body.get("priority")
        if not (isinstance(prio, int) and prio > BATCH_PRIORITY):  # a batch request never jumps to interactive
            body["priority"] = BATCH_PRIORITY
        return await fn(body)

    async def _write(self, records: list[tuple[int, dict[str, Any], bool]], files: ResultFiles) -> None:
        if not records:
            return
        def append() -> None:  # in a worker thread: two fsyncs (file, then SQLite's WAL) stay off the event loop
            files.append(records)
            self.store.set_counts(files.batch_id, files.total, files.completed, files.failed)

        async with self._write_lock:
            await asyncio.to_thread(append)

    async def _finish(self, batch: Batch, files: ResultFiles, status: str) -> None:
        now = int(time.time())
        recs, fields = [], {}
        for path, n, key in ((files.output_path, files.completed, "output_file_id"),
                             (files.error_path, files.failed, "error_file_id")):
            if n:
                rec = FileRecord(new_id("file-"), "batch_output", f"{batch.id}_{Path(path).stem}.jsonl",
                                 Path(path).stat().st_size, now, str(path))
                recs.append(rec)
                fields[key] = rec.id
        await asyncio.to_thread(self.store.transition, batch.id, status, now=now, new_files=tuple(recs),
                                completed=files.completed, failed=files.failed, **fields)
        log.info("batch %s %s: %d of %d requests ok, %d failed", batch.id, status, files.completed, files.total,
                 files.failed)


def _api_error(e: Exception) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error object) for an exception from the service."""
    status = getattr(e, "status", None)
    if isinstance(status, int) and 400 <= status <= 599 and hasattr(e, "message"):
        return status, {"message": e.message, "type": getattr(e, "type", "invalid_request_error"),
                        "param": getattr(e, "param", None), "code": getattr(e, "code", None)}
    return 500, {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error", "param": None,
                 "code": None}


def _error_record(batch_id: str, ln: InputLine, code: str, message: str | None) -> dict[str, Any]:
    return {"id": record_id(batch_id, ln.lineno), "custom_id": ln.custom_id, "response": None,
            "error": {"code": code, "message": message, "line": ln.lineno}}
