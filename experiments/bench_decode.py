"""Decoding throughput, the Table 21 protocol at our scale: memory vs none vs RAG, same model.

Batches of 128-token prompts (world biographies), 128 new tokens each (greedy, no early stop), wall time
including retrieval (and, for memory, reading the bank), via `mini_m3.evaluate.decode_throughput`. The
model is the `small` preset with max_seq_len=1024 (so RAG prompts with 5 reference texts fit) and RANDOM
weights (0 training steps): throughput does not depend on what the weights are. The bank holds the
biographies of a 2000-person world, built with `MemoryBank.build` (raw bf16 storage, Flat retriever).
"memory" reads it through the bank's RAM LRU cache (warm after the first round); "memory_nocache" opens the
same bank with cache_size=0, so every retrieval reads the memory-mapped shards again (the paper's worst
case, Table 21; the OS page cache stays warm, we cannot drop it without root).
Modes are interleaved round by round; the median tokens/s over rounds is reported. One memory-mode run
is profiled with cProfile (top entries by own time and cumulative time go to "profile_top").

    python experiments/bench_decode.py [--quick] [--out experiments/results/bench_decode.json]
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from tqdm.auto import tqdm

from _common import machine, median, parse_args, plt, png_path, seed_all, write_json
from mini_m3.config import Memory3Config
from mini_m3.data.world import World
from mini_m3.evaluate import cut_prompts, decode_throughput
from mini_m3.inference import generate_batch
from mini_m3.memory.bank import MemoryBank
from mini_m3.memory.retrieve import Retriever
from mini_m3.model import Memory3
from mini_m3.tokenizer import Tokenizer

NAME = "bench_decode"
MODES = ("memory", "none", "rag", "memory_nocache")  # memory_nocache: bank LRU cache off (paper's worst case)


def profile_top(fn, n: int = 15) -> dict:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())  # total own time

    def rows(key_idx):
        items = sorted(st.stats.items(), key=lambda kv: kv[1][key_idx], reverse=True)[:n]
        out = []
        for (file, line, func), (cc, nc, tt, ct, _) in items:
            short = f"{os.path.basename(file)}:{line}({func})" if file != "~" else func
            out.append({"function": short, "calls": nc, "own_s": round(tt, 4), "cumulative_s": round(ct, 4)})
        return out
    return {"total_s": round(total, 4), "by_own_time": rows(2), "by_cumulative": rows(3)}


def main(argv=None) -> dict:
    args = parse_args(NAME, argv, __doc__)
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    n_people = 500 if args.quick else 2000
    batches = [1, 4] if args.quick else [1, 16]
    new_tokens = 32 if args.quick else 128
    rounds = 2 if args.quick else 5
    prompt_tokens = 128
    say = (lambda *a: None) if args.quiet else print

    world = World.generate(n_people, seed=args.seed)
    tok = Tokenizer.train(world.tokenizer_corpus(seed=args.seed), 2048)
    cfg = Memory3Config.from_name("small", vocab_size=max(2048, tok.vocab_size), max_seq_len=1024)
    torch.manual_seed(args.seed)
    model = Memory3(cfg).eval()  # random weights, 0 training steps
    refs = world.references()
    with tempfile.TemporaryDirectory() as tmp:
        import time
        t0 = time.perf_counter()
        bank = MemoryBank.build(os.path.join(tmp, "bank"), model, tok, refs, retriever=Retriever(),
                                overwrite=True, progress=not args.quiet, seed=args.seed)
        build_s = time.perf_counter() - t0
        say(f"bank: {len(bank)} references, built in {build_s:.1f}s")
        bank_nc = MemoryBank.open(os.path.join(tmp, "bank"), model, tok, cache_size=0)
        banks = {"memory": bank, "none": None, "rag": bank, "memory_nocache": bank_nc}
        mode_of = lambda m: m.replace("_nocache", "")  # noqa: E731
        prompts = [" ".join(refs[i:i + 4]) for i in range(0, len(refs) - 4, 4)]
        raw = {m: {b: [] for b in batches} for m in MODES}
        breakdown = {}
        jobs = [(r, b) for r in range(rounds) for b in batches]
        bar = tqdm(total=len(jobs) * len(MODES), disable=args.quiet, desc="decode", unit="run")
        # warm-up (fills the bank's LRU cache as a real server would have it warm, and the allocator)
        for m in MODES:
            decode_throughput(model, tok, prompts, mode=mode_of(m), bank=banks[m], batch_size=1,
                              prompt_tokens=prompt_tokens, new_tokens=4)
        for r, b in jobs:
            order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
            for m in order:
                res = decode_throughput(model, tok, prompts, mode=mode_of(m), bank=banks[m],
                                        batch_size=b, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
                raw[m][b].append(res["tokens_per_s"])
                bar.update(1)
        bar.close()
        # where the time goes inside one call of each mode (generate_batch's own timers), largest batch
        B = batches[-1]
        sel = cut_prompts(tok, prompts, B, prompt_tokens)
        for m in MODES:
            res = generate_batch(model, tok, sel, bank=banks[m], mode=mode_of(m),
                                 max_new_tokens=new_tokens, stop_at_eos=False)
            breakdown[m] = {k: round(v, 4) for k, v in res[0].timings.items()}
            breakdown[m]["prompt_tokens_incl_rag_refs"] = None
        rag_len = [len(tok.encode("".join(bank.texts[i] + "\n" for i in ids) + p)) + 1
                   for p, ids in zip(sel, bank.search(sel, cfg.memories_per_chunk))]
        breakdown["rag"]["prompt_tokens_incl_rag_refs"] = max(rag_len)
        for m in MODES:
            if m != "rag":
                breakdown[m]["prompt_tokens_incl_rag_refs"] = prompt_tokens
        prof = profile_top(lambda: generate_batch(model, tok, sel, bank=bank, mode="memory",
                                                  max_new_tokens=new_tokens, stop_at_eos=False))
        cache = {"memory": bank.cache_info(), "memory_nocache": bank_nc.cache_info()}
    tps = {m: {str(b): median(raw[m][b]) for b in batches} for m in MODES}
    big = str(batches[-1])
    ratios = {f"batch_{b}": {"memory_over_none": tps["memory"][str(b)] / tps["none"][str(b)],
                             "memory_over_rag": tps["memory"][str(b)] / tps["rag"][str(b)],
                             "memory_nocache_over_none": tps["memory_nocache"][str(b)] / tps["none"][str(b)],
                             "memory_nocache_over_rag": tps["memory_nocache"][str(b)] / tps["rag"][str(b)]}
              for b in batches}
    result = {
        "benchmark": NAME, "quick": args.quick, "seed": args.seed, "weights": "random (0 training steps)",
        "config": cfg.to_dict(), "machine": machine(args.threads),
        "n_references": len(refs), "bank_build_s": build_s, "bank_cache_info": cache,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batches": batches, "rounds": rounds,
        "tokens_per_s": tps, "tokens_per_s_raw": {m: {str(b): raw[m][b] for b in batches} for m in MODES},
        "ratios_per_batch": ratios,
        "memory_over_none": ratios[f"batch_{big}"]["memory_over_none"],
        "memory_over_rag": ratios[f"batch_{big}"]["memory_over_rag"],
        "ratio_batch": batches[-1],
        "targets": {"memory_over_none": ">= 0.90", "memory_over_rag": ">= 2"},
        "targets_met": {"memory_over_none": ratios[f"batch_{big}"]["memory_over_none"] >= 0.9,
                        "memory_over_rag": ratios[f"batch_{big}"]["memory_over_rag"] >= 2},
        "timing_breakdown_batch": B, "timing_breakdown": breakdown,
        "profile_batch": B, "profile_top": prof,
    }
    write_json(args.out, result)
    p = plt()
    fig, ax = p.subplots(figsize=(6, 3.4))
    w = 0.8 / len(MODES)
    for i, m in enumerate(MODES):
        ax.bar([j + i * w for j in range(len(batches))], [tps[m][str(b)] for b in batches], w, label=m)
    ax.set_xticks([j + w for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("generated tokens/s"); ax.legend(fontsize=8); ax.grid(axis="y", alpha=.3)
    ax.set_title(f"decode, small cfg (random weights), {prompt_tokens}+{new_tokens} tokens", fontsize=9)
    fig.tight_layout(); fig.savefig(png_path(args.out), dpi=100); p.close(fig)
    print(f"{'batch':>6} " + " ".join(f"{m[:9]:>9}" for m in MODES) + f" {'mem/none':>9} {'mem/rag':>8}")
    for b in batches:
        r = ratios[f"batch_{b}"]
        print(f"{b:6d} " + " ".join(f"{tps[m][str(b)]:9.1f}" for m in MODES)
              + f" {r['memory_over_none']:9.2f} {r['memory_over_rag']:8.2f}")
    print(f"targets at batch {big}: memory/none >= 0.90 -> {result['targets_met']['memory_over_none']}, "
          f"memory/rag >= 2 -> {result['targets_met']['memory_over_rag']}")
    return result


if __name__ == "__main__":
    main()
