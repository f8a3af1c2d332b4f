"""`run_benchmark(args) -> dict`: dataset -> send times -> concurrent streaming requests -> metrics -> files.

Writes the result JSON (`--out`, metrics with vLLM's keys plus everything needed to reproduce the run), a
per-request CSV next to it, PNG plots when matplotlib is importable, prints a summary table, and keeps a live
progress line (completed / failed / output tok/s) on stderr.
"""

from __future__ import annotations

import asyncio
import bisect
import csv
import json
import math
import platform
import sys
import time
from argparse import Namespace
from datetime import datetime, timezone
from pathlib import Path

from cluster.loadtest import arrival, datasets
from cluster.loadtest.client import ClientConfig, RequestRecord, api_key_from_env, send_request
from cluster.loadtest.metrics import compute_metrics, input_tokens, parse_goodput, parse_percentiles, request_tpot
from cluster.loadtest.progress import Progress

DEFAULTS = dict(endpoint="completions", dataset="random", dataset_path=None, num_prompts=1000,
                random_input_len=1024, random_output_len=128, random_range_ratio=0.0, random_token_ids=False,
                vocab_size=32000, sharegpt_output_len=None, trace_timestamp_unit="s", request_rate=math.inf,
                burstiness=1.0, max_concurrency=None, ramp_up=None, ramp_up_start_rps=None, ramp_up_end_rps=None,
                ignore_eos=False, temperature=0.0, seed=0, goodput=None, percentiles="99", api_key_env=None,
                tokenizer=None, out=None, no_plots=False, progress=True, timeout_s=6 * 3600.0)


def load_specs(a: Namespace, tok=None, notes: list[str] | None = None) -> list[datasets.RequestSpec]:
    """The dataset's requests. `tok`: the server's tokenizer (`resolve_tokenizer`); default: --tokenizer if given.
    What the user should know about the dataset (dropped ShareGPT prompts) is appended to `notes`."""
    if tok is None and a.tokenizer:
        tok = load_tokenizer(a.tokenizer)
    if a.dataset == "random":
        return datasets.random_dataset(a.num_prompts, a.random_input_len, a.random_output_len, a.random_range_ratio,
                                       seed=a.seed, token_ids=a.random_token_ids, vocab_size=a.vocab_size,
                                       tokenizer=tok)
    if not a.dataset_path:
        raise ValueError(f"--dataset {a.dataset} needs --dataset-path")
    if a.dataset == "sharegpt":
        specs, drops = datasets.sharegpt_dataset_with_drops(a.dataset_path, a.num_prompts, seed=a.seed,
                                                            fixed_output_len=a.sharegpt_output_len,
                                                            count_tokens=token_counter(tok))
        dropped = ", ".join(f"{n} {rule}" for rule, n in drops.items() if n)
        note = (f"ShareGPT {a.dataset_path}: {len(specs)} prompts" + (f"; dropped by vLLM's filters: {dropped}"
                                                                      if dropped else ""))
        if len(specs) < a.num_prompts:
            note = f"WARNING: only {len(specs)} of the {a.num_prompts} prompts asked for: " + note
        if notes is not None:
            notes.append(note)
        return specs
    if a.dataset == "trace":
        return datasets.trace_dataset(a.dataset_path, a.num_prompts, seed=a.seed,
                                      timestamp_unit=a.trace_timestamp_unit, token_ids=a.random_token_ids,
                                      vocab_size=a.vocab_size, tokenizer=tok)
    raise ValueError(f"unknown dataset {a.dataset!r}")


def load_tokenizer(path: str | Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json, or from a directory holding one (a checkpoint)."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(f"--tokenizer {path}: no tokenizer.json there")
    return Tokenizer.from_file(str(p))


def server_tokenizer(base_url: str, model: str, api_key: str | None, timeout_s: float = 10.0):
    """(tokenizer, None) from a megaserve server (GET /v1/models/{model}/tokenizer), else (None, why not)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from tokenizers import Tokenizer

    root = base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def get(path: str) -> bytes:
        req = urllib.request.Request(root + path, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.read()

    try:
        listed = json.loads(get("/v1/models")).get("data") or []
        entry = next((m for m in listed if isinstance(m, dict) and m.get("id") == model), None)
        if entry is None:
            return None, f"{root}/v1/models does not list {model!r}"
        if entry.get("owned_by") != "megaserve":
            return None, f"the server at {root} is not megaserve (its tokenizer cannot be fetched)"
        return Tokenizer.from_str(get(f"/v1/models/{urllib.parse.quote(model, safe='')}/tokenizer").decode()), None
    except (OSError, ValueError, AttributeError) as e:
        return None, f"could not fetch the tokenizer from {root} ({type(e).__name__}: {e})"


def resolve_tokenizer(a: Namespace, api_key: str | None) -> tuple[object | None, str | None, str | None]:
    """(tokenizer, where it came from, a warning): --tokenizer, else the served model's own when the server is
    megaserve and answers, else none and a warning that text prompt lengths are only estimates."""
    if a.tokenizer:
        return load_tokenizer(a.tokenizer), str(a.tokenizer), None
    if a.dataset != "sharegpt" and a.random_token_ids:
        return None, None, None  # token-id prompts: exact lengths without one
    tok, why = server_tokenizer(a.base_url, a.model, api_key)
    if tok is not None:
        return tok, f"{a.base_url.rstrip('/')}/v1/models/{a.model}/tokenizer (the served model's)", None
    counted = "approximate tokens (4 characters each)" if a.dataset == "sharegpt" else "one token per random word"
    return None, None, (f"WARNING: no --tokenizer, and {why}: prompt lengths are counted as {counted}, which can be "
                        f"several times off; pass --tokenizer (the server's tokenizer.json or checkpoint directory)")


def token_counter(tok):
    """Token counting for text: `tok` (a tokenizers.Tokenizer), else ceil(chars/4)."""
    if tok is None:
        return datasets.approx_token_count
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def _prompt_kind(a: Namespace, tokenizer_id: str | None) -> str:
    if a.random_token_ids:
        return f"token ids in [100, {a.vocab_size})"
    if tokenizer_id:
        return "random non-special token ids decoded to text, re-encoding to the input length (vLLM)"
    return "random words, counted as one token each without a tokenizer (not exact: see warnings)"


def _dataset_semantics(a: Namespace, tokenizer_id: str | None) -> dict:
    if a.dataset == "random":
        return {"name": "random", "input_len": a.random_input_len, "output_len": a.random_output_len,
                "range_ratio": a.random_range_ratio,
                "range_ratio_semantics": "vLLM: uniform integers in [floor(L*(1-r)), ceil(L*(1+r))]",
                "prompt": _prompt_kind(a, tokenizer_id)}
    if a.dataset == "sharegpt":
        return {"name": "sharegpt", "path": str(a.dataset_path), "fixed_output_len": a.sharegpt_output_len,
                "filters": "vLLM: drop prompt<4, output<4 (unless fixed), prompt>1024, prompt+output>2048",
                "token_counting": f"tokenizer {tokenizer_id}" if tokenizer_id else "approx: ceil(chars/4)"}
    return {"name": "trace", "path": str(a.dataset_path), "timestamp_unit": a.trace_timestamp_unit,
            "prompt": _prompt_kind(a, tokenizer_id)}


async def _run(specs: list[datasets.RequestSpec], times: list[float], cfg: ClientConfig,
               max_concurrency: int | None, progress: bool) -> tuple[list[RequestRecord], float]:
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    t0 = time.perf_counter()
    prog = Progress(len(specs), enabled=progress)
    ticker = asyncio.create_task(prog.run()) if progress else None

    async def send(i: int) -> RequestRecord:
        prog.on_start()
        rec = await send_request(cfg, specs[i], i, t0, on_chunk=prog.on_chunk)
        prog.on_done(rec)
        return rec

    async def one(i: int) -> RequestRecord:
        delay = times[i] - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        if sem is None:
            return await send(i)
        async with sem:
            return await send(i)

    try:
        records = await asyncio.gather(*(one(i) for i in range(len(specs))))
    finally:
        if ticker is not None:
            ticker.cancel()
    duration = time.perf_counter() - t0
    prog.finish()
    return list(records), duration


def run_benchmark(args: Namespace | dict) -> dict:
    """Run the load test described by `args` (CLI namespace or dict; missing fields take DEFAULTS)."""
    a = Namespace(**{**DEFAULTS, **(vars(args) if isinstance(args, Namespace) else args)})
    percentiles = parse_percentiles(str(a.percentiles))
    slos = parse_goodput(a.goodput if not isinstance(a.goodput, str) else [a.goodput])
    if a.max_concurrency is not None and a.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {a.max_concurrency}")
    if a.endpoint not in ENDPOINT_PATHS:
        raise ValueError(f"unknown endpoint {a.endpoint!r} (completions or chat)")
    api_key = api_key_from_env(a.api_key_env)
    tok, tokenizer_id, tokenizer_warning = resolve_tokenizer(a, api_key)
    warnings = [tokenizer_warning] if tokenizer_warning else []
    specs = load_specs(a, tok, warnings)
    for w in warnings:
        print(w, file=sys.stderr)
    if not specs:
        raise ValueError("the dataset produced no requests")
    if a.dataset == "trace":
        times = [s.send_time or 0.0 for s in specs]
    else:
        times = arrival.send_times(len(specs), float(a.request_rate), a.burstiness, seed=a.seed, ramp_up=a.ramp_up,
                                   ramp_start_rps=a.ramp_up_start_rps, ramp_end_rps=a.ramp_up_end_rps)
    cfg = ClientConfig(base_url=a.base_url, model=a.model, endpoint=a.endpoint, api_key=api_key,
                       ignore_eos=a.ignore_eos, temperature=a.temperature, timeout_s=a.timeout_s)
    started = datetime.now(timezone.utc).isoformat()
    records, duration = asyncio.run(_run(specs, times, cfg, a.max_concurrency, a.progress))
    if tok is not None:  # vLLM: without usage, count the generated text's tokens (else: one token per chunk)
        count = token_counter(tok)
        for r in records:
            if r.success and not r.output_tokens_from_usage:
                r.output_tokens = count(r.generated_text)
    if tokenizer_id is None and (off := prompt_length_warning(records)) is not None:
        warnings.append(off)
        print(off, file=sys.stderr)
    result = compute_metrics(records, duration, percentiles, slos or None)
    rate = float(a.request_rate)
    result.update({
        "date": started,
        "backend": "openai-chat" if a.endpoint == "chat" else "openai",
        "base_url": a.base_url,
        "endpoint": ENDPOINT_PATHS[a.endpoint],
        "model_id": a.model,
        "num_prompts": len(specs),
        "request_rate": "inf" if math.isinf(rate) else rate,
        "burstiness": a.burstiness,
        "max_concurrency": a.max_concurrency,
        "ramp_up_strategy": a.ramp_up,
        "ramp_up_start_rps": a.ramp_up_start_rps,
        "ramp_up_end_rps": a.ramp_up_end_rps,
        "arrival": "trace timestamps" if a.dataset == "trace" else
                   "gamma(shape=burstiness, scale=1/(rate*burstiness)), rescaled to span N/rate",
        "seed": a.seed,
        "ignore_eos": a.ignore_eos,
        "tokenizer_id": tokenizer_id,
        "token_counting": {"input": "usage.prompt_tokens, else the dataset's prompt length",
                           "output": "usage.completion_tokens, else "
                                     + ("the tokenizer's count of the generated text" if tok is not None
                                        else "one token per streamed chunk")},
        "temperature": a.temperature,
        "dataset": _dataset_semantics(a, tokenizer_id),
        "percentiles": percentiles,
        "goodput_slos_ms": slos or None,
        "api_key_env": a.api_key_env,
        "versions": _versions(),
        "args": {k: (str(v) if isinstance(v, float) and math.isinf(v) else v) for k, v in sorted(vars(a).items())
                 if k != "func"},
        "input_lens": [input_tokens(r) for r in records],
        "output_lens": [r.output_tokens if r.success else 0 for r in records],
        "ttfts": [r.ttft if r.success else 0.0 for r in records],
        "latencies": [r.e2el if r.success else 0.0 for r in records],
        "itls": [r.itl for r in records],
        "errors": [r.error for r in records],
        "failure_reasons": [{"reason": reason, "requests": n} for reason, n in failure_reasons(records)],
        "warnings": warnings,
    })
    print_summary(result, percentiles)
    if a.out:
        write_outputs(result, records, Path(a.out), plots=not a.no_plots)
    return result


ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
FAILURE_REASONS_SHOWN = 3
# server-counted vs asked prompt tokens: a warning beyond this ratio (either way) and this many tokens (templates add
# a few: bos, role markers)
PROMPT_LENGTH_TOLERANCE = 1.25
PROMPT_LENGTH_SLACK_TOKENS = 16


def failure_reasons(records: list[RequestRecord]) -> list[tuple[str, int]]:
    """Distinct errors of the failed requests with how many requests had each, in order of first occurrence."""
    counts: dict[str, int] = {}
    for r in records:
        if not r.success:
            counts[r.error or "unknown error"] = counts.get(r.error or "unknown error", 0) + 1
    return list(counts.items())


def prompt_length_warning(records: list[RequestRecord]) -> str | None:
    """A warning when the server's usage.prompt_tokens are far from the lengths the dataset meant (prompts made
    without the server's tokenizer), else None."""
    pairs = [(r.prompt_tokens_server, r.prompt_len) for r in records
             if r.success and r.prompt_tokens_server is not None and r.prompt_len > 0]
    if not pairs:
        return None
    served, asked = sum(p for p, _ in pairs) / len(pairs), sum(q for _, q in pairs) / len(pairs)
    ratio = served / asked
    if 1 / PROMPT_LENGTH_TOLERANCE <= ratio <= PROMPT_LENGTH_TOLERANCE or abs(served - asked) <= \
            PROMPT_LENGTH_SLACK_TOKENS:
        return None
    return (f"WARNING: the server counted {served:.0f} prompt tokens per request on average, for {asked:.0f} asked "
            f"({ratio:.2f}x): the lengths in this result are the server's; pass --tokenizer for prompts of the "
            f"asked length")


def _versions() -> dict:
    from importlib import metadata

    v = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("megaserve",):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = None
    return v


def print_summary(m: dict, percentiles: list[float], file=None) -> None:
    file = file or sys.stdout
    w = 50
    rate = m.get("request_rate", "inf")
    if m.get("ramp_up_strategy"):
        configured = (f"ramp {m['ramp_up_strategy']} {m['ramp_up_start_rps']:g} -> {m['ramp_up_end_rps']:g}")
    else:
        configured = rate if rate == "inf" else f"{float(rate):.2f}"
    rows = [("Successful requests:", m["completed"]), ("Failed requests:", m["failed"]),
            ("Request rate configured (RPS):", configured),
            ("Maximum request concurrency:", m.get("max_concurrency") or "none"),
            ("Benchmark duration (s):", f"{m['duration']:.2f}"),
            ("Total input tokens:", m["total_input_tokens"]), ("Total generated tokens:", m["total_output_tokens"]),
            ("Request throughput (req/s):", f"{m['request_throughput']:.2f}")]
    if m.get("request_goodput") is not None:
        rows.append(("Request goodput (req/s):", f"{m['request_goodput']:.2f}"))
    rows += [("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"),
             ("Peak output token throughput (tok/s):", f"{m['max_output_tokens_per_s']:.2f}"),
             ("Peak concurrent requests:", m["max_concurrent_requests"]),
             ("Total token throughput (tok/s):", f"{m['total_token_throughput']:.2f}")]
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="=")]
    lines += [f"{k:<40}{v:<10}" for k, v in rows]
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    from cluster.loadtest.metrics import percentile_key

    for name, title in titles.items():
        lines.append("{s:{c}^{n}}".format(s=f" {title} ", n=w, c="-"))
        lines.append(f"{f'Mean {name.upper()} (ms):':<40}{m[f'mean_{name}_ms']:<10.2f}")
        lines.append(f"{f'Median {name.upper()} (ms):':<40}{m[f'median_{name}_ms']:<10.2f}")
        for p in percentiles:
            k = percentile_key(p)
            lines.append(f"{f'P{k} {name.upper()} (ms):':<40}{m[f'p{k}_{name}_ms']:<10.2f}")
    lines.append("=" * w)
    reasons = m.get("failure_reasons") or []
    if reasons:
        more = f" (first {FAILURE_REASONS_SHOWN} of {len(reasons)} distinct)" if len(reasons) > FAILURE_REASONS_SHOWN \
            else ""
        lines.append(f"Why requests failed{more}:")
        lines += [f"  {r['requests']} x {r['reason']}" for r in reasons[:FAILURE_REASONS_SHOWN]]
    print("\n".join(lines), file=file)


CSV_FIELDS = ("index", "start_s", "success", "prompt_len", "output_len_requested", "output_tokens",
              "output_tokens_from_usage", "prompt_tokens_server", "ttft_ms", "tpot_ms", "e2el_ms", "num_chunks",
              "mean_itl_ms", "error")


def write_outputs(result: dict, records: list[RequestRecord], out: Path, plots: bool = True) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    csv_path = out.with_suffix(".requests.csv")
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in records:
            tpot = request_tpot(r) if r.success else None
            w.writerow([r.index, f"{r.start:.6f}", r.success, r.prompt_len, r.output_len_requested, r.output_tokens,
                        r.output_tokens_from_usage, r.prompt_tokens_server,
                        f"{r.ttft * 1e3:.3f}" if r.success else "", f"{tpot * 1e3:.3f}" if tpot is not None else "",
                        f"{r.e2el * 1e3:.3f}" if r.success else "", len(r.chunk_times),
                        f"{1e3 * sum(r.itl) / len(r.itl):.3f}" if r.itl else "", r.error])
    print(f"wrote {out} and {csv_path}")
    if plots:
        write_plots(records, out)


def write_plots(records: list[RequestRecord], out: Path) -> list[Path]:
    """TTFT and TPOT histograms, output throughput and in-flight requests over time (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    ok = [r for r in records if r.success]
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].hist([r.ttft * 1e3 for r in ok], bins=50)
    axes[0].set(title="TTFT", xlabel="ms", ylabel="requests")
    axes[1].hist([t * 1e3 for r in ok if (t := request_tpot(r)) is not None], bins=50)
    axes[1].set(title="TPOT", xlabel="ms", ylabel="requests")
    paths.append(_save(plt, fig, out.with_suffix(".latency.png")))
    end = max((r.start + r.e2el for r in ok), default=0.0)
    width = 1.0 if end >= 20 else max(end / 20, 0.05)  # 1 s buckets, finer for short runs
    n = int(end / width) + 1
    tok = [0.0] * (n + 1)
    for r in ok:
        for t in r.chunk_times:
            tok[int(t / width)] += r.output_tokens / len(r.chunk_times) / width
    xs = [i * 0.1 for i in range(int(end * 10) + 1)]
    starts = sorted(r.start for r in ok)
    ends = sorted(r.start + r.e2el for r in ok)
    conc = [bisect.bisect_right(starts, x) - bisect.bisect_right(ends, x) for x in xs]  # start <= x < end
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    axes[0].step([i * width for i in range(n + 1)], tok, where="post")
    axes[0].set(title=f"Output throughput ({width:.3g} s buckets)", ylabel="tok/s")
    axes[1].plot(xs, conc)
    axes[1].set(title="Requests in flight", xlabel="s since start", ylabel="requests")
    paths.append(_save(plt, fig, out.with_suffix(".throughput.png")))
    print("wrote " + ", ".join(map(str, paths)))
    return paths


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
