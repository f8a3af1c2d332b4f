"""The demo (`make demo`): what megaserve can do today, end to end on this machine's CPU.

1. Writes a random `tiny` DeepSeek-V4 checkpoint in the official layout (FP8/FP4 + scales) and a tokenizer.
2. Loads it into the offline API (`engine.LLM`: continuous batching over the paged hybrid cache) and
   generates text for a batch of prompts sharing a system prompt (prefix-cache hits), greedy and sampled.
3. Runs the MTP block (the speculative-decoding head) on a result.
4. Prints the V4-Pro manifest and per-sequence KV cache next to the published figures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.cache_accounting import sequence_cache_bytes
from engine.config import get_preset
from engine.make_checkpoint import write_checkpoint
from engine.manifest import build_manifest

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In expert parallelism, every rank holds a slice of the experts and",
    "Once upon a time",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="out/demo", help="where the demo writes its checkpoint")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args(argv)

    cfg = get_preset("tiny")
    ckpt = Path(args.dir) / "tiny"
    t0 = time.perf_counter()
    write_checkpoint(cfg, ckpt, seed=0)
    print(f"[1] wrote a random tiny V4 checkpoint to {ckpt} in {time.perf_counter() - t0:.2f}s "
          f"({sum(f.stat().st_size for f in ckpt.glob('*.safetensors')) / 1e6:.2f} MB, "
          f"{len(build_manifest(cfg).tensors)} tensors)")

    t0 = time.perf_counter()
    llm = LLM(ckpt, page_tokens=128, max_num_seqs=16)
    model = llm.engine.model
    print(f"[2] validated and loaded it in {time.perf_counter() - t0:.2f}s; layers "
          f"{list(cfg.compress_ratios[:cfg.num_hidden_layers])} (0 = SWA, 4 = CSA, 128 = HCA), "
          f"{cfg.num_hash_layers} hash-routed; cache: {llm.engine.cache.num_pages} pages of 128 tokens")
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
    outs = [g.token_ids for g in greedy]
    prompts = [g.prompt_token_ids for g in greedy]

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

    m = build_manifest(get_preset("v4-pro"))
    print(f"[4] v4-pro manifest: {len(m.tensors):,} tensors, {m.bytes:,} bytes, "
          f"{m.params_total / 1e9:.1f}B params ({m.params_active / 1e9:.1f}B active)")
    print("    published:       145,116 tensors, 864,704,792,696 bytes, 1,598.8B params (49.8B active)")
    kv = sequence_cache_bytes(get_preset("v4-pro"), 1 << 20).kv / 2**30
    print(f"    KV cache per 1M-token sequence in bf16: {kv:.3f} GiB (vLLM publishes ~9.62 GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
