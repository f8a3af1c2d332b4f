"""cluster/loadtest: `megaserve bench serve` against a scripted fake OpenAI server on 127.0.0.1.

The fake server streams SSE with known first-token and inter-token delays (the first token counted from the
connection, later ones from the first one's send, on absolute times so sleep overshoot does not accumulate); the
reported metrics must match what it injected.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import multiprocessing
import queue
import statistics
import time
from dataclasses import dataclass

import pytest

from cluster.cli import main
from cluster.loadtest import arrival, datasets
from cluster.loadtest.metrics import parse_goodput
from cluster.loadtest.runner import run_benchmark


@dataclass
class Plan:
    status: int = 200
    first_s: float = 0.2
    inter_s: float = 0.04
    tokens: int = 10
    usage: bool = True
    prompt_tokens: int | None = None  # usage.prompt_tokens; None: the prompt's words (random prompts: its length)
    chunk_words: int = 1  # words of text per streamed chunk
    error_body: dict | None = None  # the JSON body of a non-200 answer (default {"error": "boom"})


def _prompt_tokens(body: dict) -> int:
    prompt = body.get("prompt") if "prompt" in body else body["messages"][0]["content"]
    return len(prompt) if isinstance(prompt, list) else len(prompt.split())


class FakeServer:
    """An OpenAI-compatible streaming server in a forked process (its timing is not disturbed by the client's
    event loop); `script(n, body, inflight) -> Plan` decides each request (n counts from 0; inflight: connections
    open now, this one included). `log()` returns what it saw."""

    def __init__(self, script):
        self.script = script
        ctx = multiprocessing.get_context("fork")
        self._q = ctx.Queue()
        self._proc = ctx.Process(target=self._serve, daemon=True)
        self._proc.start()
        self.url = f"http://127.0.0.1:{self._q.get(timeout=10)}"
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.max_inflight = 0

    def log(self) -> FakeServer:
        while True:
            try:
                headers, body, inflight = self._q.get(timeout=0.05)
            except queue.Empty:
                return self
            self.headers.append(headers)
            self.bodies.append(body)
            self.max_inflight = max(self.max_inflight, inflight)

    def close(self):
        self._proc.kill()
        self._proc.join(5)

    def _serve(self):
        self.count = self.inflight = 0

        async def go():
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self._q.put(server.sockets[0].getsockname()[1])
            await asyncio.Event().wait()

        asyncio.run(go())

    async def _handle(self, reader, writer):
        t0 = time.perf_counter()  # delays count from the connection, as the client's clock does
        self.inflight += 1
        try:
            request_line = await reader.readline()
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            body = json.loads(await reader.readexactly(int(headers["content-length"])))
            n = self.count
            self.count += 1
            self._q.put((headers, body, self.inflight))
            plan = self.script(n, body, self.inflight)
            chat = request_line.split()[1] == b"/v1/chat/completions"
            if plan.status != 200:
                msg = json.dumps(plan.error_body or {"error": "boom"}).encode()
                writer.write(b"HTTP/1.1 %d Internal Server Error\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (plan.status, len(msg), msg))
                await writer.drain()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                         b"Connection: close\r\n\r\n")

            async def send(obj):
                data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()

            t1 = t0 + plan.first_s
            for i in range(plan.tokens):
                await asyncio.sleep(max(0.0, t1 + i * plan.inter_s - time.perf_counter()))
                if i == 0:  # later tokens count from the first one's actual send, so a late first token
                    t1 = time.perf_counter()  # (a loaded machine) does not shorten the gaps after it
                text = f" t{i}" * plan.chunk_words
                choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
                await send({"id": "x", "choices": [choice]})
            if plan.usage:
                n_prompt = plan.prompt_tokens if plan.prompt_tokens is not None else _prompt_tokens(body)
                await send({"id": "x", "choices": [], "usage": {"prompt_tokens": n_prompt,
                                                                "completion_tokens": plan.tokens,
                                                                "total_tokens": n_prompt + plan.tokens}})
            await send("[DONE]")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            self.inflight -= 1
            writer.close()


@pytest.fixture
def fake_server():
    servers = []

    def make(script=lambda n, body, inflight: Plan()):
        s = FakeServer(script)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def _args(url, **kw):
    base = dict(base_url=url, model="fake", dataset="random", num_prompts=8, random_input_len=16,
                random_output_len=10, request_rate=math.inf, progress=False, no_plots=True)
    return {**base, **kw}


def _close(x, want, rel=0.05):
    return abs(x - want) <= rel * want


def test_timings_match_injected_delays(fake_server, tmp_path):
    # long enough delays that a loaded 2-core machine's scheduling jitter (~10 ms) stays well inside 5%
    first, inter = 500.0, 50.0
    srv = fake_server(lambda n, body, inflight: Plan(first_s=first / 1e3, inter_s=inter / 1e3, tokens=10))
    out = tmp_path / "res.json"
    m = run_benchmark(_args(srv.url, max_concurrency=4, out=str(out), percentiles="50,90,99"))
    assert m["completed"] == 8 and m["failed"] == 0, m["errors"]
    assert m["total_output_tokens"] == 80 and m["total_input_tokens"] == 8 * 16
    # injected: first token 500 ms after the connection, then one token every 50 ms (10 tokens)
    assert _close(m["mean_ttft_ms"], first), m["mean_ttft_ms"]
    assert _close(m["median_ttft_ms"], first) and _close(m["p99_ttft_ms"], first), m["p99_ttft_ms"]
    assert _close(m["mean_tpot_ms"], inter) and _close(m["p99_tpot_ms"], inter), m["mean_tpot_ms"]
    assert _close(m["mean_itl_ms"], inter) and _close(m["median_itl_ms"], inter), m["mean_itl_ms"]
    e2el = first + 9 * inter
    assert _close(m["mean_e2el_ms"], e2el) and _close(m["p99_e2el_ms"], e2el), m["mean_e2el_ms"]
    assert {"p50_tpot_ms", "p90_itl_ms", "p99_e2el_ms", "std_ttft_ms"} <= set(m)
    assert m["request_goodput"] is None
    assert math.isclose(m["request_throughput"], 8 / m["duration"])
    assert math.isclose(m["output_throughput"], 80 / m["duration"])
    assert math.isclose(m["total_token_throughput"], (80 + 128) / m["duration"])
    srv.log()
    assert srv.max_inflight == 4  # --max-concurrency held (8 requests sent at once)
    # the request asked for usage and streaming; the JSON and CSV were written with the reproduction fields
    assert srv.bodies[0]["stream"] is True and srv.bodies[0]["stream_options"] == {"include_usage": True}
    assert srv.bodies[0]["max_tokens"] == 10 and isinstance(srv.bodies[0]["prompt"], str)
    saved = json.loads(out.read_text())
    assert saved["seed"] == 0 and saved["max_concurrency"] == 4 and saved["request_rate"] == "inf"
    assert saved["args"]["request_rate"] == "inf" and saved["args"]["max_concurrency"] == 4
    assert saved["dataset"]["name"] == "random" and saved["model_id"] == "fake" and saved["base_url"] == srv.url
    rows = list(csv.DictReader(out.with_suffix(".requests.csv").open()))
    assert len(rows) == 8 and all(r["success"] == "True" and r["output_tokens"] == "10" for r in rows)


def test_failed_requests_are_counted_and_excluded(fake_server):
    srv = fake_server(lambda n, body, inflight: Plan(status=500) if n % 3 == 2 else Plan(first_s=0.01, inter_s=0.002))
    m = run_benchmark(_args(srv.url, num_prompts=9))
    assert m["completed"] == 6 and m["failed"] == 3
    assert m["total_output_tokens"] == 60 and m["total_input_tokens"] == 6 * 16
    assert sum("HTTP 500" in e for e in m["errors"]) == 3
    assert math.isclose(m["request_throughput"], 6 / m["duration"])


def test_chat_endpoint_without_usage_counts_chunks_and_sends_api_key(fake_server, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sekrit")
    srv = fake_server(lambda n, body, inflight: Plan(first_s=0.01, inter_s=0.002, tokens=5, usage=False))
    m = run_benchmark(_args(srv.url, num_prompts=3, endpoint="chat", api_key_env="MY_KEY", ignore_eos=True))
    assert m["completed"] == 3 and m["total_output_tokens"] == 15
    srv.log()
    assert srv.headers[0]["authorization"] == "Bearer sekrit"
    assert srv.bodies[0]["messages"][0]["role"] == "user" and srv.bodies[0]["ignore_eos"] is True
    assert m["endpoint"] == "/v1/chat/completions"


def test_goodput_counts_exactly_the_requests_under_the_slos(fake_server):
    def script(n, body, inflight):
        if n % 3 == 0:
            return Plan(first_s=0.25, inter_s=0.005)  # TTFT misses 150 ms
        if n % 3 == 1:
            return Plan(first_s=0.02, inter_s=0.045)  # TPOT misses 30 ms
        return Plan(first_s=0.02, inter_s=0.005)  # good

    srv = fake_server(script)
    m = run_benchmark(_args(srv.url, num_prompts=9, goodput=["ttft:150", "tpot:30"]))
    assert m["completed"] == 9 and m["good_requests"] == 3
    assert math.isclose(m["request_goodput"], 3 / m["duration"])
    srv2 = fake_server(script)
    assert run_benchmark(_args(srv2.url, num_prompts=9, goodput=["ttft:150"]))["good_requests"] == 6
    srv3 = fake_server(script)
    assert run_benchmark(_args(srv3.url, num_prompts=9, goodput=["e2el:200"]))["good_requests"] == 3


def test_parse_goodput():
    assert parse_goodput(["ttft:200", "tpot:50"]) == {"ttft": 200.0, "tpot": 50.0}
    assert parse_goodput(["e2el:1000 ttft:5"]) == {"e2el": 1000.0, "ttft": 5.0}
    with pytest.raises(ValueError):
        parse_goodput(["itl:5"])


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_arrival_rate_and_gamma_shape(burstiness):
    rate = 20.0
    times = arrival.send_times(5000, rate, burstiness, seed=1)
    gaps = arrival.inter_arrivals(times)
    mean = statistics.fmean(gaps)
    assert abs(mean - 1 / rate) <= 0.03 / rate
    cv = statistics.pstdev(gaps) / mean
    assert abs(cv - 1 / math.sqrt(burstiness)) <= 0.05 / math.sqrt(burstiness), cv
    assert times == arrival.send_times(5000, rate, burstiness, seed=1)
    assert math.isclose(times[-1], 5000 / rate)


def test_arrival_infinite_rate_and_ramp_up():
    assert arrival.send_times(5, math.inf) == [0.0] * 5
    times = arrival.send_times(4000, ramp_up="linear", ramp_start_rps=5, ramp_end_rps=50, seed=0)
    gaps = arrival.inter_arrivals(times)
    first, last = statistics.fmean(gaps[:400]), statistics.fmean(gaps[-400:])
    assert abs(1 / first - 5 * 1.05) < 1.5 and abs(1 / last - 50 * 0.995) < 5  # rates over the first/last 10%
    assert arrival.ramp_rate(0, 3, "exponential", 1, 100) == 1 and math.isclose(
        arrival.ramp_rate(1, 3, "exponential", 1, 100), 10)


def test_random_dataset_range_ratio():
    fixed = datasets.random_dataset(50, 100, 20, 0.0, seed=0)
    assert {s.prompt_len for s in fixed} == {100} and {s.output_len for s in fixed} == {20}
    assert all(len(s.prompt.split()) == 100 for s in fixed)
    specs = datasets.random_dataset(4000, 100, 20, 0.5, seed=0)
    ins = [s.prompt_len for s in specs]
    outs = [s.output_len for s in specs]
    assert min(ins) == 50 and max(ins) == 150 and abs(statistics.fmean(ins) - 100) < 2
    assert min(outs) == 10 and max(outs) == 30
    assert datasets.range_bounds(10, 0.25) == (7, 13)  # floor(7.5), ceil(12.5)
    ids = datasets.random_dataset(5, 33, 4, 0.0, seed=3, token_ids=True, vocab_size=1000)
    assert all(len(s.prompt) == 33 and all(100 <= t < 1000 for t in s.prompt) for s in ids)
    with pytest.raises(ValueError):
        datasets.random_dataset(1, 10, 10, 1.0)


def test_sharegpt_filters(tmp_path):
    long = "word " * 2000
    data = [
        {"conversations": [{"from": "human", "value": "tell me a long story please"},
                           {"from": "gpt", "value": "once upon a time there was a test"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there my friend"}]},
        {"conversations": [{"from": "human", "value": "a good question here"}, {"from": "gpt", "value": "ok"}]},
        {"conversations": [{"from": "human", "value": long}, {"from": "gpt", "value": "fine answer here"}]},
        {"conversations": [{"from": "human", "value": "only one turn in this one"}]},
    ]
    p = tmp_path / "sg.json"
    p.write_text(json.dumps(data))
    specs = datasets.sharegpt_dataset(p, 10)
    assert [s.prompt for s in specs] == ["tell me a long story please"]
    assert specs[0].output_len == datasets.approx_token_count("once upon a time there was a test")
    fixed = datasets.sharegpt_dataset(p, 10, fixed_output_len=8)
    assert sorted(s.prompt for s in fixed) == ["a good question here", "tell me a long story please"]


def test_trace_replayed_on_time(fake_server, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": 1000 + 150 * i, "input_len": 5 + i, "output_len": 3})
                               for i in range(4)) + "\n")
    srv = fake_server(lambda n, body, inflight: Plan(first_s=0.005, inter_s=0.001, tokens=3))
    out = tmp_path / "trace.json"
    m = run_benchmark(_args(srv.url, dataset="trace", dataset_path=str(trace), trace_timestamp_unit="ms",
                            num_prompts=None, out=str(out)))
    assert m["completed"] == 4 and m["input_lens"] == [5, 6, 7, 8]
    starts = [float(r["start_s"]) for r in csv.DictReader(out.with_suffix(".requests.csv").open())]
    assert all(abs(s - 0.15 * i) < 0.03 for i, s in enumerate(starts)), starts


def test_cli_bench_serve(fake_server, tmp_path, capsys):
    srv = fake_server(lambda n, body, inflight: Plan(first_s=0.005, inter_s=0.001, tokens=4))
    out = tmp_path / "cli.json"
    rc = main(["bench", "serve", "--base-url", srv.url, "--model", "fake", "--num-prompts", "6",
               "--random-input-len", "8", "--random-output-len", "4", "--request-rate", "200", "--burstiness", "2",
               "--max-concurrency", "3", "--seed", "7", "--goodput", "ttft:1000", "--percentiles", "50,99.9",
               "--out", str(out), "--no-plots"])
    assert rc == 0
    saved = json.loads(out.read_text())
    assert saved["completed"] == 6 and saved["request_rate"] == 200 and saved["burstiness"] == 2
    assert saved["good_requests"] == 6 and "p99.9_ttft_ms" in saved and "p50_itl_ms" in saved
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_plots_when_matplotlib_is_importable(fake_server, tmp_path):
    pytest.importorskip("matplotlib")
    srv = fake_server(lambda n, body, inflight: Plan(first_s=0.005, inter_s=0.001, tokens=4))
    out = tmp_path / "p.json"
    run_benchmark(_args(srv.url, num_prompts=6, request_rate=100, out=str(out), no_plots=False))
    assert out.with_suffix(".latency.png").stat().st_size > 0
    assert out.with_suffix(".throughput.png").stat().st_size > 0


def test_cli_ramp_up_and_bad_args(fake_server, tmp_path, capsys):
    srv = fake_server(lambda n, body, inflight: Plan(first_s=0.002, inter_s=0.001, tokens=2))
    out = tmp_path / "ramp.json"
    assert main(["bench", "serve", "--base-url", srv.url, "--model", "m", "--num-prompts", "5", "--random-input-len",
                 "4", "--random-output-len", "2", "--ramp-up", "linear", "--ramp-up-start-rps", "50",
                 "--ramp-up-end-rps", "200", "--out", str(out), "--no-plots", "--no-progress"]) == 0
    saved = json.loads(out.read_text())
    assert saved["ramp_up_strategy"] == "linear" and saved["ramp_up_end_rps"] == 200 and saved["completed"] == 5
    assert main(["bench", "serve", "--base-url", srv.url, "--model", "m", "--dataset", "sharegpt"]) == 2
    assert main(["bench", "serve", "--base-url", srv.url, "--model", "m", "--max-concurrency", "0"]) == 2
    assert main(["bench", "serve", "--base-url", srv.url, "--model", "m", "--random-input-len", "0"]) == 2
    err = capsys.readouterr().err
    assert "--dataset sharegpt needs --dataset-path" in err and "--max-concurrency must be >= 1" in err
    assert "--random-input-len must be >= 1" in err
    # a ramp-up run says what it ramped, not "RPS: inf"
    capsys.readouterr()
    run_benchmark(_args(srv.url, num_prompts=3, ramp_up="linear", ramp_up_start_rps=50, ramp_up_end_rps=200))
    rate_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Request rate"))
    assert rate_row.split(":", 1)[1].strip() == "ramp linear 50 -> 200"


def test_failed_requests_say_why(fake_server, capsys):
    """Wrong model (the server's 404 message), a server that is down: the summary lists the distinct reasons."""

    def wrong_model(n, body, inflight):
        return Plan(status=404, error_body={"error": {"message": f"The model {body['model']!r} does not exist",
                                                       "type": "invalid_request_error"}}) if n % 2 else Plan(
            first_s=0.002, inter_s=0.001, tokens=2)

    srv = fake_server(wrong_model)
    m = run_benchmark(_args(srv.url, model="nope", num_prompts=6))
    out = capsys.readouterr().out
    assert (m["completed"], m["failed"]) == (3, 3)
    assert m["failure_reasons"] == [{"reason": "HTTP 404: The model 'nope' does not exist", "requests": 3}]
    assert "Why requests failed:\n  3 x HTTP 404: The model 'nope' does not exist" in out

    srv.close()  # nothing listens there any more
    assert main(["bench", "serve", "--base-url", srv.url, "--model", "m", "--num-prompts", "2", "--random-input-len",
                 "4", "--random-output-len", "2", "--no-progress"]) == 1
    captured = capsys.readouterr()
    why = captured.out.split("Why requests failed:\n", 1)[1].splitlines()
    assert len(why) == 1 and why[0].startswith("  2 x ConnectionRefusedError")
    assert "WARNING: no --tokenizer, and could not fetch the tokenizer" in captured.err

    from cluster.loadtest.client import RequestRecord
    from cluster.loadtest.runner import failure_reasons

    many = [RequestRecord(i, 4, 4, error=f"HTTP 500: failure {i % 5}") for i in range(10)]
    assert failure_reasons(many) == [(f"HTTP 500: failure {i}", 2) for i in range(5)]


def test_prompt_lengths_far_from_the_servers_count_are_flagged(fake_server, capsys):
    """Without a tokenizer (a server that is not megaserve), prompts of random words are taken as one token per word;
    when the server counts 3x that, the run says so loudly and keeps the server's counts."""
    srv = fake_server(lambda n, body, inflight: Plan(first_s=0.002, inter_s=0.001, tokens=2,
                                                     prompt_tokens=3 * _prompt_tokens(body)))
    m = run_benchmark(_args(srv.url, num_prompts=3, random_input_len=40))
    err = capsys.readouterr().err
    assert "WARNING: no --tokenizer, and could not fetch the tokenizer from" in err
    assert "WARNING: the server counted 120 prompt tokens per request on average, for 40 asked (3.00x)" in err
    assert len(m["warnings"]) == 2 and m["input_lens"] == [120] * 3 and m["tokenizer_id"] is None
    assert m["dataset"]["prompt"].startswith("random words, counted as one token each without a tokenizer")
    srv2 = fake_server(lambda n, body, inflight: Plan(first_s=0.002, inter_s=0.001, tokens=2))
    assert len(run_benchmark(_args(srv2.url, num_prompts=2, random_input_len=40))["warnings"]) == 1


def test_sharegpt_says_what_it_dropped(fake_server, tmp_path, capsys):
    data = [{"conversations": [{"from": "human", "value": "tell me a long story please"},
                               {"from": "gpt", "value": "once upon a time there was a test"}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there my friend"}]},
            {"conversations": [{"from": "human", "value": "only one turn in this one"}]}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    specs, drops = datasets.sharegpt_dataset_with_drops(path, 10)
    assert len(specs) == 1 and drops == {"no human+gpt turns": 1, "prompt < 4 tokens": 1, "output < 4 tokens": 0,
                                         "prompt > 1024 tokens": 0, "prompt + output > 2048 tokens": 0}
    srv = fake_server(lambda n, body, inflight: Plan(first_s=0.002, inter_s=0.001, tokens=2))
    m = run_benchmark(_args(srv.url, dataset="sharegpt", dataset_path=str(path), num_prompts=5))
    assert m["completed"] == 1
    note = f"WARNING: only 1 of the 5 prompts asked for: ShareGPT {path}: 1 prompts; dropped by vLLM's filters: " \
           "1 no human+gpt turns, 1 prompt < 4 tokens"
    assert note in m["warnings"] and note in capsys.readouterr().err
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="a ShareGPT file is a JSON list of conversations, got a dict"):
        datasets.sharegpt_dataset(path, 1)


def test_sharegpt_counts_with_a_tokenizer_file(tmp_path):
    from argparse import Namespace

    from tokenizers import Tokenizer, models, pre_tokenizers

    from cluster.loadtest.runner import DEFAULTS, load_specs

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    conv = {"conversations": [{"from": "human", "value": "w " * 30}, {"from": "gpt", "value": "x " * 12}]}
    (tmp_path / "sg.json").write_text(json.dumps([conv]))
    a = Namespace(**{**DEFAULTS, "dataset": "sharegpt", "dataset_path": str(tmp_path / "sg.json"),
                     "tokenizer": str(tmp_path / "tokenizer.json"), "num_prompts": 5})
    specs = load_specs(a)
    assert [(s.prompt_len, s.output_len) for s in specs] == [(30, 12)]


def test_run_json_records_every_argument(fake_server, tmp_path):
    srv = fake_server(lambda n, body, inflight: Plan(first_s=0.002, inter_s=0.001, tokens=2))
    out = tmp_path / "a.json"
    run_benchmark(_args(srv.url, num_prompts=2, request_rate=50, burstiness=3, random_token_ids=True,
                        vocab_size=500, out=str(out)))
    saved = json.loads(out.read_text())
    args = saved["args"]
    assert args["request_rate"] == 50 and args["burstiness"] == 3 and args["seed"] == 0
    assert args["random_input_len"] == 16 and args["vocab_size"] == 500 and args["base_url"] == srv.url
    assert saved["dataset"]["prompt"] == "token ids in [100, 500)"
    assert saved["versions"]["python"]


# ---- live progress -----------------------------------------------------------------------------------------------
class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_line_counts_and_current_throughput():
    import io

    from cluster.loadtest.client import RequestRecord
    from cluster.loadtest.progress import Progress

    clock, stream = _Clock(), io.StringIO()
    prog = Progress(4, stream=stream, window_s=2.0, clock=clock)
    for _ in range(3):
        prog.on_start()
    for t in (100.5, 101.0, 101.5, 102.0):  # 4 chunks in the first 2 s
        prog.on_chunk(t)
    clock.t = 102.0
    assert math.isclose(prog.throughput_now(102.0), 4 / 2.0) and math.isclose(prog.throughput_avg(102.0), 4 / 2.0)
    # a finished request reports 8 tokens over its 4 chunks: 2 tokens per chunk from now on
    prog.on_done(RequestRecord(0, 5, 8, success=True, output_tokens=8, chunk_times=[0.5, 1.0, 1.5, 2.0]))
    prog.on_done(RequestRecord(1, 5, 8, error="HTTP 500"))
    for t in (103.0, 103.5):
        prog.on_chunk(t)
    clock.t = 104.0
    # window (102, 104]: chunks at 102.0 (edge), 103.0, 103.5 -> 3 chunks * 2 tok / 2 s
    assert math.isclose(prog.throughput_now(104.0), 3 * 2 / 2.0)
    assert math.isclose(prog.throughput_avg(104.0), 6 * 2 / 4.0)
    line = prog.line()
    assert "2/4: 1 completed, 1 failed, 1 in flight" in line and "3.0 tok/s now" in line and "3.0 avg" in line
    assert "|############............|" in line
    prog.render()
    prog.finish()
    assert stream.getvalue().count("\n") == 2  # not a terminal: whole lines, one per render
    quiet = Progress(1, enabled=False, stream=stream)
    quiet.finish()
    assert stream.getvalue().count("\n") == 2


def test_progress_is_written_during_a_run(fake_server, capsys):
    srv = fake_server(lambda n, body, inflight: Plan(status=500) if n == 0 else Plan(first_s=0.005, inter_s=0.002,
                                                                                      tokens=3))
    run_benchmark(_args(srv.url, num_prompts=4, progress=True))
    err = capsys.readouterr().err.strip().splitlines()
    assert "4/4: 3 completed, 1 failed, 0 in flight" in err[-1] and "tok/s now" in err[-1]


# ---- sweep -------------------------------------------------------------------------------------------------------
def _slow_past_three(n, body, inflight):
    """Latency that grows with load: TTFT 40-60 ms with up to 3 requests in flight, 600 ms beyond."""
    return Plan(first_s=0.03 + 0.01 * inflight if inflight <= 3 else 0.6, inter_s=0.02, tokens=4)


def test_sweep_finds_the_highest_rate_meeting_the_slos(fake_server, tmp_path, capsys):
    from cluster.loadtest.sweep import run_sweep

    # near-periodic arrivals (burstiness 100: gap CV 0.1). A request lasts ~0.1-0.12 s while fast, so at 4 and 8
    # req/s (gaps 250 / 125 ms) at most 2 overlap: every TTFT <= 60 ms. At 40 req/s (25 ms gaps) the 4th request
    # already finds 3 others in flight and waits 600 ms, and the pile-up keeps every later one slow.
    srv = fake_server(_slow_past_three)
    out = tmp_path / "sweep.json"
    sweep = run_sweep(_args(srv.url, num_prompts=12, random_output_len=4, burstiness=100.0, rates="40,4,8,80",
                            goodput=["ttft:250"], out=str(out)))
    assert sweep["rates"] == [4.0, 8.0, 40.0, 80.0]
    assert [p["rate"] for p in sweep["points"]] == [4.0, 8.0, 40.0]  # stopped at the first miss
    assert [p["meets_slos"] for p in sweep["points"]] == [True, True, False]
    assert sweep["points"][0]["slo_attainment"] == 1.0 and sweep["points"][2]["slo_attainment"] <= 0.5
    assert sweep["best_rate"] == 8.0
    assert sweep["points"][1]["request_rate"] == 8.0 and sweep["points"][1]["completed"] == 12
    assert "ttfts" not in sweep["points"][0] and "p99_ttft_ms" in sweep["points"][0]
    saved = json.loads(out.read_text())
    assert saved["best_rate"] == 8.0 and len(saved["points"]) == 3 and saved["goodput_slos_ms"] == {"ttft": 250}
    text = capsys.readouterr().out
    assert "highest rate meeting the SLOs: 8 req/s" in text and "not run (a lower rate already missed" in text


def test_best_rate_attainment_and_rates():
    from cluster.loadtest.sweep import best_rate, parse_rates, slo_attainment

    pts = [{"rate": 1.0, "meets_slos": True}, {"rate": 4.0, "meets_slos": False}, {"rate": 2.0, "meets_slos": True},
           {"rate": 8.0, "meets_slos": True}]  # 8 passing above a failing 4 does not count
    assert best_rate(pts) == 2.0
    assert best_rate([{"rate": 1.0, "meets_slos": False}]) is None
    assert slo_attainment({"completed": 8, "failed": 2, "good_requests": 8}) == 0.8  # failures count against it
    assert slo_attainment({"completed": 0, "failed": 0}) == 0.0
    assert parse_rates("8, 1,2,inf") == [1.0, 2.0, 8.0, math.inf]
    for bad in ("", "1,x", "0,1", "1,1", "-2"):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_cli_bench_sweep(fake_server, tmp_path, capsys):
    srv = fake_server(lambda n, body, inflight: Plan(first_s=0.005, inter_s=0.001, tokens=3))
    out = tmp_path / "sw.json"
    base = ["bench", "sweep", "--base-url", srv.url, "--model", "fake", "--num-prompts", "4", "--random-input-len",
            "4", "--random-output-len", "3", "--rates", "100,50,200", "--no-progress", "--out", str(out)]
    assert main(base + ["--goodput", "ttft:2000", "tpot:1000", "--slo-attainment", "1"]) == 0
    saved = json.loads(out.read_text())
    assert saved["best_rate"] == 200 and [p["rate"] for p in saved["points"]] == [50, 100, 200]
    assert saved["slo_attainment"] == 1 and all(p["good_requests"] == 4 for p in saved["points"])
    # an SLO nobody meets: exit 1, stops after the first rate, or runs them all with --keep-going
    assert main(base + ["--goodput", "ttft:0.001"]) == 1
    assert json.loads(out.read_text())["best_rate"] is None and len(json.loads(out.read_text())["points"]) == 1
    assert main(base + ["--goodput", "ttft:0.001", "--keep-going"]) == 1
    assert len(json.loads(out.read_text())["points"]) == 3
    assert main(base + ["--goodput", "ttft:10", "--slo-attainment", "1.5"]) == 2
    assert "--slo-attainment must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --goodput is required
        main(base)


# ---- offline -----------------------------------------------------------------------------------------------------
def test_cli_bench_offline(tiny_ckpt, tmp_path, capsys):
    import torch

    from cluster.loadtest.offline import OfflineWorkload, make_prompts

    out = tmp_path / "off.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared
    try:
        assert main(["bench", "offline", "--model", str(tiny_ckpt), "--num-prompts", "3", "--prompt-len", "8",
                     "--new-tokens", "3", "--repeats", "2", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(out.read_text())
    s = saved["summary"]
    assert len(saved["runs"]) == 2 and s["num_requests"] == 3
    assert s["total_output_tokens"] == 9 and s["total_num_tokens"] == 3 * 8 + 9
    for r in saved["runs"]:
        assert math.isclose(r["output_tokens_per_second"], 9 / r["elapsed_time"])
        assert math.isclose(r["tokens_per_second"], 33 / r["elapsed_time"])
    assert s["elapsed_time"] == statistics.median(r["elapsed_time"] for r in saved["runs"])
    assert saved["workload"]["new_tokens"] == 3 and saved["engine"]["max_num_seqs"] == 3
    assert "Offline Benchmark Result" in capsys.readouterr().out
    # the prompts are bench/offline.py's: torch.randint(2, vocab) under manual_seed(seed)
    g = torch.Generator().manual_seed(5)
    want = torch.randint(2, 1000, (2, 6), generator=g).tolist()
    assert make_prompts(1000, OfflineWorkload(2, 6, 1, seed=5)) == want
    assert main(["bench", "offline", "--model", str(tiny_ckpt), "--new-tokens", "0"]) == 2
    assert "new_tokens must be positive" in capsys.readouterr().err


def test_token_counts_follow_vllm(fake_server, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    # input tokens: the server's usage.prompt_tokens when it reports them (chat templates add tokens)
    srv = fake_server(lambda n, body, inflight: Plan(first_s=0.002, inter_s=0.001, tokens=3, prompt_tokens=21))
    m = run_benchmark(_args(srv.url, num_prompts=3, endpoint="chat"))
    assert m["total_input_tokens"] == 3 * 21 and m["input_lens"] == [21] * 3
    # output tokens without usage: the tokenizer's count of the generated text (--tokenizer), else the chunks
    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # prompts "[UNK] [UNK] ..." re-encode to their length
    tok.save(str(tmp_path / "tokenizer.json"))
    srv2 = fake_server(lambda n, body, inflight: Plan(first_s=0.01, inter_s=0.02, tokens=4, usage=False,
                                                      chunk_words=3))
    m = run_benchmark(_args(srv2.url, num_prompts=2, tokenizer=str(tmp_path / "tokenizer.json")))
    assert m["total_output_tokens"] == 2 * 4 * 3 and m["total_input_tokens"] == 2 * 16
    assert _close(m["mean_tpot_ms"], 60 / 11, rel=0.2)  # (E2EL - TTFT) / (12 - 1): 3 gaps of 20 ms over 11
    assert "tokenizer" in m["token_counting"]["output"] and m["tokenizer_id"].endswith("tokenizer.json")
    srv3 = fake_server(lambda n, body, inflight: Plan(first_s=0.002, inter_s=0.001, tokens=4, usage=False,
                                                      chunk_words=3))
    assert run_benchmark(_args(srv3.url, num_prompts=2))["total_output_tokens"] == 2 * 4


def test_peaks_count_from_the_first_request():
    from cluster.loadtest.client import RequestRecord
    from cluster.loadtest.metrics import compute_metrics

    def rec(i, start, chunks, tokens=None):
        return RequestRecord(i, 4, 4, start=start, ttft=chunks[0] - start, e2el=chunks[-1] - start,
                             output_tokens=tokens or len(chunks), chunk_times=chunks, success=True)

    # buckets from 0.6 s (the first start): [0.6, 1.6) holds all 4 chunks of the first request; counted from 0
    # they would split 2 + 2. The third request doubles its chunks' weight (8 usage tokens over 4 chunks).
    records = [rec(0, 0.6, [0.65, 0.9, 1.5, 1.55]), rec(1, 1.7, [1.8, 1.9]), rec(2, 0.65, [0.7, 1.15]),
               RequestRecord(3, 4, 4, start=0.0, error="HTTP 500")]
    m = compute_metrics(records, 2.0)
    assert m["max_output_tokens_per_s"] == 6 and m["max_concurrent_requests"] == 2
    records[2] = rec(2, 1.65, [1.7, 1.75, 1.8, 1.85], tokens=8)
    assert compute_metrics(records, 2.0)["max_output_tokens_per_s"] == 10  # bucket [1.6, 2.6): 2 + 8


def test_random_prompts_hit_the_length_with_the_servers_tokenizer(tiny_ckpt, tmp_path):
    from argparse import Namespace

    from cluster.loadtest.runner import DEFAULTS, load_specs, load_tokenizer

    tok = load_tokenizer(tiny_ckpt)  # a checkpoint directory works; so does its tokenizer.json
    specs = datasets.random_dataset(30, 64, 4, 0.5, seed=2, tokenizer=tok)
    lens = [s.prompt_len for s in specs]
    assert min(lens) >= 32 and max(lens) <= 96 and len(set(lens)) > 5
    for s in specs:
        ids = tok.encode(s.prompt, add_special_tokens=False).ids
        assert len(ids) == s.prompt_len and not set(ids) & set(tok.get_added_tokens_decoder())
    assert specs == datasets.random_dataset(30, 64, 4, 0.5, seed=2, tokenizer=tok)
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"timestamp": 0, "input_length": 40, "output_length": 2}) + "\n")
    a = Namespace(**{**DEFAULTS, "dataset": "trace", "dataset_path": str(trace),
                     "tokenizer": str(tiny_ckpt / "tokenizer.json")})
    [spec] = load_specs(a)
    assert spec.prompt_len == 40 == len(tok.encode(spec.prompt, add_special_tokens=False).ids)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
