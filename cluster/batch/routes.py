"""HTTP routes of the OpenAI Files and Batch APIs: /v1/files and /v1/batches, in OpenAI's JSON shapes.

`add_batch_routes(app, service, settings)` mounts them on the frontend's aiohttp app, opens the store under
`settings.state_dir`, resumes unfinished jobs when the app starts, and counts interactive requests
(/v1/completions, /v1/chat/completions) for the admission gate so they keep priority over batch requests.
Every store call runs in a worker thread (SQLite commits wait for fsync; the event loop must not). Uploads count
against the server's file storage quota (cluster/server/limits.py: 413 `storage_quota_exceeded` beyond it).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from cluster.batch.gate import AdmissionGate
from cluster.batch.runner import ENDPOINTS, BatchRunner, Service
from cluster.batch.store import BatchStore, FileRecord, InvalidTransition, StoreError, new_id
from cluster.server.errors import APIError
from cluster.server.limits import StorageQuota, Upload
from cluster.server.settings import DEFAULT_MAX_FILE_STORAGE_BYTES

RUNNER_KEY = web.AppKey("batch_runner", BatchRunner)
INTERACTIVE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_WINDOW = re.compile(r"^([1-9][0-9]{0,5})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_CHUNK = 1 << 16


def _error(e: APIError) -> web.Response:
    return web.json_response(e.body(), status=e.status, headers=e.headers)


def _store_error(e: StoreError) -> APIError:
    if e.kind == "not_found":
        return APIError(404, str(e), param=None, code="not_found")
    return APIError(409, str(e), code="conflict")


def parse_window(window: Any) -> int:
    """Seconds in a completion window such as '24h' (OpenAI's only value); '<n>[smhd]' is accepted."""
    m = _WINDOW.match(window) if isinstance(window, str) else None
    if m is None:
        raise APIError(400, f"completion_window must look like '24h' (a number and s/m/h/d), got {window!r}",
                   param="completion_window")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def add_batch_routes(app: web.Application, service: Service, settings: Any) -> None:
    state_dir = Path(settings.state_dir)
    max_file = int(settings.max_batch_file_bytes)
    store = BatchStore(state_dir)
    gate = AdmissionGate(int(settings.batch_concurrency))
    quota = StorageQuota(int(getattr(settings, "max_file_storage_bytes", DEFAULT_MAX_FILE_STORAGE_BYTES)))

    async def db(fn, *args: Any, **kwargs: Any) -> Any:
        """A store call, in a worker thread."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    @web.middleware
    async def interactive_first(request: web.Request, handler):
        if request.path in INTERACTIVE_PATHS:
            async with gate.interactive():
                return await handler(request)
        return await handler(request)

    app.middlewares.append(interactive_first)

    async def start(app: web.Application) -> None:
        runner = BatchRunner(store, service, gate)
        app[RUNNER_KEY] = runner
        await runner.resume()

    async def stop_jobs(app: web.Application) -> None:
        # NOTE: on_shutdown runs before every on_cleanup, so jobs stop while the service still answers: a request
        # cut off here is simply run again after the restart instead of being recorded as failed.
        await app[RUNNER_KEY].close()

    async def close_store(app: web.Application) -> None:
        await db(store.close)

    app.on_startup.append(start)
    app.on_shutdown.append(stop_jobs)
    app.on_cleanup.append(close_store)

    def route(fn):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                return await fn(request)
            except APIError as e:
                return _error(e)
            except StoreError as e:
                return _error(_store_error(e))
        return wrapped

    # ---- files ----
    @route
    async def upload(request: web.Request) -> web.Response:
        length = request.content_length
        if length is not None and length > max_file + _CHUNK:
            raise APIError(413, f"the upload is {length} bytes; batch files are limited to {max_file} bytes",
                       code="file_too_large")
        if not request.content_type.startswith("multipart/"):
            raise APIError(400, f"upload a file as multipart/form-data with fields 'purpose' and 'file', "
                            f"got Content-Type {request.content_type!r}")
        reader = await request.multipart()
        purpose, saved = None, None
        upload = quota.upload(await db(store.file_bytes))
        try:
            while (part := await reader.next()) is not None:
                if part.name == "purpose":
                    purpose = (await part.text()).strip()
                elif part.name == "file" and saved is None:
                    saved = await _save_part(part, store.files_dir, max_file, upload)
                else:
                    await part.release()
            if purpose is None:
                raise APIError(400, "missing form field 'purpose'", param="purpose")
            if purpose != "batch":
                raise APIError(400, f"purpose must be 'batch' (the only purpose this server stores), got {purpose!r}",
                           param="purpose")
            if saved is None:
                raise APIError(400, "missing form field 'file'", param="file")
            fid, path, size, filename = saved
            rec = await db(store.add_file, FileRecord(fid, purpose, filename, size, int(time.time()), str(path)))
            upload.commit()
        except BaseException:
            upload.release()
            if saved is not None:
                saved[1].unlink(missing_ok=True)
            raise
        return web.json_response(rec.to_openai())

    @route
    async def list_files(request: web.Request) -> web.Response:
        q = request.query
        limit = _int_param(q, "limit", 10000, 1, 10000)
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
        files, more = await db(store.list_files, q.get("purpose"), q.get("after"), limit, order)
        return web.json_response(_page([f.to_openai() for f in files], more))

    @route
    async def get_file(request: web.Request) -> web.Response:
        return web.json_response((await db(store.get_file, request.match_info["file_id"])).to_openai())

    @route
    async def file_content(request: web.Request) -> web.StreamResponse:
        rec = await db(store.get_file, request.match_info["file_id"])
        if not Path(rec.path).exists():
            raise APIError(404, f"the content of file {rec.id} is gone from disk", code="not_found")
        return web.FileResponse(rec.path, headers={"Content-Type": "application/octet-stream"})

    @route
    async def delete_file(request: web.Request) -> web.Response:
        rec = await db(store.delete_file, request.match_info["file_id"])
        return web.json_response({"id": rec.id, "object": "file", "deleted": True})

    # ---- batches ----
    @route
    async def create_batch(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from e
        except RecursionError:
            raise APIError(400, "the request body is not valid JSON: it is nested too deeply") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        unknown = sorted(set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"})
        if unknown:
            raise APIError(400, f"unknown parameter(s) {unknown}", param=unknown[0])
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise APIError(400, f"endpoint must be one of {list(ENDPOINTS)}, got {endpoint!r}", param="endpoint")
        window = body.get("completion_window", "24h")
        window_s = parse_window(window)
        metadata = body.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items())):
            raise APIError(400, "metadata must be an object of at most 16 string keys (<= 64 chars) and string values "
                            "(<= 512 chars)", param="metadata")
        fid = body.get("input_file_id")
        if not isinstance(fid, str):
            raise APIError(400, "input_file_id must be the id of an uploaded file", param="input_file_id")
        try:
            rec = await db(store.get_file, fid)
        except StoreError as e:
            raise APIError(404, str(e), param="input_file_id", code="not_found") from e
        if rec.purpose != "batch":
            raise APIError(400, f"file {fid} has purpose {rec.purpose!r}; a batch input needs purpose 'batch'",
                       param="input_file_id")
        batch = await db(store.create_batch, endpoint, fid, window, window_s, metadata)
        request.app[RUNNER_KEY].start(batch.id)
        return web.json_response(batch.to_openai())

    @route
    async def get_batch(request: web.Request) -> web.Response:
        return web.json_response((await db(store.get_batch, request.match_info["batch_id"])).to_openai())

    @route
    async def list_batches(request: web.Request) -> web.Response:
        limit = _int_param(request.query, "limit", 20, 1, 100)
        batches, more = await db(store.list_batches, request.query.get("after"), limit)
        return web.json_response(_page([b.to_openai() for b in batches], more))

    @route
    async def cancel_batch(request: web.Request) -> web.Response:
        bid = request.match_info["batch_id"]
        try:
            batch = await request.app[RUNNER_KEY].cancel(bid)
        except InvalidTransition as e:
            raise APIError(409, f"batch {bid} is {e.current} and cannot be cancelled", code="conflict") from e
        return web.json_response(batch.to_openai())

    app.router.add_post("/v1/files", upload)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{file_id}", get_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_delete("/v1/files/{file_id}", delete_file)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)


async def _save_part(part: Any, folder: Path, max_bytes: int, upload: Upload) -> tuple[str, Path, int, str]:
    """Stream an uploaded file to disk (fsynced), refusing it once it passes max_bytes or the storage quota."""
    fid = new_id("file-")
    path = folder / fid
    size = 0
    fh = await asyncio.to_thread(open, path, "wb")
    try:
        while chunk := await part.read_chunk(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise APIError(413, f"the file is over the limit of {max_bytes} bytes for batch files",
                           param="file", code="file_too_large")
            upload.take(len(chunk))
            await asyncio.to_thread(fh.write, chunk)
        await asyncio.to_thread(lambda: (fh.flush(), os.fsync(fh.fileno())))
    except BaseException:
        fh.close()
        path.unlink(missing_ok=True)
        raise
    fh.close()
    return fid, path, size, Path(part.filename or "upload.jsonl").name


def _int_param(q: Any, name: str, default: int, lo: int, hi: int) -> int:
    raw = q.get(name)
    if raw is None:
        return default
    try:
        val = int(raw)
    except ValueError:
        val = lo - 1
    if not lo <= val <= hi:
        raise APIError(400, f"{name} must be an integer from {lo} to {hi}, got {raw!r}", param=name)
    return val


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
