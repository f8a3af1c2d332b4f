"""The aiohttp application: OpenAI routes, /health, /metrics, auth, body limits, OpenAI-style errors.

- POST /v1/completions, POST /v1/chat/completions (JSON, or SSE with `stream: true`: one `data: {chunk}`
  per event, a `data: {"error": ...}` event if a request fails mid-stream, then `data: [DONE]`).
- GET /v1/models, GET /v1/models/{id}, GET /v1/models/{id}/tokenizer (the model's tokenizer.json, so a client
  such as `megaserve bench serve` can make prompts of exact token lengths); GET /health (200 when every rank
  answered the latest status refresh, else 503); GET /metrics (Prometheus text format,
  cluster/server/metrics.py). Both answer from a snapshot refreshed once per ping interval
  (cluster/server/status_cache.py), never with an RPC per rank per call.
- Caps (cluster/server/limits.py): prompts x n per request (413), requests in flight (429 + Retry-After),
  stored file bytes (413).
- Auth: when `settings.api_key_env` is set, every /v1/* request needs `Authorization: Bearer <key>`
  (401 otherwise); /health and /metrics stay open for probes and scrapers.
- JSON bodies above `settings.max_body_bytes` get 413 before they are read whole.
- Every error is `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status; nothing a client
  sends stops the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any

from aiohttp import web

from cluster.batch.routes import add_batch_routes
from cluster.server.errors import APIError
from cluster.server.limits import InflightLimit
from cluster.server.openai_api import OpenAIService
from cluster.server.settings import ServerSettings
from cluster.server.status_cache import StatusCache

log = logging.getLogger(__name__)

_READ_CHUNK = 1 << 16


def _error_response(e: APIError) -> web.Response:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    return web.json_response(e.body(), status=e.status, headers={**headers, **e.headers})


async def read_json(request: web.Request, limit: int) -> Any:
    """The request's JSON body; APIError 413 past `limit` bytes (checked before and while reading), 400 if bad."""
    length = request.content_length
    if length is not None and length > limit:
        raise APIError(413, f"the request body is {length} bytes; the limit is {limit} bytes",
                       "invalid_request_error", None, "request_too_large")
    buf = bytearray()
    while chunk := await request.content.read(_READ_CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes", "invalid_request_error",
                           None, "request_too_large")
    try:
        return json.loads(buf)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request: {e}", "invalid_request_error",
                       None, "invalid_json") from None
    except RecursionError:  # a body like [[[[...]]]] nested deeper than the parser's stack
        raise APIError(400, "We could not parse the JSON body of your request: it is nested too deeply",
                       "invalid_request_error", None, "invalid_json") from None


async def _unless_client_leaves(request: web.Request, coro: Any, poll_s: float = 0.2) -> Any:
    """Await `coro`, cancelling it (which aborts its rank requests) if the client disconnects meanwhile.

    aiohttp cancels handlers on disconnect only when the runner was built with handler_cancellation=True
    (`serve` below does); this check makes a non-streaming request abort under any runner.
    """
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the client disconnected")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def build_app(service: OpenAIService, settings: ServerSettings) -> web.Application:
    api_key = settings.api_key()
    metrics = service.metrics
    service.max_choices_per_request = settings.max_choices_per_request
    in_flight = InflightLimit(settings.max_requests_in_flight, settings.retry_after_s)
    status = StatusCache(lambda: service.router, settings.status_interval_s)

    @web.middleware
    async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except APIError as e:
            metrics.record_error(e.status)
            return _error_response(e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            metrics.record_error(e.status)
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
            if e.status == 404:
                message = f"no route for {request.method} {request.path}"
            return _error_response(APIError(e.status, message, kind))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:  # a bug: answer 500 and keep serving
            log.exception("unhandled error on %s %s", request.method, request.path)
            metrics.record_error(500)
            return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if api_key is not None and request.path.startswith("/v1/"):
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise APIError(401, "You didn't provide an API key: send 'Authorization: Bearer <key>'.",
                               "invalid_request_error", None, "invalid_api_key")
            if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                raise APIError(401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")
        return await handler(request)

    app = web.Application(middlewares=[errors, auth, in_flight.middleware],
                          client_max_size=max(settings.max_body_bytes, settings.max_batch_file_bytes) + (1 << 20))

    async def generate(request: web.Request, chat: bool) -> web.StreamResponse:
        body = await read_json(request, settings.max_body_bytes)
        job = service.prepare(body, chat)
        if not job.stream:
            return web.json_response(await _unless_client_leaves(request, service.run(job)))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        chunks = service.stream(job)
        try:
            async for chunk in chunks:
                await resp.write(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n")
        except APIError as e:  # headers are out: report in-band, as OpenAI does
            metrics.record_error(e.status)
            await resp.write(b"data: " + json.dumps(e.body()).encode() + b"\n\n")
        finally:
            await chunks.aclose()  # a client that went away aborts its requests here
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=False)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=True)

    async def models(request: web.Request) -> web.Response:
        return web.json_response(service.models())

    def model_entry(name: str) -> dict:
        for m in service.models()["data"]:
            if m["id"] == name:
                return m
        raise APIError(404, f"The model {name!r} does not exist", "invalid_request_error", "model", "model_not_found")

    async def model(request: web.Request) -> web.Response:
        return web.json_response(model_entry(request.match_info["model"]))

    async def tokenizer(request: web.Request) -> web.Response:
        model_entry(request.match_info["model"])
        return web.Response(text=service.tokenizer.to_str(), content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        ok, body = status.health()
        return web.json_response(body, status=200 if ok else 503)

    async def prometheus(request: web.Request) -> web.Response:
        return web.Response(text=metrics.render(status.rank_stats), content_type="text/plain",
                            headers={"X-Prometheus-Format": "0.0.4"})

    async def start_status(app: web.Application) -> None:
        await status.start()

    async def stop_status(app: web.Application) -> None:
        await status.stop()

    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_get("/v1/models/{model}/tokenizer", tokenizer)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", prometheus)
    app.on_startup.append(start_status)
    app.on_cleanup.append(stop_status)
    add_batch_routes(app, service, settings)
    return app


async def serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving `app` (handlers are cancelled when their client disconnects); returns (runner, port)."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = site._server.sockets if site._server is not None else []  # noqa: SLF001 (the bound port when 0)
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, bound
