"""Decoding throughput, the Table 21 protocol at our scale: memory vs none vs RAG, same model.

Batches of 128-token prompts (world biographies), 128 new tokens each (greedy, no early stop), wall time
including retrieval (and, for memory, reading the bank), via `mini_m3.evaluate.compare_decode_throughput`.
The model is the `small` preset with max_seq_len=1024 (so RAG prompts with 5 reference texts fit) and RANDOM
weights (0 training steps): throughput does not depend on what the weights are.

Two knowledge bases, one bank each (`MemoryBank.build`, raw bf16 storage, Flat retriever):
- "chunks_128" (the headline): the biographies of a 2000-person world back to back, cut into references of
  the paper's length (`chunk_references`, 120 tokens, at most 128 once re-tokenized with the "Reference:" space),
  as the paper cuts its knowledge base (§3.2); RAG then puts ~600 tokens in front of each prompt.
- "biographies": one reference per biography (~48 tokens), the knowledge world's own references.
Mode labels without a suffix are chunks_128; "@biographies" marks the other bank. "memory" reads its bank
through the RAM LRU cache (warm after the first round); "memory_nocache" opens the same bank with
cache_size=0, so every retrieval reads the memory-mapped shards again (the paper's worst case, Table 21; the
OS page cache stays warm, we cannot drop it without root).
For each batch size the modes take turns, one run each per round, the order rotated every round, after one warm-up
round that is not counted (`compare_decode_throughput`); per mode the median tokens/s over the rounds is reported
with its spread, and each ratio is the median of the ratios within each round (the paper averages 8 of 9 runs).
One memory-mode run is profiled with cProfile ("profile_top").

    python experiments/bench_decode.py [--quick] [--out experiments/results/bench_decode.json]
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

from _common import machine, parse_args, plt, png_path, seed_all, write_json
from mini_m3.config import Memory3Config
from mini_m3.data.text import chunk_references
from mini_m3.data.world import World
from mini_m3.evaluate import compare_decode_throughput, cut_prompts
from mini_m3.inference import generate_batch
from mini_m3.memory.bank import MemoryBank
from mini_m3.memory.retrieve import Retriever
from mini_m3.model import Memory3
from mini_m3.tokenizer import Tokenizer

NAME = "bench_decode"
MODES = ("memory", "none", "rag", "memory_nocache")  # memory_nocache: bank LRU cache off (paper's worst case)
REFERENCE_SETS = ("chunks_128", "biographies")  # the first is the headline


def reference_chunks(tok: Tokenizer, texts: list[str], length: int = 120, limit: int = 128) -> list[str]:
    """`texts` back to back, cut into pieces of `length` tokens; each is checked to be <= `limit` tokens once
    re-tokenized as a reference (decoding and re-encoding a cut can move a boundary by a token or two)."""
    pieces = [tok.decode(p).strip() for p in chunk_references(tok.encode(" ".join(texts)), length)]
    pieces = [p for p in pieces if p]
    longest = max(len(ids) for ids in tok.encode_references(pieces))
    if longest > limit:
        raise ValueError(f"a reference chunk re-tokenizes to {longest} > {limit} tokens; lower `length`")
    return pieces


def label(mode: str, ref_set: str) -> str:
    return mode if ref_set == REFERENCE_SETS[0] or mode == "none" else f"{mode}@{ref_set}"


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
    rounds = 2 if args.quick else 9
    prompt_tokens = 128
    say = (lambda *a: None) if args.quiet else print

    world = World.generate(n_people, seed=args.seed)
    tok = Tokenizer.train(world.tokenizer_corpus(seed=args.seed), 2048)
    cfg = Memory3Config.from_name("small", vocab_size=max(2048, tok.vocab_size), max_seq_len=1024)
    torch.manual_seed(args.seed)
    model = Memory3(cfg).eval()  # random weights, 0 training steps
    bios = world.references()
    knowledge = {"chunks_128": reference_chunks(tok, bios), "biographies": bios}
    prompts = [" ".join(bios[i:i + 4]) for i in range(0, len(bios) - 4, 4)]
    with tempfile.TemporaryDirectory() as tmp:
        runs, bank_info = {"none": ("none", None)}, {}  # label -> (mode, bank)
        for rs in REFERENCE_SETS:
            t0 = time.perf_counter()
            path = os.path.join(tmp, rs)
            bank = MemoryBank.build(path, model, tok, knowledge[rs], retriever=Retriever(), overwrite=True,
                                    progress=not args.quiet, seed=args.seed)
            lengths = [len(ids) for ids in tok.encode_references(knowledge[rs])]
            bank_info[rs] = {"references": len(bank), "build_s": time.perf_counter() - t0,
                             "mean_reference_tokens": sum(lengths) / len(lengths), "max_reference_tokens": max(lengths)}
            say(f"bank {rs}: {len(bank)} references, mean {bank_info[rs]['mean_reference_tokens']:.0f} tokens, "
                f"built in {bank_info[rs]['build_s']:.1f}s")
            runs[label("memory", rs)] = ("memory", bank)
            runs[label("rag", rs)] = ("rag", bank)
            runs[label("memory_nocache", rs)] = ("memory", MemoryBank.open(path, model, tok, cache_size=0))
        # interleaved rounds per batch size; the warm-up round also fills the banks' LRU caches, as a real server
        # would have them warm
        pairs = [(label(a, rs), label(d, rs)) for rs in REFERENCE_SETS for a in ("memory", "memory_nocache")
                 for d in ("none", "rag")]
        speed = {b: compare_decode_throughput(model, tok, prompts, runs, rounds=rounds, batch_size=b,
                                              prompt_tokens=prompt_tokens, new_tokens=new_tokens, ratios=pairs,
                                              progress=not args.quiet) for b in batches}
        # where the time goes inside one call of each mode (generate_batch's own timers), largest batch
        B = batches[-1]
        sel = cut_prompts(tok, prompts, B, prompt_tokens)
        breakdown = {}
        for m, (mode, bank) in runs.items():
            res = generate_batch(model, tok, sel, bank=bank, mode=mode, max_new_tokens=new_tokens, stop_at_eos=False)
            breakdown[m] = {k: round(v, 4) for k, v in res[0].timings.items()}
            prompt_len = [prompt_tokens] * len(sel)
            if mode == "rag":
                prompt_len = [len(tok.encode("".join(bank.texts[i] + "\n" for i in ids) + p)) + 1
                              for p, ids in zip(sel, bank.search(sel, cfg.memories_per_chunk))]
            breakdown[m]["prompt_tokens_incl_rag_refs"] = max(prompt_len)
        prof = profile_top(lambda: generate_batch(model, tok, sel, bank=runs["memory"][1], mode="memory",
                                                  max_new_tokens=new_tokens, stop_at_eos=False))
        cache = {m: bank.cache_info() for m, (mode, bank) in runs.items() if mode == "memory"}
    tps = {m: {str(b): speed[b]["tokens_per_s"][m] for b in batches} for m in runs}

    def ratios(rs: str) -> dict:  # medians of the per-round ratios
        return {f"batch_{b}": {f"{a}_over_{d}": speed[b]["ratios"][f"{label(a, rs)}_over_{label(d, rs)}"]["median"]
                               for a in ("memory", "memory_nocache") for d in ("none", "rag")} for b in batches}
    big = f"batch_{batches[-1]}"
    by_set = {rs: {**bank_info[rs], "ratios_per_batch": ratios(rs)} for rs in REFERENCE_SETS}
    head = by_set[REFERENCE_SETS[0]]["ratios_per_batch"]
    result = {
        "benchmark": NAME, "quick": args.quick, "seed": args.seed, "weights": "random (0 training steps)",
        "config": cfg.to_dict(), "machine": machine(args.threads),
        "reference_set": REFERENCE_SETS[0], "by_reference_set": by_set, "bank_cache_info": cache,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batches": batches, "rounds": rounds,
        "tokens_per_s": {m: tps[m] for m in MODES}, "tokens_per_s_all": tps,
        "tokens_per_s_raw": {m: {str(b): speed[b]["tokens_per_s_rounds"][m] for b in batches} for m in runs},
        "tokens_per_s_spread": {m: {str(b): speed[b]["spread"][m] for b in batches} for m in runs},
        "ratios_per_round": {f"batch_{b}": {k: v["rounds"] for k, v in speed[b]["ratios"].items()} for b in batches},
        "method": speed[batches[-1]]["method"],
        "ratios_per_batch": head,
        "memory_over_none": head[big]["memory_over_none"],
        "memory_over_rag": head[big]["memory_over_rag"],
        "ratio_batch": batches[-1],
        "targets": {"memory_over_none": ">= 0.90", "memory_over_rag": ">= 2"},
        "targets_met": {"memory_over_none": head[big]["memory_over_none"] >= 0.9,
                        "memory_over_rag": head[big]["memory_over_rag"] >= 2},
        "timing_breakdown_batch": B, "timing_breakdown": breakdown,
        "profile_batch": B, "profile_top": prof,
    }
    write_json(args.out, result, seed=args.seed)
    p = plt()
    fig, ax = p.subplots(figsize=(7.5, 3.6))
    w = 0.8 / len(runs)
    for i, m in enumerate(runs):
        ax.bar([j + i * w for j in range(len(batches))], [tps[m][str(b)] for b in batches], w, label=m)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("generated tokens/s"); ax.legend(fontsize=7, ncol=2); ax.grid(axis="y", alpha=.3)
    ax.set_title(f"decode, small cfg (random weights), {prompt_tokens}+{new_tokens} tokens, 5 references "
                 f"(no suffix: {REFERENCE_SETS[0]})", fontsize=9)
    fig.tight_layout(); fig.savefig(png_path(args.out), dpi=100); p.close(fig)
    print(f"{'tokens/s':>24} " + " ".join(f"{'batch ' + str(b):>10}" for b in batches))
    for m in runs:
        print(f"{m:>24} " + " ".join(f"{tps[m][str(b)]:10.1f}" for b in batches))
    for rs in REFERENCE_SETS:
        r = by_set[rs]["ratios_per_batch"][big]
        print(f"{rs} (mean {by_set[rs]['mean_reference_tokens']:.0f} tokens) at {big}: memory/none "
              f"{r['memory_over_none']:.2f}, memory/rag {r['memory_over_rag']:.2f}")
    print(f"targets ({REFERENCE_SETS[0]}, {big}): memory/none >= 0.90 -> {result['targets_met']['memory_over_none']}, "
          f"memory/rag >= 2 -> {result['targets_met']['memory_over_rag']}")
    return result


if __name__ == "__main__":
    main()
