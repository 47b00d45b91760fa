"""Fused chunkwise prefill vs the per-chunk reference loop (Remark 8).

`model(idx, memory=MemoryKV(...))` reads the memories of every 64-token chunk in one forward (per layer:
one causal SDPA call plus one batched per-chunk memory attention, merged by log-sum-exp);
`prefill_chunk_loop` runs one forward per chunk and carries the context through the KV cache (how the
paper's Python loop read memory). Both must give the same logits (checked with
torch.testing.assert_close, atol 1e-4, before any timing). Random weights and random memory K/V:
5 memories x 8 tokens per head per chunk, batch 1, `small` config with max_seq_len=2048.

    python experiments/bench_prefill.py [--quick] [--out experiments/results/bench_prefill.json]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from tqdm.auto import tqdm

from _common import machine, median, parse_args, plt, png_path, seed_all, timeit, write_json
from mini_m3.config import Memory3Config
from mini_m3.model import Memory3, MemoryKV, prefill_chunk_loop

NAME = "bench_prefill"


def random_memory(cfg: Memory3Config, batch: int, n_chunks: int, gen: torch.Generator) -> MemoryKV:
    M = cfg.memories_per_chunk * cfg.memory_tokens_per_head  # 5 x 8 = 40 slots per chunk
    shape = (batch, n_chunks, len(cfg.memory_layers), len(cfg.memory_heads), M, cfg.head_dim)
    return MemoryKV(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))


def main(argv=None) -> dict:
    args = parse_args(NAME, argv, __doc__)
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    lengths = [256, 512] if args.quick else [512, 1024, 2048]
    repeats = 3 if args.quick else 7
    cfg = Memory3Config.from_name("small", max_seq_len=2048)
    model = Memory3(cfg).eval()
    gen = torch.Generator().manual_seed(args.seed)
    rows, checked = [], []
    bar = tqdm(total=len(lengths) * (repeats + 1), disable=args.quiet, desc="prefill", unit="run")
    with torch.inference_mode():
        for T in lengths:
            C = T // cfg.chunk_length
            idx = torch.randint(4, cfg.vocab_size, (1, T), generator=gen)
            mem = random_memory(cfg, 1, C, gen)
            fused = lambda: model(idx, memory=mem)  # noqa: E731
            loop = lambda: prefill_chunk_loop(model, idx, mem)  # noqa: E731
            plain = lambda: model(idx)  # noqa: E731  (no memory at all, for scale)
            # correctness first (also the warm-up run of each path)
            a, b = fused().logits, loop().logits
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
            checked.append(T)
            plain()
            bar.update(1)
            t_f, t_l, t_p = [], [], []
            for r in range(repeats):  # interleave, alternating the order to cancel drift
                order = [("f", fused), ("l", loop), ("p", plain)]
                if r % 2:
                    order.reverse()
                for key, fn in order:
                    dt = timeit(fn)
                    {"f": t_f, "l": t_l, "p": t_p}[key].append(dt)
                bar.update(1)
            rows.append({"context": T, "chunks": C, "memory_slots_per_chunk": mem.slots,
                         "fused_s": median(t_f), "loop_s": median(t_l), "no_memory_s": median(t_p),
                         "loop_over_fused": median(t_l) / median(t_f),
                         "fused_times": t_f, "loop_times": t_l, "no_memory_times": t_p})
        # where the fused call spends its time at the largest length (torch.profiler, CPU ops)
        prof_rows = {}
        for name, fn in (("fused", fused), ("loop", loop)):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                fn()
            ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
            prof_rows[name] = [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2)}
                               for e in ev]
    bar.close()
    last = rows[-1]
    result = {
        "benchmark": NAME, "quick": args.quick, "seed": args.seed, "repeats": repeats, "batch": 1,
        "config": cfg.to_dict(), "machine": machine(args.threads),
        "equality_checked": checked, "equality_atol": 1e-4,
        "per_length": rows,
        "profile_top": prof_rows,  # torch.profiler self CPU time by op, largest length
        "fused_over_loop": last["loop_s"] / last["fused_s"],  # speedup of fused over loop at the largest length
        "fused_over_loop_length": last["context"],
        "target": ">= 3x at 2048", "target_met": bool(last["context"] >= 2048 and last["loop_s"] / last["fused_s"] >= 3),
    }
    write_json(args.out, result, seed=args.seed)
    p = plt()
    fig, (ax, ax2) = p.subplots(1, 2, figsize=(9, 3.4))
    x = [r["context"] for r in rows]
    ax.plot(x, [r["fused_s"] for r in rows], "o-", label="fused (one call)")
    ax.plot(x, [r["loop_s"] for r in rows], "s-", label="per-chunk loop")
    ax.plot(x, [r["no_memory_s"] for r in rows], "^--", label="no memory", color="C7")
    ax.set_xscale("log", base=2); ax.set_yscale("log"); ax.set_xlabel("context tokens"); ax.set_ylabel("prefill s")
    ax.legend(fontsize=8); ax.grid(alpha=.3)
    ax2.bar([str(v) for v in x], [r["loop_over_fused"] for r in rows]); ax2.axhline(3, ls="--", color="r", lw=1)
    ax2.set_xlabel("context tokens"); ax2.set_ylabel("loop / fused time")
    fig.suptitle(f"prefill, small cfg, batch 1, {torch.get_num_threads()} thread(s)", fontsize=9)
    fig.tight_layout(); fig.savefig(png_path(args.out), dpi=100); p.close(fig)
    print(f"{'context':>8} {'fused s':>9} {'loop s':>9} {'no-mem s':>9} {'loop/fused':>11}")
    for r in rows:
        print(f"{r['context']:8d} {r['fused_s']:9.4f} {r['loop_s']:9.4f} {r['no_memory_s']:9.4f} {r['loop_over_fused']:11.2f}")
    print(f"fused_over_loop at {last['context']}: {result['fused_over_loop']:.2f}x (target >= 3x at 2048)")
    return result


if __name__ == "__main__":
    main()
