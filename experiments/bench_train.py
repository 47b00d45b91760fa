"""Training step time: warmup stage (no memory) vs continual stage (with live-encoded memory), §3.6 / §5.

One step = `train_step` (forward, + reference encoding through the memory layers in the continual stage)
+ backward + grad clip + AdamW step, on the `small` config with the paper's memory setting (5 memories per
chunk, top-8 tokens per head by attention) and world data (`build_world_data`), batch 8 x 256 tokens (4 chunks
of 64, one QA document per chunk). Warmup and continual steps are interleaved on the same model
(alternating order) and the medians are reported, plus tokens/s and the achieved FLOP/s against the
machine's measured fp32 matmul rate.

FLOP count per training step (forward + backward = 3 x forward, matmuls only, 2 FLOPs per multiply-add):
    6 * N_nonemb * tokens                          weights of all blocks (Kaplan et al. 2020)
  + 6 * d_model * vocab * target_tokens            the (tied) LM head, on positions with a target only
                                                   (`target_logits_only`: padding gets no logits)
  + 6 * 2 * sum_layers(S_l) * H * d_h * tokens     attention scores QK^T and AV, S_l = keys per query in layer
                                                   l: prefix + T (the full masked matrix, which SDPA computes
                                                   on CPU), + C*M memory slots in memory layers (continual)
  + continual only, the reference encoding: 6 * N_memlayers * ref_tokens + 6 * 2 * L_mem * (p + R) * H * d_h
    * ref_tokens (R = padded reference length of the batch), where ref_tokens counts padded reference tokens.
`tokens` = B x T positions (padding included, as the hardware computes them). `flops_fraction` =
achieved FLOP/s / measured matmul FLOP/s (a 2048^3 fp32 torch.mm, same thread count).

    python experiments/bench_train.py [--quick] [--out experiments/results/bench_train.json]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from tqdm.auto import tqdm

from _common import machine, median, parse_args, plt, png_path, seed_all, write_json
from mini_m3.config import Memory3Config
from mini_m3.data.world import World
from mini_m3.demo import DemoSettings
from mini_m3.world_data import build_world_data
from mini_m3.memory.retrieve import Retriever
from mini_m3.model import Memory3
from mini_m3.tokenizer import Tokenizer
from mini_m3.train import TrainConfig, batch_order, make_optimizer, memory_index, train_step

NAME = "bench_train"


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / median(ts)


def step_flops(model: Memory3, data, rows: torch.Tensor, stage: str) -> dict:
    cfg = model.cfg
    B, T = data.tokens[rows].shape
    tokens = B * T
    target_tokens = int((data.targets[rows] != -100).sum())
    N = model.num_parameters()  # non-embedding (tied head counted separately below)
    hd = cfg.n_heads * cfg.head_dim
    p = cfg.prefix_length
    C, M = T // cfg.chunk_length, cfg.memories_per_chunk * cfg.memory_tokens_per_head
    keys = [p + T + (C * M if (stage == "continual" and l in cfg.memory_layers) else 0) for l in range(cfg.n_layers)]
    f = {"weights": 6 * N * tokens, "lm_head": 6 * cfg.d_model * cfg.vocab_size * target_tokens,
         "attention": 6 * 2 * sum(keys) * hd * tokens, "reference_encoding": 0}
    if stage == "continual":
        idx = memory_index(data.chunk_refs[rows], cfg.memories_per_chunk)
        used = sorted({int(r) for r in idx.flatten().tolist() if r >= 0})
        if used:
            R = max(len(data.references[r]) for r in used)
            rt = len(used) * R
            per_layer = N // cfg.n_layers  # blocks are identical; the final norm is negligible
            Lm = cfg.memory_layers[-1] + 1  # encoding runs the layers up to the last memory layer
            f["reference_encoding"] = 6 * per_layer * Lm * rt + 6 * 2 * Lm * (p + R) * hd * rt
            f["reference_tokens"] = rt
    f["total"] = sum(v for k, v in f.items() if k in ("weights", "lm_head", "attention", "reference_encoding"))
    f["tokens"], f["target_tokens"] = tokens, target_tokens
    return f


def main(argv=None) -> dict:
    args = parse_args(NAME, argv, __doc__)
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    layout = dict(preset="small", chunks_per_sequence=4, batch_size=8, memories_per_chunk=5)
    s = DemoSettings.quick(n_docs=400, **layout) if args.quick else DemoSettings(n_docs=1200, **layout)
    warm_steps, reps = (1, 4) if args.quick else (2, 12)
    world = World.generate(s.n_people, seed=s.seed)
    tok = Tokenizer.train(world.tokenizer_corpus(seed=s.seed), s.vocab_size)
    cfg = Memory3Config.from_name(s.preset, vocab_size=max(s.vocab_size, tok.vocab_size),
                                  memories_per_chunk=s.memories_per_chunk)
    refs = world.references()
    ref_tokens = tok.encode_references(refs)
    data = build_world_data(world, tok, s, cfg.chunk_length, Retriever().fit(refs), ref_tokens, progress=False)
    torch.manual_seed(s.seed)
    model = Memory3(cfg).train()
    tcs = {st: TrainConfig(stage=st, batch_size=s.batch_size, lr=1e-4, seed=s.seed) for st in ("warmup", "continual")}
    opt = make_optimizer(model, tcs["warmup"])
    times = {"warmup": [], "continual": []}
    flops = {}
    step = 0

    def one(stage: str, record: bool):
        nonlocal step
        rows = batch_order(len(data), s.batch_size, step, s.seed)
        step += 1
        t = time.perf_counter()
        loss = train_step(model, data, rows, tcs[stage])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.perf_counter() - t
        if record:
            times[stage].append(dt)
            flops.setdefault(stage, []).append(step_flops(model, data, rows, stage))

    bar = tqdm(total=2 * (warm_steps + reps), disable=args.quiet, desc="train steps", unit="step")
    for i in range(warm_steps + reps):
        order = ("warmup", "continual") if i % 2 == 0 else ("continual", "warmup")
        for st in order:
            one(st, record=i >= warm_steps)
            bar.update(1)
    bar.close()
    peak = matmul_rate()
    per = {}
    for st in times:
        med = median(times[st])
        fl = median([f["total"] for f in flops[st]])
        tokens = flops[st][0]["tokens"]
        per[st] = {"step_s": med, "tokens_per_s": tokens / med, "flops_per_step": fl, "flops_per_s": fl / med,
                   "flops_fraction": fl / med / peak,
                   "flops_breakdown_median": {k: median([f.get(k, 0) for f in flops[st]])
                                              for k in ("weights", "lm_head", "attention", "reference_encoding")},
                   "times": times[st]}
    result = {
        "benchmark": NAME, "quick": args.quick, "seed": s.seed, "config": cfg.to_dict(), "machine": machine(args.threads),
        "batch_size": s.batch_size, "sequence_tokens": data.tokens.shape[1], "measured_steps_per_stage": reps,
        "non_embedding_params": model.num_parameters(), "total_params": model.num_parameters(False),
        "matmul_flops_per_s": peak, "matmul": "2048x2048 fp32 torch.mm, 2*n^3 FLOPs, median of 5",
        "per_stage": per,
        "continual_over_warmup": per["continual"]["step_s"] / per["warmup"]["step_s"],
        "flops_fraction": per["warmup"]["flops_fraction"],
        "flops_fraction_continual": per["continual"]["flops_fraction"],
        "target_tokens_per_step": median([f["target_tokens"] for f in flops["warmup"]]),
        "flop_formula": ("6*N_nonemb*tokens + 6*d*V*target_tokens + 12*sum_l(S_l)*H*d_h*tokens"
                         " [+ continual: 6*N_layer*L_enc*ref_tokens + 12*L_enc*(p+R)*H*d_h*ref_tokens]"),
    }
    write_json(args.out, result, seed=s.seed)
    p = plt()
    fig, (ax, ax2) = p.subplots(1, 2, figsize=(8, 3.2))
    ax.boxplot([times["warmup"], times["continual"]]); ax.set_xticks([1, 2], ["warmup", "continual"])
    ax.set_ylabel("step time (s)"); ax.grid(axis="y", alpha=.3)
    ax2.bar(["warmup", "continual"], [per[k]["flops_fraction"] * 100 for k in ("warmup", "continual")])
    ax2.set_ylabel("% of measured matmul FLOP/s")
    fig.suptitle(f"train step, small cfg, batch {s.batch_size}x{data.tokens.shape[1]}, "
                 f"{torch.get_num_threads()} thread(s)", fontsize=9)
    fig.tight_layout(); fig.savefig(png_path(args.out), dpi=100); p.close(fig)
    print(f"{'stage':>10} {'step s':>8} {'tok/s':>8} {'GFLOP/s':>8} {'% peak':>7}")
    for st in ("warmup", "continual"):
        r = per[st]
        print(f"{st:>10} {r['step_s']:8.3f} {r['tokens_per_s']:8.0f} {r['flops_per_s'] / 1e9:8.2f} "
              f"{100 * r['flops_fraction']:7.1f}")
    print(f"continual/warmup = {result['continual_over_warmup']:.2f}x; matmul peak {peak / 1e9:.1f} GFLOP/s")
    return result


if __name__ == "__main__":
    main()
