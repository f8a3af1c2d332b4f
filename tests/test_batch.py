"""Batch jobs without a server: the store's status machine, input validation, and the runner on a fake service."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from cluster.batch.gate import AdmissionGate
from cluster.batch.jsonl import InputError, parse_input
from cluster.batch.runner import BatchRunner
from cluster.batch.store import BatchStore, FileRecord, InvalidTransition, StoreError, new_id
from cluster.server.errors import APIError


class FakeService:
    """Answers chat requests after `delay` seconds; records concurrency and every body it ran."""

    def __init__(self, delay: float = 0.0, block: asyncio.Event | None = None):
        self.delay, self.block = delay, block
        self.calls: list[dict] = []
        self.running = 0
        self.max_running = 0

    async def chat_completions(self, body: dict) -> dict:
        self.calls.append(body)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.block is not None:
                await self.block.wait()
            await asyncio.sleep(self.delay)
            if body.get("max_tokens", 1) <= 0:
                raise APIError(400, "max_tokens must be at least 1")
            text = body["messages"][-1]["content"].upper()
            return {"id": f"chatcmpl-{len(self.calls)}", "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}]}
        finally:
            self.running -= 1

    async def completions(self, body: dict) -> dict:
        raise AssertionError("these tests use the chat endpoint")


def _req(cid: str, text: str = "hi", **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "m", "messages": [{"role": "user", "content": text}], **body}})


def _add_input(store: BatchStore, lines: list[str]) -> FileRecord:
    path = store.files_dir / new_id("in-")
    path.write_text("\n".join(lines) + "\n")
    return store.add_file(FileRecord(new_id("file-"), "batch", "in.jsonl", path.stat().st_size, 0, str(path)))


def _records(store: BatchStore, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in Path(store.get_file(file_id).path).read_text().splitlines()]


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


# ---- store ----

def test_store_status_machine(tmp_path):
    store = BatchStore(tmp_path)
    f = _add_input(store, [_req("a")])
    b = store.create_batch("/v1/chat/completions", f.id, "24h", 86400, {"k": "v"}, now=100)
    assert (b.status, b.created_at, b.expires_at, b.metadata) == ("validating", 100, 86500, {"k": "v"})
    with pytest.raises(InvalidTransition, match="validating; cannot move to completed"):
        store.transition(b.id, "completed")
    with pytest.raises(ValueError, match="unknown batch status"):
        store.transition(b.id, "done")
    b = store.transition(b.id, "in_progress", now=101, total=3)
    assert (b.status, b.times["in_progress_at"], b.total) == ("in_progress", 101, 3)
    b = store.transition(b.id, "finalizing", now=102)
    out = FileRecord(new_id("file-"), "batch_output", "o.jsonl", 5, 103, str(tmp_path / "o"))
    b = store.transition(b.id, "completed", now=103, new_files=(out,), output_file_id=out.id, completed=3)
    assert b.terminal and b.times["completed_at"] == 103 and store.get_file(out.id) == out
    api = b.to_openai()
    assert api["object"] == "batch" and api["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    for new in ("in_progress", "cancelling", "failed"):
        with pytest.raises(InvalidTransition, match="allowed: none"):
            store.transition(b.id, new)
    # a refused transition changes nothing, including the files it would have added
    b2 = store.create_batch("/v1/chat/completions", f.id, "24h", 86400, None)
    ghost = FileRecord(new_id("file-"), "batch_output", "g", 1, 0, "g")
    with pytest.raises(InvalidTransition):
        store.transition(b2.id, "cancelled", new_files=(ghost,))
    with pytest.raises(StoreError, match="No such file"):
        store.get_file(ghost.id)
    store.transition(b2.id, "cancelling")
    assert store.transition(b2.id, "cancelled").status == "cancelled"
    store.close()
    # the rows survive a reopen
    again = BatchStore(tmp_path)
    assert again.get_batch(b.id).status == "completed" and again.unfinished() == []


def test_store_pagination_and_delete(tmp_path):
    store = BatchStore(tmp_path)
    f = _add_input(store, [_req("a")])
    ids = [store.create_batch("/v1/chat/completions", f.id, "24h", 86400, None).id for _ in range(5)]
    page, more = store.list_batches(limit=2)
    assert [b.id for b in page] == ids[::-1][:2] and more
    page, more = store.list_batches(after=page[-1].id, limit=10)
    assert [b.id for b in page] == ids[::-1][2:] and not more
    with pytest.raises(StoreError, match="after='nope'"):
        store.list_batches(after="nope")
    # the input of an unfinished batch cannot be deleted
    with pytest.raises(StoreError, match="is the input of batch"):
        store.delete_file(f.id)
    for bid in ids:
        store.transition(bid, "failed")
    store.delete_file(f.id)
    assert not Path(f.path).exists()
    with pytest.raises(StoreError, match="No such file"):
        store.get_file(f.id)


def test_parse_input_names_broken_lines(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text("\n".join([
        _req("a"), "{not json", "[1]", json.dumps({"method": "POST"}), _req("a"),
        json.dumps({"custom_id": "m", "method": "GET", "url": "/v1/chat/completions", "body": {}}),
        json.dumps({"custom_id": "u", "method": "POST", "url": "/v1/completions", "body": {}}),
        json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": "x"}),
        json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {}, "extra": 1}),
        "", _req("s", stream=True), _req("ok"),
    ]))
    lines = parse_input(p, "/v1/chat/completions")
    errs = {ln.lineno: ln.error for ln in lines}
    assert errs[1] is None and errs[12] is None and 10 not in errs
    assert "line 2: not valid JSON" in errs[2]
    assert "line 3: expected a JSON object, got list" in errs[3]
    assert "'custom_id' must be a non-empty string" in errs[4]
    assert "duplicate custom_id 'a' (first on line 1)" in errs[5]
    assert "'method' must be \"POST\"" in errs[6]
    assert "'url' must be the batch's endpoint" in errs[7]
    assert "'body' must be a JSON object" in errs[8]
    assert "unknown field(s) ['extra']" in errs[9]
    assert "'body.stream' must be false" in errs[11]
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="no requests"):
        parse_input(tmp_path / "empty.jsonl", "/v1/chat/completions")


# ---- runner ----

def _check_exactly_once(store: BatchStore, batch_id: str, cids: list[str]) -> tuple[list[dict], list[dict]]:
    b = store.get_batch(batch_id)
    out, err = _records(store, b.output_file_id), _records(store, b.error_file_id)
    seen = Counter(r["custom_id"] for r in out + err)
    assert sorted(seen) == sorted(cids) and set(seen.values()) == {1}
    assert (b.total, b.completed, b.failed) == (len(cids), len(out), len(err))
    return out, err


def test_runner_runs_good_lines_and_reports_broken_ones(tmp_path):
    store = BatchStore(tmp_path)
    f = _add_input(store, [_req("a", "one"), "{broken", _req("b", "two", max_tokens=0), _req("a"), _req("c", "x")])
    b = store.create_batch("/v1/chat/completions", f.id, "24h", 86400, None)
    svc = FakeService()

    async def main():
        runner = BatchRunner(store, svc, AdmissionGate(4))
        runner.start(b.id)
        await runner.wait(b.id)

    _run(main())
    done = store.get_batch(b.id)
    assert done.status == "completed" and done.times["finalizing_at"] is not None
    out = _records(store, done.output_file_id)
    err = _records(store, done.error_file_id)
    assert {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in out} == \
        {"a": "ONE", "c": "X"}
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in out)
    by_line = {r["error"]["line"] if r["error"] else None: r for r in err}
    assert "line 2: not valid JSON" in by_line[2]["error"]["message"] and by_line[2]["custom_id"] is None
    assert "duplicate custom_id 'a'" in by_line[4]["error"]["message"]
    api_err = by_line[None]
    assert api_err["custom_id"] == "b" and api_err["response"]["status_code"] == 400
    assert api_err["response"]["body"]["error"]["message"] == "max_tokens must be at least 1"
    assert (done.total, done.completed, done.failed) == (5, 2, 3)
    assert len(svc.calls) == 3  # broken lines never reach the service
    assert store.get_file(done.output_file_id).purpose == "batch_output"


def test_runner_bounded_concurrency_and_interactive_priority(tmp_path):
    store = BatchStore(tmp_path)
    cids = [f"r{i}" for i in range(12)]
    f = _add_input(store, [_req(c) for c in cids])
    b = store.create_batch("/v1/chat/completions", f.id, "24h", 86400, None)
    svc = FakeService(delay=0.01)

    async def main():
        release = svc.block = asyncio.Event()
        gate = AdmissionGate(3)
        runner = BatchRunner(store, svc, gate)
        async with gate.interactive(), gate.interactive():  # two interactive requests leave one batch slot
            runner.start(b.id)
            await asyncio.sleep(0.1)
            assert svc.running == 1
        await asyncio.sleep(0.1)
        assert svc.running == 3  # interactive traffic gone: batch fills the limit, never more
        release.set()
        await runner.wait(b.id)

    _run(main())
    assert svc.max_running == 3
    _check_exactly_once(store, b.id, cids)


def test_runner_cancel_gives_every_line_one_record(tmp_path):
    store = BatchStore(tmp_path)
    cids = [f"r{i}" for i in range(10)]
    f = _add_input(store, [_req(c) for c in cids])
    b = store.create_batch("/v1/chat/completions", f.id, "24h", 86400, None)

    async def main():
        svc = FakeService(delay=0.05)
        runner = BatchRunner(store, svc, AdmissionGate(2))
        runner.start(b.id)
        while store.get_batch(b.id).completed < 3:
            await asyncio.sleep(0.01)
        assert (await runner.cancel(b.id)).status == "cancelling"
        await runner.wait(b.id)
        with pytest.raises(InvalidTransition):
            await runner.cancel(b.id)

    _run(main())
    assert store.get_batch(b.id).status == "cancelled"
    out, err = _check_exactly_once(store, b.id, cids)
    assert len(out) >= 3 and len(err) >= 1
    assert {r["error"]["code"] for r in err} == {"batch_cancelled"}


def test_runner_expiry(tmp_path):
    store = BatchStore(tmp_path)
    cids = [f"r{i}" for i in range(6)]
    f = _add_input(store, [_req(c) for c in cids])
    b = store.create_batch("/v1/chat/completions", f.id, "1s", 1, None)

    async def main():
        runner = BatchRunner(store, FakeService(delay=0.4), AdmissionGate(1))
        runner.start(b.id)
        await runner.wait(b.id)

    t0 = time.monotonic()
    _run(main())
    assert time.monotonic() - t0 < 5
    done = store.get_batch(b.id)
    assert done.status == "expired" and done.times["expired_at"] is not None
    out, err = _check_exactly_once(store, b.id, cids)
    assert len(err) >= 3 and {r["error"]["code"] for r in err} == {"batch_expired"}


def test_runner_fails_job_whose_input_is_unusable(tmp_path):
    store = BatchStore(tmp_path)
    f = _add_input(store, [" "])
    b = store.create_batch("/v1/chat/completions", f.id, "24h", 86400, None)

    async def main():
        runner = BatchRunner(store, FakeService(), AdmissionGate(1))
        runner.start(b.id)
        await runner.wait(b.id)

    _run(main())
    done = store.get_batch(b.id)
    assert done.status == "failed" and "no requests" in done.errors[0]["message"]
    assert done.to_openai()["errors"]["data"][0]["code"] == "invalid_input_file"


def test_runner_resumes_after_crash_exactly_once(tmp_path):
    cids = [f"r{i}" for i in range(20)]
    store = BatchStore(tmp_path)
    f = _add_input(store, [_req(c, c) for c in cids])
    bid = store.create_batch("/v1/chat/completions", f.id, "24h", 86400, None).id
    first = FakeService(delay=0.02)

    async def crash_midway():
        runner = BatchRunner(store, first, AdmissionGate(3))
        runner.start(bid)
        while store.get_batch(bid).completed < 8:
            await asyncio.sleep(0.005)
        await runner.close()  # the process dies: tasks stop, status stays in_progress

    _run(crash_midway())
    store.close()
    out_path = tmp_path / "batches" / bid / "output.jsonl"
    written = [json.loads(x)["custom_id"] for x in out_path.read_text().splitlines()]
    assert 8 <= len(written) < len(cids)
    with open(out_path, "ab") as fh:  # a record torn by the crash: no newline, cut mid-JSON
        fh.write(b'{"id":"batch_req_' + bid.removeprefix("batch_").encode() + b'_20","custom_id":"r19","resp')

    store = BatchStore(tmp_path)
    assert [b.id for b in store.unfinished()] == [bid]
    second = FakeService()

    async def restart():
        runner = BatchRunner(store, second, AdmissionGate(3))
        assert await runner.resume() == [bid]
        await runner.wait(bid)

    _run(restart())
    assert store.get_batch(bid).status == "completed"
    out, _ = _check_exactly_once(store, bid, cids)
    rerun = {c["messages"][0]["content"] for c in second.calls}
    assert rerun == set(cids) - set(written)  # only unfinished lines ran again (r19 included: its record was torn)
    assert {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in out} == \
        {c: c.upper() for c in cids}


# ---- HTTP routes (an aiohttp app with only the batch routes, on the fake service) ----

class _Settings:
    def __init__(self, state_dir, max_batch_file_bytes=4096, batch_concurrency=2):
        self.state_dir, self.max_batch_file_bytes, self.batch_concurrency = state_dir, max_batch_file_bytes, \
            batch_concurrency


def test_routes_files_and_batches(tmp_path):
    from aiohttp import FormData, web
    from aiohttp.test_utils import TestClient, TestServer

    from cluster.batch.routes import add_batch_routes

    async def main():
        app = web.Application()
        add_batch_routes(app, FakeService(), _Settings(tmp_path))
        async with TestClient(TestServer(app)) as c:
            def form(data: bytes, purpose="batch"):
                fd = FormData()
                if purpose is not None:
                    fd.add_field("purpose", purpose)
                fd.add_field("file", data, filename="in.jsonl", content_type="application/jsonl")
                return fd

            data = ("\n".join([_req("a", "x"), "oops", _req("b", "y")]) + "\n").encode()
            r = await c.post("/v1/files", data=form(data))
            f = await r.json()
            assert r.status == 200 and f["object"] == "file" and f["bytes"] == len(data) and f["purpose"] == "batch"
            assert (await (await c.get(f"/v1/files/{f['id']}/content")).read()) == data
            for bad, status, needle in [(form(b"x" * 5000), 413, "limit of 4096 bytes"),
                                        (form(data, "fine-tune"), 400, "purpose must be 'batch'"),
                                        (form(data, None), 400, "missing form field 'purpose'")]:
                r = await c.post("/v1/files", data=bad)
                assert r.status == status and needle in (await r.json())["error"]["message"]
            assert len(list((tmp_path / "files").iterdir())) == 1  # refused uploads leave nothing behind
            r = await c.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/embeddings",
                                                   "completion_window": "24h"})
            assert r.status == 400 and (await r.json())["error"]["param"] == "endpoint"
            r = await c.post("/v1/batches", json={"input_file_id": "file-nope", "endpoint": "/v1/chat/completions"})
            assert r.status == 404 and (await r.json())["error"]["param"] == "input_file_id"
            r = await c.post("/v1/batches", data=b"{bad json", headers={"Content-Type": "application/json"})
            assert r.status == 400 and "not valid JSON" in (await r.json())["error"]["message"]
            r = await c.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                                   "completion_window": "24h", "metadata": {"run": "1"}})
            b = await r.json()
            assert r.status == 200 and b["object"] == "batch" and b["status"] == "validating"
            assert b["metadata"] == {"run": "1"}
            for _ in range(500):
                b = await (await c.get(f"/v1/batches/{b['id']}")).json()
                if b["status"] == "completed":
                    break
                await asyncio.sleep(0.01)
            assert b["status"] == "completed" and b["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
            out = (await (await c.get(f"/v1/files/{b['output_file_id']}/content")).text()).splitlines()
            assert sorted(json.loads(x)["custom_id"] for x in out) == ["a", "b"]
            err = json.loads(await (await c.get(f"/v1/files/{b['error_file_id']}/content")).text())
            assert "line 2: not valid JSON" in err["error"]["message"]
            r = await c.post(f"/v1/batches/{b['id']}/cancel")
            assert r.status == 409 and "completed and cannot be cancelled" in (await r.json())["error"]["message"]
            assert (await c.get("/v1/batches/batch_nope")).status == 404
            page = await (await c.get("/v1/batches?limit=1")).json()
            assert page["object"] == "list" and page["data"][0]["id"] == b["id"] and not page["has_more"]
            assert (await c.get("/v1/batches?limit=0")).status == 400
            files = await (await c.get("/v1/files?purpose=batch_output")).json()
            assert {x["id"] for x in files["data"]} == {b["output_file_id"], b["error_file_id"]}
            r = await c.delete(f"/v1/files/{f['id']}")
            assert (await r.json()) == {"id": f["id"], "object": "file", "deleted": True}
            assert (await c.get(f"/v1/files/{f['id']}")).status == 404

    _run(main())


def test_runner_retries_server_errors_then_records_them(tmp_path):
    store = BatchStore(tmp_path)
    f = _add_input(store, [_req(c, c) for c in ("flaky", "broken", "fine")])
    b = store.create_batch("/v1/chat/completions", f.id, "24h", 86400, None)
    attempts = Counter()

    class Flaky(FakeService):
        async def chat_completions(self, body: dict) -> dict:
            text, priority = body["messages"][0]["content"], body["priority"]
            attempts[text, priority] += 1
            if text == "flaky" and attempts[text, priority] == 1:
                raise ConnectionResetError("rank connection lost")
            if text == "broken":
                raise APIError(503, "no rank is up")
            return await super().chat_completions(body)

    async def main():
        runner = BatchRunner(store, Flaky(), AdmissionGate(2))
        runner.retry_delays_s = (0.01, 0.01)
        runner.start(b.id)
        await runner.wait(b.id)

    _run(main())
    assert attempts == {("flaky", 1): 2, ("broken", 1): 3, ("fine", 1): 1}  # batch requests go at priority 1
    out, err = _check_exactly_once(store, b.id, ["flaky", "broken", "fine"])
    assert sorted(r["custom_id"] for r in out) == ["fine", "flaky"]
    assert err[0]["response"]["status_code"] == 503 and err[0]["response"]["body"]["error"]["message"] == \
        "no rank is up"


def test_store_paths_survive_moving_the_state_dir(tmp_path):
    store = BatchStore(tmp_path / "a")
    f = _add_input(store, [_req("a")])
    store.close()
    (tmp_path / "a").rename(tmp_path / "b")
    moved = BatchStore(tmp_path / "b")
    assert Path(moved.get_file(f.id).path).read_text() == _req("a") + "\n"
