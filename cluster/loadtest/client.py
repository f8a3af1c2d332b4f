"""A stdlib asyncio client for OpenAI-compatible `/v1/completions` and `/v1/chat/completions` with SSE streaming.

Timing follows vLLM's request functions: `start` is taken just before the request is sent; TTFT is the time of the
first SSE message with non-empty `choices`; every later such message adds one inter-token (inter-chunk) gap to
`itl`; E2EL is the time of the last `choices` message (a trailing usage-only message does not count). Output tokens
come from `usage.completion_tokens` (requested with `stream_options.include_usage`), else the number of chunks.
A request succeeds iff it got a 2xx status and at least one `choices` message.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cluster.loadtest.datasets import RequestSpec

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class RequestRecord:
    index: int
    prompt_len: int
    output_len_requested: int
    start: float = 0.0  # seconds after the benchmark start
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2el: float = 0.0
    output_tokens: int = 0
    output_tokens_from_usage: bool = False
    prompt_tokens_server: int | None = None
    chunk_times: list[float] = field(default_factory=list)  # seconds after the benchmark start
    generated_text: str = ""
    success: bool = False
    error: str = ""


@dataclass
class ClientConfig:
    base_url: str
    model: str
    endpoint: str = "completions"
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout_s: float = 6 * 3600.0
    extra_body: dict = field(default_factory=dict)


def build_payload(cfg: ClientConfig, spec: RequestSpec) -> dict:
    body: dict = {"model": cfg.model, "max_tokens": spec.output_len, "temperature": cfg.temperature,
                  "stream": True, "stream_options": {"include_usage": True}}
    if cfg.endpoint == "chat":
        content = spec.prompt if isinstance(spec.prompt, str) else " ".join(map(str, spec.prompt))
        body["messages"] = [{"role": "user", "content": content}]
        body["max_completion_tokens"] = spec.output_len
    else:
        body["prompt"] = spec.prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    return body


async def _read_chunked(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size_line = await reader.readline()
        if not size_line:
            return
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            return
        data = await reader.readexactly(size)
        await reader.readline()
        yield data


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        async for part in _read_chunked(reader):
            yield part
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while part := await reader.read(65536):
            yield part


async def _post_stream(url: str, body: bytes, headers: dict[str, str]):
    """Open a connection and POST; returns (status, response headers, body iterator, writer)."""
    u = urlsplit(url)
    https = u.scheme == "https"
    port = u.port or (443 if https else 80)
    ctx = ssl.create_default_context() if https else None
    reader, writer = await asyncio.open_connection(u.hostname, port, ssl=ctx, limit=2**24)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    lines = [f"POST {path} HTTP/1.1", f"Host: {u.netloc}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Accept: text/event-stream", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    status_line = await reader.readline()
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2:
        raise ConnectionError(f"bad status line {status_line!r}")
    status = int(parts[1])
    resp_headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        resp_headers[k.strip().lower()] = v.strip()
    return status, resp_headers, _read_body(reader, resp_headers), writer


async def _sse_messages(body: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """Yield the `data:` payload of each SSE line as soon as it is complete."""
    buf = b""
    async for part in body:
        buf += part
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line = line.strip()
            if line.startswith(b"data:"):
                yield line[5:].strip().decode("utf-8", "replace")
    if buf.strip().startswith(b"data:"):
        yield buf.strip()[5:].strip().decode("utf-8", "replace")


async def send_request(cfg: ClientConfig, spec: RequestSpec, index: int, t0: float,
                       on_chunk: Callable[[float], None] | None = None) -> RequestRecord:
    """Send one streaming request; `t0` is the benchmark's perf_counter origin. `on_chunk(now)` is called for
    every message with `choices` as it arrives (the live progress line counts them)."""
    rec = RequestRecord(index=index, prompt_len=spec.prompt_len, output_len_requested=spec.output_len)
    url = cfg.base_url.rstrip("/") + ENDPOINTS[cfg.endpoint]
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    body = json.dumps(build_payload(cfg, spec)).encode()
    writer = None
    st = time.perf_counter()
    rec.start = st - t0
    try:
        async with asyncio.timeout(cfg.timeout_s) if hasattr(asyncio, "timeout") else _nullctx():
            status, _, stream, writer = await _post_stream(url, body, headers)
            if not 200 <= status < 300:
                text = b"".join([p async for p in stream]).decode("utf-8", "replace")
                rec.error = f"HTTP {status}: {error_message(text)[:500]}"
                return rec
            last = st
            chunks = 0
            async for msg in _sse_messages(stream):
                if msg == "[DONE]":
                    break
                data = json.loads(msg)
                now = time.perf_counter()
                if "error" in data and not data.get("choices"):
                    rec.error = str(data["error"])[:500]
                    return rec
                if choices := data.get("choices"):
                    if chunks == 0:
                        rec.ttft = now - st
                    else:
                        rec.itl.append(now - last)
                    last = now
                    chunks += 1
                    rec.chunk_times.append(now - t0)
                    if on_chunk is not None:
                        on_chunk(now)
                    c = choices[0]
                    delta = c.get("delta") or {}  # chat: reasoning (thinking mode) and answer text both count
                    rec.generated_text += delta.get("reasoning_content") or delta.get("content") or c.get("text") or ""
                if usage := data.get("usage"):
                    if usage.get("completion_tokens") is not None:
                        rec.output_tokens = int(usage["completion_tokens"])
                        rec.output_tokens_from_usage = True
                    if usage.get("prompt_tokens") is not None:
                        rec.prompt_tokens_server = int(usage["prompt_tokens"])
            if chunks == 0:
                rec.error = "never received a valid chunk with choices"
                return rec
            rec.e2el = last - st
            if not rec.output_tokens_from_usage:
                rec.output_tokens = chunks
            rec.success = True
    except Exception as e:  # any failure is recorded on the request, the run goes on
        rec.error = f"{type(e).__name__}: {e}"[:500] or type(e).__name__
    finally:
        if writer is not None:
            writer.close()
    return rec


def error_message(text: str) -> str:
    """The `error.message` of an OpenAI error body, else the body itself."""
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"]
    return text


class _nullctx:
    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


def api_key_from_env(var: str | None) -> str | None:
    """The API key from environment variable `var` (default OPENAI_API_KEY when var is None)."""
    return os.environ.get(var or "OPENAI_API_KEY") or None
