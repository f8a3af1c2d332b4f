"""Time to first token of a request sharing a long prefix: cold, from the memory prefix cache, and from the disk
tier after an engine restart in each window strategy (full / periodic / none); bytes on disk per strategy.

One process, the `tiny` preset on CPU (a random checkpoint is written to a temporary folder unless --model is
given). Request A = prefix + a short suffix, request B = the same prefix + another suffix; B's greedy tokens must
be the same in every case (`identical` in the summary).

    cold       B on a fresh engine without a disk tier (the whole prompt prefilled; its tokens are the reference)
    memory     B again on that engine, after A (the memory prefix cache holds the prefix)
    write_*    A on a fresh engine with the disk tier (cold, plus writing its pages)
    disk_*     B on another fresh engine on the same disk folder (a restart: memory empty, disk warm)

    python bench/prefix_disk.py --out out/prefix_disk.json [--prefix-tokens 32768]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import versions, write_result  # noqa: E402
from engine.cache.disk import SWA_MODES, DiskCacheConfig  # noqa: E402
from engine.core.engine import EngineConfig, LLMEngine  # noqa: E402
from engine.model.config import get_preset  # noqa: E402
from engine.weights.make_checkpoint import write_checkpoint  # noqa: E402
from scheduler.sampling import SamplingParams  # noqa: E402

PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def _note(what: str, seconds: float) -> None:
    print(f"  {what}: {seconds:.2f}s", flush=True)  # a long run shows where it is


def _run(engine: LLMEngine, prompt: list[int]) -> tuple[float, list[int]]:
    """(seconds to the first token, the greedy tokens) of one request run alone."""
    t0 = time.perf_counter()
    rid = engine.add_request(prompt, PARAMS)
    ttft, out = None, []
    while engine.has_unfinished():
        for ro in engine.step():
            if ro.req_id == rid and ro.new_token_ids:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                out += ro.new_token_ids
    assert ttft is not None
    return ttft, out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", help="checkpoint folder (default: a random `tiny` checkpoint in a temporary folder)")
    ap.add_argument("--prefix-tokens", type=int, default=32768)
    ap.add_argument("--suffix-tokens", type=int, default=32)
    ap.add_argument("--page-tokens", type=int, default=256)
    ap.add_argument("--period-tokens", type=int, default=4096, help="periodic: a state every N tokens")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--modes", default=",".join(SWA_MODES))
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in SWA_MODES]
    if bad:
        ap.error(f"--modes: {bad} not in {SWA_MODES}")

    work = Path(tempfile.mkdtemp(prefix="prefix_disk_"))
    try:
        model_dir = args.model
        if model_dir is None:
            model_dir = work / "tiny"
            write_checkpoint(get_preset("tiny"), model_dir, seed=0)
        rng = random.Random(0)
        prefix = [rng.randrange(2, 500) for _ in range(args.prefix_tokens)]
        prompt_a = prefix + [rng.randrange(2, 500) for _ in range(args.suffix_tokens)]
        prompt_b = prefix + [rng.randrange(2, 500) for _ in range(args.suffix_tokens)]
        pages = -(-(len(prompt_b) + PARAMS.max_tokens) // args.page_tokens) * 2 + 8

        warmup = [rng.randrange(2, 500) for _ in range(16)]  # shorter than a page: nothing cached or written

        def engine(disk: DiskCacheConfig | None) -> LLMEngine:
            eng = LLMEngine(model_dir, EngineConfig(page_tokens=args.page_tokens, num_pages=pages, max_num_seqs=4,
                                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                                    disk_cache=disk))
            _run(eng, warmup)  # first-call costs stay out of the timings
            return eng

        t_start = time.perf_counter()
        ttft: dict[str, float] = {}
        outputs: dict[str, list[int]] = {}
        disk_info: dict[str, dict] = {}
        eng = engine(None)
        ttft["cold"], want = _run(eng, prompt_b)  # the reference tokens
        eng.add_request(prompt_a, PARAMS)  # another request with the prefix, then B again: a memory hit
        while eng.has_unfinished():
            eng.step()
        ttft["memory"], outputs["memory"] = _run(eng, prompt_b)
        _note("ttft cold", ttft["cold"])
        _note("ttft memory", ttft["memory"])
        del eng
        for mode in modes:
            cfg = DiskCacheConfig(str(work / f"kv-{mode}"), capacity_gb=64.0, swa=mode,
                                  period_tokens=args.period_tokens)
            writer = engine(cfg)
            ttft[f"write_{mode}"], _ = _run(writer, prompt_a)
            written = writer.disk.summary()
            del writer
            reader = engine(cfg)  # the restart
            ttft[f"disk_{mode}"], outputs[f"disk_{mode}"] = _run(reader, prompt_b)
            disk_info[mode] = {"written": written, "hit": reader.disk.last_hit, "read": reader.disk.summary()}
            _note(f"ttft cold + writing ({mode})", ttft[f"write_{mode}"])
            _note(f"ttft from disk ({mode})", ttft[f"disk_{mode}"])
            del reader
        identical = all(out == want for out in outputs.values())
        summary = {
            "prefix_tokens": args.prefix_tokens,
            "page_tokens": args.page_tokens,
            "ttft_s": {k: round(v, 3) for k, v in ttft.items()},
            "bytes_on_disk": {m: disk_info[m]["written"]["bytes_on_disk"] for m in modes},
            "bytes_per_token": {m: round(disk_info[m]["written"]["bytes_written"]
                                         / max(disk_info[m]["written"]["tokens_written"], 1), 1) for m in modes},
            "recomputed_tokens_per_hit": {m: disk_info[m]["hit"].get("recomputed_tokens") for m in modes},
            "identical": identical,
            "wall_s": round(time.perf_counter() - t_start, 1),
        }
        result = {"summary": summary, "disk": disk_info, "outputs": {**outputs, "cold": want},
                  "config": vars(args), "versions": versions(with_transformers=False)}
        write_result(args.out, result)
        if not identical:
            raise SystemExit(f"outputs differ from the cold run: {outputs} vs {want}")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
