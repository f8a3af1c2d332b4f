"""The demo (`make demo`): what megaserve can do today, end to end on this machine's CPU.

1. Writes a random `tiny` DeepSeek-V4 checkpoint in the official layout (FP8/FP4 + scales) and a tokenizer.
2. Checks it against its manifest, loads it, and generates greedily for a few prompts packed in one batch.
3. Runs the MTP block (the speculative-decoding head) on the result.
4. Prints the V4-Pro manifest next to the published checkpoint figures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from engine.config import get_preset
from engine.generate import greedy_generate
from engine.loader import load_model
from engine.make_checkpoint import write_checkpoint
from engine.manifest import build_manifest
from engine.tokenizer import load_tokenizer

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
    model = load_model(ckpt, dtype=torch.float32)
    tok = load_tokenizer(ckpt)
    print(f"[2] validated and loaded it in {time.perf_counter() - t0:.2f}s; layers "
          f"{list(cfg.compress_ratios[:cfg.num_hidden_layers])} (0 = SWA, 4 = CSA, 128 = HCA), "
          f"{cfg.num_hash_layers} hash-routed")
    prompts = [[cfg.bos_token_id] + tok.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    t0 = time.perf_counter()
    outs = greedy_generate(model, prompts, args.max_new_tokens)
    dt = time.perf_counter() - t0
    n_new = sum(len(o) for o in outs)
    for p, o in zip(PROMPTS, outs):
        print(f"    {p!r}\n      -> {tok.decode(o)!r}")
    print(f"    {n_new} tokens for {len(prompts)} prompts in {dt:.2f}s ({n_new / dt:.0f} tok/s; random weights, "
          "so the text is noise)")

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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
