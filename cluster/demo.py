"""The demo (`make demo`): what megaserve can do today, end to end on this machine's CPU.

1. Writes a random `tiny` DeepSeek-V4 checkpoint in the official layout (FP8/FP4 + scales) and a tokenizer.
2. Loads it into the offline API (`engine.LLM`: continuous batching over the paged hybrid cache) and
   generates text for a batch of prompts sharing a system prompt (prefix-cache hits), greedy and sampled;
   then the prefix cache's disk tier: a new engine on the same folder (a restart) loads the prompt's pages.
3. Runs the MTP block (the speculative-decoding head) on a result.
4. Expert parallelism without Ray: the same prompts on 4 ranks (gloo), experts sharded, EPLB rebalancing
   at run time; the greedy tokens equal the single-rank run's.
5. The local cluster: `megaserve up examples/local.yaml` (embedded Ray, 2 nodes x 2 ranks), `megaserve
   status`, a batch job through the Python client with a progress bar, a short load test with
   `megaserve bench serve`, then `megaserve down`.
6. The capacity planner on the V4-Pro Blackwell topology, and the V4-Pro manifest and KV cache next to the
   published figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.cache.accounting import sequence_cache_bytes
from engine.cache.disk_config import DiskCacheConfig
from engine.kernels.cpu import moe_mlp_available
from engine.model.config import get_preset
from engine.model.moe import RoutedExperts
from engine.weights.make_checkpoint import write_checkpoint
from engine.weights.manifest import build_manifest
from engine.weights.resident import model_resident_bytes, uniform_rank_bytes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In expert parallelism, every rank holds a slice of the experts and",
    "Once upon a time",
]


def _disk_restart(ckpt: Path, llm: LLM, prompt: list[int], want: list[int]) -> None:
    """[2b] The disk tier under the prefix cache: `llm` wrote its requests' pages; a new engine on the same folder
    (a restart: its memory cache is empty) loads them instead of recomputing, and gives the same greedy tokens."""
    written = llm.engine.disk.summary()
    t0 = time.perf_counter()
    again = LLM(ckpt, page_tokens=128, max_num_seqs=4, disk_cache=llm.engine.config.disk_cache)
    got = again.generate([prompt], SamplingParams(temperature=0, max_tokens=len(want), ignore_eos=True))[0].token_ids
    hit = again.engine.disk.last_hit
    print(f"[2b] disk tier (kv_cache.disk, swa full): {written['pages_written']} pages written to "
          f"{llm.engine.config.disk_cache.path} ({written['bytes_on_disk'] / 1e3:.0f} kB, "
          f"{written['bytes_written'] / max(written['tokens_written'], 1):.0f} B/token); after a restart "
          f"{hit.get('cached_tokens', 0)} of {len(prompt)} prompt tokens came from disk, greedy tokens "
          f"{'equal' if got == want else 'DIFFER from'} the first engine's ({time.perf_counter() - t0:.2f}s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="out/demo", help="where the demo writes its checkpoint")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--load-prompts", type=int, default=32, help="requests in the load test against the cluster")
    args = ap.parse_args(argv)
    in_the_way = running_cluster(EXAMPLES / "local.yaml")
    if in_the_way is not None:
        print(f"megaserve demo: {in_the_way}", file=sys.stderr)
        return 1

    cfg = get_preset("tiny")
    ckpt = Path(args.dir) / "tiny"
    t0 = time.perf_counter()
    write_checkpoint(cfg, ckpt, seed=0)
    print(f"[1] wrote a random tiny V4 checkpoint to {ckpt} in {time.perf_counter() - t0:.2f}s "
          f"({sum(f.stat().st_size for f in ckpt.glob('*.safetensors')) / 1e6:.2f} MB, "
          f"{len(build_manifest(cfg).tensors)} tensors)")

    t0 = time.perf_counter()
    shutil.rmtree(Path(args.dir) / "kv", ignore_errors=True)
    llm = LLM(ckpt, page_tokens=128, max_num_seqs=16, disk_cache=DiskCacheConfig(str(Path(args.dir) / "kv"),
                                                                               capacity_gb=1.0, swa="full"))
    model = llm.engine.model
    print(f"[2] validated and loaded it in {time.perf_counter() - t0:.2f}s; layers "
          f"{list(cfg.compress_ratios[:cfg.num_hidden_layers])} (0 = SWA, 4 = CSA, 128 = HCA), "
          f"{cfg.num_hash_layers} hash-routed; cache: {llm.engine.cache.num_pages} pages of 128 tokens")
    native = model_resident_bytes(model)
    print(f"    weights held native (FP8 linears, MXFP4 experts): {native / 1e6:.2f} MB resident, vs "
          f"{uniform_rank_bytes(cfg, 'dequantized', torch.float32, cfg.n_routed_experts).total / 1e6:.2f} MB "
          f"dequantized to float32 (engine/weights/resident.py)")
    system = "You are a helpful assistant. Answer briefly and precisely. " * 6  # shared by every request
    prompts = [system + p for p in PROMPTS]
    t0 = time.perf_counter()
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_new_tokens, ignore_eos=True))
    sampled = llm.generate(prompts, [SamplingParams(temperature=0.8, top_p=0.95, seed=7 + i,
                                                    max_tokens=args.max_new_tokens, ignore_eos=True)
                                     for i in range(len(prompts))])
    dt = time.perf_counter() - t0
    for p, g, s_ in zip(PROMPTS, greedy, sampled):
        print(f"    {p!r}\n      greedy  -> {g.text!r}\n      sampled -> {s_.text!r}")
    n_new = sum(len(o.token_ids) for o in greedy + sampled)
    stats = llm.engine.stats()
    print(f"    {n_new} tokens for {2 * len(prompts)} requests in {dt:.2f}s ({n_new / dt:.0f} tok/s; random weights, "
          f"so the text is noise); prefix cache: {stats['prefix_hit_tokens']} of {stats['prefix_query_tokens']} "
          f"prompt tokens reused ({stats['prefix_hit_rate']:.0%})")
    print("    routed experts ran " + (f"the C kernel (engine/kernels/cpu, compiled here at first use) for experts "
                                      f"with under {RoutedExperts.KERNEL_MAX_ROWS} rows, MKL above"
                                      if moe_mlp_available() else "on torch only (no C compiler, or "
                                      "MEGASERVE_CPU_KERNELS=0)"))
    outs = [g.token_ids for g in greedy]
    prompts = [g.prompt_token_ids for g in greedy]
    _disk_restart(ckpt, llm, prompts[0], outs[0][:8])

    # MTP: from h_t and token t+1, guess token t+2; count how often it equals what greedy decoding produced.
    with torch.inference_mode():
        seq = torch.tensor(prompts[0] + outs[0])
        st = model.new_state()
        h = model(seq[:-1], [st], [len(seq) - 1])
        _, mtp_logits = model.mtp_forward(h, seq[1:], [st], [len(seq) - 1])
    n_prompt = len(prompts[0])
    guess = mtp_logits.argmax(-1)[n_prompt - 2: len(seq) - 2]  # guesses for positions n_prompt .. end
    agree = (guess == seq[n_prompt:]).float().mean().item()
    print(f"[3] MTP head: guessed token t+2 at {len(guess)} generated positions; "
          f"{agree:.0%} equal the greedy tokens (the draft acceptance speculative decoding would see)")

    # Expert parallelism without Ray: 4 rank processes (gloo), each with its own scheduler and cache (DP
    # attention) and a quarter of the routed experts (EP), the wave (MegaMoE) dispatch/combine, EPLB.
    from engine.core.engine import EngineConfig
    from engine.core.ep.engine import PlacementConfig
    from engine.core.ep.group import run_engine_group

    ranks, placement = 4, PlacementConfig(policy="eplb", redundant_experts=4, rebalance_interval_steps=8)
    slots = cfg.n_routed_experts + placement.redundant_experts
    t0 = time.perf_counter()
    res = run_engine_group(ckpt, ranks, prompts, SamplingParams(temperature=0, max_tokens=args.max_new_tokens,
                                                                 ignore_eos=True),
                           backend="wave", engine_config=EngineConfig(page_tokens=128, max_num_seqs=16),
                           placement_config=placement)
    same = sum(o.token_ids == g for o, g in zip(res.outputs, outs))
    st0 = res.stats[0]
    print(f"[4] expert parallelism: {len(prompts)} requests over {ranks} ranks (gloo), {cfg.n_routed_experts} experts "
          f"+ {placement.redundant_experts} redundant in {slots} slots ({slots // ranks} per rank), wave "
          f"dispatch/combine, EPLB every {placement.rebalance_interval_steps} steps: "
          f"{st0['rebalances']} rebalances, balancedness {st0['balancedness'] or 0:.2f}; "
          f"{same}/{len(prompts)} greedy outputs equal the single-rank run ({time.perf_counter() - t0:.1f}s)")

    _cluster_demo(EXAMPLES / "local.yaml", args.load_prompts)

    plan = _megaserve("plan", str(EXAMPLES / "v4-pro-blackwell.yaml"))
    print("[7] megaserve plan examples/v4-pro-blackwell.yaml (the capacity planner, on paper):")
    print("    " + plan.stdout.rstrip().replace("\n", "\n    "))

    m = build_manifest(get_preset("v4-pro"))
    print(f"[8] v4-pro manifest: {len(m.tensors):,} tensors, {m.bytes:,} bytes, "
          f"{m.params_total / 1e9:.1f}B params ({m.params_active / 1e9:.1f}B active)")
    print("    published:       145,116 tensors, 864,704,792,696 bytes, 1,598.8B params (49.8B active)")
    kv = sequence_cache_bytes(get_preset("v4-pro"), 1 << 20).kv / 2**30
    print(f"    KV cache per 1M-token sequence in bf16: {kv:.3f} GiB (vLLM publishes ~9.62 GiB)")
    return 0


def running_cluster(topology: Path) -> str | None:
    """Why the demo must not run now: an `up` of `topology` is serving (the demo rewrites that topology's
    checkpoint and brings up the same topology itself), or None."""
    from cluster.service import pid_alive, read_state
    from cluster.topology import load_topology

    topo = load_topology(topology)
    st = read_state(topo.server.state_dir)
    if st is None or not pid_alive(int(st.get("pid", 0))):
        return None
    rel = os.path.relpath(topology)
    return (f"`megaserve up {rel}` is running (pid {st['pid']}, {st.get('http') or 'starting'}); the demo rewrites "
            f"the checkpoint it serves ({topo.model.path}) and brings up the same topology. Stop it first: "
            f"megaserve down {rel}")


def _megaserve(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the `megaserve` CLI exactly as a user would (same interpreter)."""
    r = subprocess.run([sys.executable, "-m", "cluster.cli", *argv], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"megaserve {' '.join(argv)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def _cluster_demo(topology: Path, load_prompts: int) -> None:
    from cluster.batch.demo import run_batch_demo
    from cluster.loadtest.runner import run_benchmark
    from cluster.topology import load_topology
    from comm.launch import free_port

    port = free_port()
    t0 = time.perf_counter()
    _megaserve("up", str(topology), "--detach", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
            model = json.load(r)["data"][0]["id"]
        topo = load_topology(topology)
        print(f"[5] megaserve up {topology.name}: {topo.world_size} ranks on {len(topo.nodes)} Ray nodes ready in "
              f"{time.perf_counter() - t0:.1f}s, "
              f"serving {model!r} at {url}")
        status = _megaserve("status", str(topology)).stdout.rstrip()
        print("    " + status.replace("\n", "\n    "))
        _chat_demo(url, model)
        print("    batch job through the Python client (cluster.Client):")
        run_batch_demo(url, requests=24, max_tokens=8, show=3)
        print(f"[6] load test: megaserve bench serve --base-url {url} --model {model} --num-prompts {load_prompts} "
              "--request-rate 8 --random-input-len 48 --random-output-len 12 --ignore-eos")
        run_benchmark({"base_url": url, "model": model, "dataset": "random", "num_prompts": load_prompts,
                       "random_input_len": 48, "random_output_len": 12, "request_rate": 8.0, "ignore_eos": True,
                       "seed": 0, "percentiles": "50,99", "progress": sys.stderr.isatty(), "out": None})
    finally:
        down = _megaserve("down", str(topology), check=False)
        left = _leftover_processes()
        print(f"    megaserve down: exit {down.returncode}; processes left behind: {left or 'none'}")


def _chat_demo(url: str, model: str) -> None:
    """One chat request with thinking on: the answer comes back as reasoning_content and content (random
    weights: the reasoning rarely ends, so content is usually empty)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 12,
            "temperature": 0, "chat_template_kwargs": {"thinking": True}}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        msg = json.load(r)["choices"][0]["message"]
    print(f"    chat, thinking on (DeepSeek-V4 encoding): reasoning_content={msg.get('reasoning_content')!r} "
          f"content={msg.get('content')!r}")


def _leftover_processes() -> list[str]:
    """Ray or rank processes still alive (their command lines), children of nobody we know."""
    import psutil

    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] != os.getpid() and any(k in cmd for k in ("raylet", "gcs_server", "ray::",
                                                                     "default_worker.py")):
            left.append(cmd[:80])
    return left


if __name__ == "__main__":
    raise SystemExit(main())
