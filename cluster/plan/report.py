"""The plan as a table for people (`format_plan`); `Plan.to_dict()` is the --json form."""

from __future__ import annotations

from cluster.plan.model_spec import KINDS
from cluster.plan.planner import Plan


def _ranks(r: tuple[int, ...]) -> str:
    return f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}"


def format_plan(plan: Plan) -> str:
    out: list[str] = []
    add = out.append
    unit = "GB" if plan.weight_bytes_model >= 1e10 else "MB"  # a tiny CPU model reads 0.00 in GB

    def _gb(n: float) -> str:
        return f"{n / 1e9:,.2f}" if unit == "GB" else f"{n / 1e6:,.1f}"

    add(f"model {plan.model_name}: {_gb(plan.weight_bytes_model)} {unit} of weights; EP size {plan.world_size}; "
        f"ranks hold them {plan.ranks[0][2].weights_mode} (`weights` column: engine/weights/resident.py)")
    add("")
    add(f"Memory per rank ({unit})")
    memory = "HBM" if all(m.accelerator != "cpu" for _, _, m in plan.ranks) else "memory"
    header = f"{'ranks':>7} {'node':<12} {'device':<6} {memory:>7} {'replic.':>8} {'experts':>8} {'slots':>6} " \
             f"{'redund.':>8} {'weights':>8} {'activ.':>7} {'KV':>8} {'KV tokens':>11} {'seqs@ctx':>9}"
    add(header)
    add("-" * len(header))
    for ranks, node, m in plan.ranks:
        add(f"{_ranks(ranks):>7} {node[:12]:<12} {m.accelerator:<6} {_gb(m.hbm_bytes):>7} {_gb(m.replicated_bytes):>8} "
            f"{_gb(m.routed_total):>8} {m.expert_slots:>6} {_gb(m.redundant_bytes):>8} {_gb(m.weight_bytes):>8} "
            f"{_gb(m.activation_bytes):>7} {_gb(m.kv_budget_bytes):>8} {m.kv_tokens_capacity:>11,} "
            f"{m.seqs_at_context:>9,}")
    first = plan.ranks[0][2]
    add("")
    add(f"Replicated weights per rank, by kind and dtype ({unit}) — ranks {_ranks(plan.ranks[0][0])}")
    kinds = [k for k in KINDS if k in first.replicated]
    for k in kinds:
        parts = ", ".join(f"{dt} {_gb(b)}" for dt, b in sorted(first.replicated[k].items(), key=lambda x: -x[1]))
        add(f"  {k:<14} {_gb(sum(first.replicated[k].values())):>8}   ({parts})")
    routed = ", ".join(f"{dt} {_gb(b)}" for dt, b in sorted(first.routed_bytes.items(), key=lambda x: -x[1]))
    add(f"  {'routed_experts':<14} {_gb(first.routed_total):>8}   ({routed}; {first.expert_slots} slots per MoE "
        f"layer, {first.redundant_slots:g} redundant on average)")
    add(f"  KV at {first.context_len:,} tokens: {first.seq_bytes_at_context / 1e6:,.1f} MB per sequence")
    p = plan.perf
    add("")
    if p is None:
        add(f"Performance: not modelled ({plan.no_perf_reason})")
    else:
        lay = p.layout
        add(f"Performance model ({lay['accelerator']}, EP {lay['world']}, NVLink domain {lay['nvl_domain']}, "
            f"backend {lay['ep_backend']}, placement {lay['policy']}) at isl {p.isl}, osl {p.osl}, "
            f"concurrency {p.concurrency}")
        rpn = lay["ranks_per_node"]
        rows = [
            ("prefill", f"{p.prefill_tok_s_gpu:,.0f}", f"{p.prefill_tok_s_gpu * rpn:,.0f}",
             f"{p.prefill_tokens_per_step:,} tokens/rank/step", p.prefill_step),
            ("decode", f"{p.decode_tok_s_gpu:,.0f}", f"{p.decode_tok_s_gpu * rpn:,.0f}",
             f"{p.batch_per_rank:g} seqs/rank at {p.decode_context:,} ctx", p.decode_step),
        ]
        add(f"  {'phase':<8} {'tok/s/GPU':>10} {'tok/s/node':>11} {'step ms':>8} {'compute':>8} {'comm':>7} "
            f"{'exposed':>8}  batch")
        for name, gpu, node, batch, st in rows:
            add(f"  {name:<8} {gpu:>10} {node:>11} {st['time_s'] * 1e3:>8.1f} {st['compute_s'] * 1e3:>8.1f} "
                f"{st['comm_s'] * 1e3:>7.1f} {st['exposed_comm_s'] * 1e3:>8.1f}  {batch}")
        add(f"  TTFT {p.ttft_s * 1e3:,.0f} ms, TPOT {p.tpot_s * 1e3:,.1f} ms ({1 / p.tpot_s:,.1f} tok/s per user); "
            f"colocated output {p.output_tok_s_gpu:,.0f} tok/s/GPU = {p.output_tok_s_node:,.0f} tok/s/node")
        add(f"  colocated, EP group in lockstep: {p.stall_fraction:.0%} of steps carry a prefill; a user sees "
            f"{p.user_tpot_s * 1e3:,.1f} ms per token ({1 / p.user_tpot_s:,.1f} tok/s), a request lives "
            f"{p.cycle_s:,.1f} s")
        comp = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(p.decode_step["by_component_s"].items(),
                                                                  key=lambda kv: -kv[1]))
        add(f"  decode step by component (ms): {comp}")
        for name, st in (("prefill", p.prefill_step), ("decode", p.decode_step)):
            mb = {k: st[k] / 1e6 for k in ("a2a_dispatch_bytes", "a2a_combine_bytes", "a2a_bytes_intra",
                                           "a2a_bytes_inter")}
            add(f"  all-to-all per {name} step per rank: dispatch (FP8) {mb['a2a_dispatch_bytes']:,.1f} MB + "
                f"combine (BF16) {mb['a2a_combine_bytes']:,.1f} MB; NVLink {mb['a2a_bytes_intra']:,.1f} MB, "
                f"scale-out {mb['a2a_bytes_inter']:,.1f} MB")
        add("  one decode layer of each kind: GFLOP (FP8 + BF16) / MB read / ms")
        for kind, comps in p.decode_step["per_layer"].items():
            parts = []
            for name, c in comps.items():
                if name == "all_to_all":
                    a2a_mb = (c["dispatch_bytes"] + c["combine_bytes"]) / 1e6
                    parts.append(f"a2a {a2a_mb:.1f} MB {c['time_s'] * 1e3:.2f}")
                else:
                    parts.append(f"{name} {(c['fp8_flops'] + c['bf16_flops']) / 1e9:.1f}/{c['bytes'] / 1e6:.0f}/"
                                 f"{c['time_s'] * 1e3:.2f}")
            add(f"    {kind:<10} " + ", ".join(parts))
    for n in plan.notes:
        add(f"note: {n}")
    if plan.problems:
        add("")
        add("Does not fit / changed:")
        for pr in plan.problems:
            add(f"  - {pr}")
    else:
        add("")
        add("Everything fits.")
    return "\n".join(out)
