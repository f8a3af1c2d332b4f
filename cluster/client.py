"""megaserve's Python client: batch jobs with a progress bar, and single requests. Standard library only.

    from cluster import Client
    client = Client("http://127.0.0.1:8000", api_key=None)       # or $MEGASERVE_API_KEY
    job = client.submit_batch([{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}])
    job.wait()                                                    # live progress bar on stderr
    for r in job.results():                                       # input order
        print(r.custom_id, r.text if r.ok else r.error["message"])
    print(client.generate("Once upon a time", max_tokens=16))
    for piece in client.stream(messages=[{"role": "user", "content": "hi"}]):
        print(piece, end="")
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BATCH_ENDPOINTS = (CHAT, COMPLETIONS)
_LINE_OF_ID = re.compile(r"_(\d+)$")


class ClientError(Exception):
    """The server answered with an error (`status` >= 400) or could not be reached (`status` 0)."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        where = f"HTTP {status}" if status else "connection failed"
        super().__init__(f"{where} ({type or 'error'}): {message}")


@dataclass(frozen=True)
class BatchStatus:
    id: str
    status: str
    total: int
    completed: int
    failed: int
    output_file_id: str | None
    error_file_id: str | None
    errors: list[dict[str, Any]] = field(default_factory=list)  # whole-job errors (a failed job says why)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    endpoint: str | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def all_failed(self) -> bool:
        """Finished with requests, none of which succeeded (status may still say "completed")."""
        return self.done and self.failed > 0 and self.completed == 0

    @classmethod
    def from_api(cls, b: dict[str, Any]) -> BatchStatus:
        rc = b.get("request_counts") or {}
        errs = (b.get("errors") or {}).get("data") or []
        return cls(b["id"], b["status"], rc.get("total", 0), rc.get("completed", 0), rc.get("failed", 0),
                   b.get("output_file_id"), b.get("error_file_id"), errs, b, b.get("endpoint"))


@dataclass(frozen=True)
class BatchResult:
    custom_id: str | None
    ok: bool
    status_code: int | None  # None when the request never ran (broken line, cancelled, expired)
    body: dict[str, Any] | None  # the response body when ok
    error: dict[str, Any] | None  # OpenAI error object (message, type/code, ...) when not ok
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def text(self) -> str | None:
        """The first choice's text (chat message content or completion text), when ok."""
        if not self.ok or not self.body or not self.body.get("choices"):
            return None
        choice = self.body["choices"][0]
        return choice["message"].get("content") if "message" in choice else choice.get("text")

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> BatchResult:
        resp = rec.get("response")
        if resp is not None and 200 <= resp.get("status_code", 0) < 300:
            return cls(rec.get("custom_id"), True, resp["status_code"], resp.get("body"), None, rec)
        if resp is not None:
            err = (resp.get("body") or {}).get("error") or {"message": json.dumps(resp.get("body"))}
            return cls(rec.get("custom_id"), False, resp.get("status_code"), None, err, rec)
        return cls(rec.get("custom_id"), False, None, None, rec.get("error") or {"message": "no response"}, rec)


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        url = base_url.rstrip("/")
        self.base_url = url[:-3] if url.endswith("/v1") else url
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.api_key = api_key if api_key is not None else os.environ.get("MEGASERVE_API_KEY")
        self.timeout = timeout
        self._model: str | None = None

    # ---- single requests ----
    def models(self) -> list[str]:
        return [m["id"] for m in self._json("GET", "/v1/models")["data"]]

    @property
    def default_model(self) -> str:
        if self._model is None:
            models = self.models()
            if not models:
                raise ClientError(0, "the server lists no models")
            self._model = models[0]
        return self._model

    def generate(self, prompt: str | None = None, *, messages: list[dict[str, Any]] | None = None,
                 model: str | None = None, **params: Any) -> str:
        """One completion (`prompt`) or chat completion (`messages`); returns the text of the first choice."""
        path, body = self._single(prompt, messages, model, params)
        out = self._json("POST", path, body)
        choice = out["choices"][0]
        return choice["message"]["content"] if messages is not None else choice["text"]

    def stream(self, prompt: str | None = None, *, messages: list[dict[str, Any]] | None = None,
               model: str | None = None, **params: Any) -> Iterator[str]:
        """Like generate(), but yields text pieces as the server streams them (SSE)."""
        path, body = self._single(prompt, messages, model, params)
        body["stream"] = True
        with self._open("POST", path, json.dumps(body).encode(), "application/json") as resp:
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    e = chunk["error"]
                    raise ClientError(resp.status, e.get("message", data), e.get("type"), e.get("param"),
                                      e.get("code"))
                for choice in chunk.get("choices", []):
                    piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
                    if piece:
                        yield piece

    def _single(self, prompt: str | None, messages: list[dict[str, Any]] | None, model: str | None,
                params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt (a completion) or messages (a chat completion)")
        body = {"model": model or self.default_model, **params}
        if messages is not None:
            return "/v1/chat/completions", {**body, "messages": messages}
        return "/v1/completions", {**body, "prompt": prompt}

    # ---- files and batches ----
    def upload_file(self, data: bytes | str | Path, filename: str = "batch.jsonl") -> str:
        """Upload a batch input file (a path or its bytes); returns the file id."""
        if not isinstance(data, bytes):
            filename = Path(data).name
            data = Path(data).read_bytes()
        filename = re.sub(r'["\r\n\\]', "_", filename)  # it goes into a quoted header value
        boundary = f"megaserve-{secrets.token_hex(8)}"
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                f"Content-Type: application/jsonl\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        return self._json("POST", "/v1/files", body, f"multipart/form-data; boundary={boundary}")["id"]

    def submit_batch(self, path_or_records: str | Path | Iterable[dict[str, Any]], endpoint: str | None = None,
                     completion_window: str = "24h", metadata: dict[str, str] | None = None) -> BatchJob:
        """Start a batch job from a JSONL file or from records. A record is either a full request line
        ({custom_id, method, url, body}) or just a request body, which gets custom_id `request-<i>`, a url,
        and the server's first model when it names none.

        A batch job runs one endpoint, so it comes from the lines: their `url`, and for a bare body `messages`
        (chat, /v1/chat/completions) or `prompt` (/v1/completions). Lines that disagree, with each other or
        with an `endpoint` given here, are refused before anything is uploaded (ValueError naming the lines);
        `endpoint` is needed only when nothing in the lines says. `BatchJob.endpoint` is the one chosen, and
        the progress bar shows it."""
        if isinstance(path_or_records, (str, Path)):
            path = Path(path_or_records)
            data = path.read_bytes()
            endpoint = _endpoint_of_file(data, endpoint, str(path))
            fid = self.upload_file(data, path.name)
        else:
            records = list(path_or_records)
            for i, rec in enumerate(records):
                if not isinstance(rec, dict):
                    raise TypeError(f"record {i} is a {type(rec).__name__}, expected a dict")
            if not records:
                raise ValueError("submit_batch got no records")
            endpoint = _endpoint_of_records(records, endpoint)
            lines = []
            for i, rec in enumerate(records):
                if "body" not in rec:
                    rec = {"custom_id": f"request-{i}", "method": "POST", "url": endpoint,
                           "body": {"model": self.default_model, **rec} if "model" not in rec else rec}
                lines.append(json.dumps(rec))
            fid = self.upload_file(("\n".join(lines) + "\n").encode())
        body: dict[str, Any] = {"input_file_id": fid, "endpoint": endpoint, "completion_window": completion_window}
        if metadata is not None:
            body["metadata"] = metadata
        return BatchJob(self, self._json("POST", "/v1/batches", body)["id"], endpoint)

    def batch(self, batch_id: str) -> BatchJob:
        return BatchJob(self, batch_id)

    def file_content(self, file_id: str) -> bytes:
        with self._open("GET", f"/v1/files/{urllib.parse.quote(file_id)}/content") as resp:
            return resp.read()

    # ---- HTTP ----
    def _json(self, method: str, path: str, body: bytes | dict[str, Any] | None = None,
              content_type: str = "application/json") -> dict[str, Any]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        with self._open(method, path, data, content_type if data is not None else None) as resp:
            return json.loads(resp.read())

    def _open(self, method: str, path: str, data: bytes | None = None, content_type: str | None = None):
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)["error"]
                raise ClientError(e.code, err.get("message", ""), err.get("type"), err.get("param"),
                                  err.get("code")) from None
            except (ValueError, KeyError, TypeError):
                raise ClientError(e.code, raw.decode("utf-8", "replace")[:500] or e.reason) from None
        except urllib.error.URLError as e:
            raise ClientError(0, f"{self.base_url}: {e.reason}", "connection_error") from None


def _body_endpoint(body: Any) -> str | None:
    """The endpoint a request body is for: `messages` -> chat, `prompt` -> completions; None if it says neither."""
    if not isinstance(body, dict):
        return None
    if "messages" in body and "prompt" not in body:
        return CHAT
    if "prompt" in body and "messages" not in body:
        return COMPLETIONS
    return None


def _choose_endpoint(found: dict[str, list[str]], given: str | None, source: str) -> str:
    """One endpoint from {endpoint: [where it was found]} and the caller's `endpoint` argument."""
    for url, where in found.items():
        if url not in BATCH_ENDPOINTS:
            raise ValueError(f"{source}: {where[0]} asks for {url!r}; batch jobs run {' or '.join(BATCH_ENDPOINTS)}")
    if given is not None and given not in BATCH_ENDPOINTS:
        raise ValueError(f"endpoint must be {' or '.join(BATCH_ENDPOINTS)}, got {given!r}")
    if len(found) > 1 or (given is not None and found and given not in found):
        parts = [f"{len(where)} for {url} (first: {where[0]})" for url, where in found.items()]
        if given is not None and given not in found:
            parts.append(f"endpoint={given!r} given to submit_batch")
        raise ValueError(f"{source} mixes endpoints: {'; '.join(parts)}; a batch job runs one endpoint, so submit "
                         f"each kind as its own batch")
    if found:
        return next(iter(found))
    if given is None:
        raise ValueError(f"{source}: no line says its endpoint (no 'url', no 'messages' or 'prompt' body); pass "
                         f"endpoint={CHAT!r} or {COMPLETIONS!r}")
    return given


def _endpoint_of_records(records: list[dict[str, Any]], given: str | None) -> str:
    found: dict[str, list[str]] = {}
    for i, rec in enumerate(records):
        if "body" in rec:
            url = rec.get("url")
            if isinstance(url, str):
                found.setdefault(url, []).append(f"record {i} (url)")
        elif (url := _body_endpoint(rec)) is not None:
            found.setdefault(url, []).append(f"record {i} ({'messages' if url == CHAT else 'prompt'})")
    return _choose_endpoint(found, given, "the records")


def _endpoint_of_file(data: bytes, given: str | None, name: str) -> str:
    """The endpoint of a JSONL batch input: every line's `url` (lines that do not parse are left to the server,
    which records each with its line number)."""
    found: dict[str, list[str]] = {}
    for lineno, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        try:
            rec = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(rec, dict):
            url = rec.get("url") if isinstance(rec.get("url"), str) else _body_endpoint(rec.get("body"))
            if url is not None:
                found.setdefault(url, []).append(f"line {lineno}")
    return _choose_endpoint(found, given, name)


class BatchJob:
    """A handle on one batch job."""

    def __init__(self, client: Client, batch_id: str, endpoint: str | None = None):
        self.client = client
        self.id = batch_id
        self.endpoint = endpoint  # set by submit_batch; status().endpoint is the server's word

    def __repr__(self) -> str:
        return f"BatchJob({self.id!r})"

    def status(self) -> BatchStatus:
        return BatchStatus.from_api(self.client._json("GET", f"/v1/batches/{urllib.parse.quote(self.id)}"))

    def cancel(self) -> BatchStatus:
        return BatchStatus.from_api(self.client._json("POST", f"/v1/batches/{urllib.parse.quote(self.id)}/cancel"))

    def wait(self, progress: bool = True, poll_s: float = 0.5, timeout: float | None = None,
             out: TextIO | None = None, unreachable_s: float = 60.0) -> BatchStatus:
        """Poll until the job ends (completed, failed, cancelled, expired); draw a progress bar on stderr.
        A server that cannot be reached (or answers 502/503) is polled again for up to `unreachable_s`
        seconds in a row, so a job outlives a server restart."""
        bar = _ProgressBar(out or sys.stderr) if progress else None
        deadline = None if timeout is None else time.monotonic() + timeout
        down_since: float | None = None
        try:
            while True:
                try:
                    st = self.status()
                    down_since = None
                except ClientError as e:
                    if e.status not in (0, 502, 503):
                        raise
                    down_since = down_since or time.monotonic()
                    if time.monotonic() - down_since > unreachable_s:
                        raise
                    st = None
                if st is not None and bar is not None:
                    bar.draw(st)
                if st is not None and st.done:
                    if bar is not None and st.failed:
                        bar.note(self._first_error(st))
                    return st
                if deadline is not None and time.monotonic() > deadline:
                    now = st.status if st is not None else "unreachable"
                    raise TimeoutError(f"batch {self.id} is still {now} after {timeout}s")
                time.sleep(poll_s)
        finally:
            if bar is not None:
                bar.close()

    def _first_error(self, st: BatchStatus) -> str:
        """'first error (<custom_id>): <message>' from the error file, for the progress bar's last line."""
        if st.errors:
            return f"the job failed: {st.errors[0].get('message')}"
        if not st.error_file_id:
            return f"{st.failed} request(s) failed"
        try:
            first = self.client.file_content(st.error_file_id).split(b"\n", 1)[0]
            result = BatchResult.from_record(json.loads(first))
        except (ClientError, ValueError):
            return f"{st.failed} request(s) failed (the error file {st.error_file_id} could not be read)"
        what = "every request failed" if st.all_failed else f"{st.failed} of {st.total} requests failed"
        return f"{what}; first error ({result.custom_id}): {(result.error or {}).get('message')}"

    def results(self) -> Iterator[BatchResult]:
        """Every request of a finished job, output and errors together, in input order."""
        st = self.status()
        if not st.done:
            raise ClientError(0, f"batch {self.id} is {st.status}: its results come once it ends (call wait() first)",
                              "batch_not_finished")
        records = []
        for fid in (st.output_file_id, st.error_file_id):
            if fid:
                records += [json.loads(x) for x in self.client.file_content(fid).decode("utf-8").splitlines() if x]

        def order(rec: dict[str, Any]) -> tuple[int, str]:
            m = _LINE_OF_ID.search(str(rec.get("id", "")))
            return (int(m.group(1)) if m else sys.maxsize, str(rec.get("custom_id")))

        for rec in sorted(records, key=order):
            yield BatchResult.from_record(rec)


class _ProgressBar:
    WIDTH = 30

    def __init__(self, out: TextIO):
        self.out = out
        self.t0 = time.monotonic()
        self.first_done: int | None = None
        self.last_len = 0
        # Not a terminal (a log file, CI): one line per change in progress instead of carriage-return redraws.
        self.live = bool(getattr(out, "isatty", lambda: False)())
        self.last_key: tuple | None = None
        self.live_closed = False

    def draw(self, st: BatchStatus) -> None:
        done = st.completed + st.failed
        if self.first_done is None:
            self.first_done = done
        dt = time.monotonic() - self.t0
        rate = (done - self.first_done) / dt if dt > 0 else 0.0
        frac = done / st.total if st.total else 0.0
        fill = int(frac * self.WIDTH)
        state = st.status
        if st.all_failed:
            state = f"{st.status}: EVERY REQUEST FAILED"
        elif st.done and st.failed:
            state = f"{st.status} with {st.failed} failed"
        line = (f"{st.id[:20]} {st.endpoint or ''} [{'#' * fill}{'.' * (self.WIDTH - fill)}] {done}/{st.total or '?'} "
                f"({st.completed} ok, {st.failed} failed) {rate:.1f} req/s {state}")
        if self.live:
            self.out.write("\r" + line + " " * max(0, self.last_len - len(line)))
            self.last_len = len(line)
        elif (done, st.status) != self.last_key:
            self.out.write(line + "\n")
        self.last_key = (done, st.status)
        self.out.flush()

    def note(self, text: str) -> None:
        """A line under the bar (why requests failed)."""
        if self.live:
            self.out.write("\n")
            self.live_closed = True
        self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.live and not self.live_closed:
            self.out.write("\n")
            self.out.flush()
