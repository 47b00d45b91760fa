"""Memory bank: retrieval latency and recall (FAISS), `MemoryBank.get` throughput, bytes per memory (§3.4).

Retrieval: references are world biographies (n/5 people x 5 templates; worlds of <= 10^4 people each), embedded once
with the default embedder at a reduced dim, `HashedNgramEmbedder(dim=1024)` (the default 8192 would take
3.3 GB of float32 at 10^5). Indexes are built the way `Retriever.fit` builds them (same factory strings,
inner product on L2-normalised vectors, seeded training): "Flat" (exact), "HNSW32", and
"IVF{4*sqrt(n)},PQ{m}" (m = 64 sub-quantizers of 16 dims, 8 bits, at nprobe 8 = the Retriever default and
nprobe 32). Queries are 200 QA questions about random people. Latency = one query at a time (nq = 1),
median over queries, index search only (embedding cost reported separately); recall@5 = |top-5 ∩ exact
top-5| / 5 averaged over queries; person_hit@5 = the asked-about person has one of their 5 biographies in
the top 5 (what retrieval is for). HNSW is run at efSearch 64 (the Retriever default) and 256. 10^6 references are not run: at d=1024 the float32 matrix alone is
4 GB and the HNSW build would take far longer than this benchmark's time budget.

Bank: a `small` model (random weights) encodes 1000 world biographies (quick: 300) into a raw bf16 bank
and a VQ bank. `get` throughput in memories/s for batches of 5 ids: cold = cache_size 0, every call reads
the memory-mapped shards (OS page cache warm: we cannot drop it without root), cached = LRU cache holding
them all, and encode-on-first-get (cold-start bank, `encode=False`). Bytes per memory from
`MemoryBank.bytes_per_memory`.

    python experiments/bench_bank.py [--quick] [--out experiments/results/bench_bank.json]
"""

from __future__ import annotations

import math
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from _common import machine, median, parse_args, plt, png_path, seed_all, write_json
from mini_m3.config import Memory3Config
from mini_m3.data.world import ATTRIBUTES, World
from mini_m3.memory.bank import MemoryBank
from mini_m3.memory.quantize import seeded_training
from mini_m3.memory.retrieve import HashedNgramEmbedder, Retriever
from mini_m3.model import Memory3
from mini_m3.tokenizer import Tokenizer

NAME = "bench_bank"
DIM = 1024
K = 5


def references(n: int, seed: int) -> tuple[World, list[str]]:
    """n biographies: 5 templates per person; above 10^4 people (World caps unique names at 14400), further
    worlds with other seeds are appended (same names may recur there, with other facts). Queries come from
    the first world, whose person i owns texts 5i..5i+4."""
    people = max(1, n // 5)
    texts, first, w = [], None, 0
    while len(texts) < n:
        world = World.generate(min(people - len(texts) // 5, 10_000), seed=seed + w)
        first = first or world
        texts += [world.biography(p, template=t) for p in world.people for t in range(5)]
        w += 1
    return first, texts[:n]


def build_index(factory: str, x: np.ndarray) -> tuple[faiss.Index, float]:
    r = Retriever(HashedNgramEmbedder(dim=DIM), factory)
    t = time.perf_counter()
    index = r._new_index()  # the same constructor Retriever.fit uses
    if not index.is_trained:
        with seeded_training(index, seed=0):
            index.train(x)
    index.add(x)
    return index, time.perf_counter() - t


def set_params(index, nprobe: int | None, ef: int = 64) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nprobe is not None:
        ivf.nprobe = min(nprobe, ivf.nlist)
    inner = faiss.downcast_index(index)
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = ef


def label(factory: str, nprobe, ef) -> str:
    if factory.startswith("IVF"):
        return f"IVF-PQ64 nprobe {nprobe}"
    return f"HNSW32 ef {ef}" if factory.startswith("HNSW") else factory


def retrieval(sizes, n_queries, seed, quiet) -> list[dict]:
    rows = []
    for n in sizes:
        world, texts = references(n, seed)
        rng = random.Random(seed)
        people = world.people
        q_idx = [rng.randrange(len(people)) for _ in range(n_queries)]
        q_person = q_idx
        queries = [world.qa(people[i], rng.choice(ATTRIBUTES))[0] for i in q_idx]
        emb = HashedNgramEmbedder(dim=DIM)
        t = time.perf_counter()
        emb.fit(texts)
        x = np.concatenate([emb.embed(texts[i:i + 4096]) for i in range(0, n, 4096)]).astype(np.float32)
        embed_s = time.perf_counter() - t
        t = time.perf_counter()
        q = emb.embed(queries).astype(np.float32)
        q_embed_ms = (time.perf_counter() - t) / n_queries * 1e3
        nlist = int(round(4 * math.sqrt(n)))
        variants = [("Flat", None, None), ("HNSW32", None, 64), ("HNSW32", None, 256),
                    (f"IVF{nlist},PQ64", 8, None), (f"IVF{nlist},PQ64", 32, None)]
        person_of = np.arange(n) // 5  # texts are person-major, 5 templates each
        exact = None
        built = {}
        for factory, nprobe, ef in tqdm(variants, disable=quiet, desc=f"indexes n={n}"):
            if factory not in built:
                built[factory] = build_index(factory, x)
            index, build_s = built[factory]
            set_params(index, nprobe, ef or 64)
            _, ids = index.search(q, K)
            if exact is None:
                exact = ids
            hit = float(np.mean([qp in set(person_of[i] for i in row if i >= 0) for qp, row in zip(q_person, ids.tolist())]))
            recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ids.tolist(), exact.tolist())]))
            lat = []
            for i in range(n_queries):
                t = time.perf_counter()
                index.search(q[i:i + 1], K)
                lat.append(time.perf_counter() - t)
            rows.append({"n": n, "index": factory, "nprobe": nprobe, "ef_search": ef, "label": label(factory, nprobe, ef), "build_s": build_s,
                         "search_ms_median": median(lat) * 1e3, "search_ms_p90": float(np.percentile(lat, 90) * 1e3),
                         "recall_at_5": recall, "person_hit_at_5": hit, "query_embed_ms": q_embed_ms, "corpus_embed_s": embed_s})
        del built, x
    return rows


def get_throughput(n_refs: int, seed: int, quiet: bool, calls: int) -> dict:
    world = World.generate(n_refs, seed=seed)
    tok = Tokenizer.train(world.tokenizer_corpus(seed=seed), 2048)
    cfg = Memory3Config.from_name("small", vocab_size=max(2048, tok.vocab_size))
    torch.manual_seed(seed)
    model = Memory3(cfg).eval()
    refs = world.references()
    out = {"n_references": len(refs)}
    rng = np.random.default_rng(seed)
    batches = [rng.choice(len(refs), K, replace=False).tolist() for _ in range(calls)]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        MemoryBank.build(os.path.join(tmp, "raw"), model, tok, refs, retriever=Retriever(), overwrite=True,
                         progress=not quiet, seed=seed)
        out["build_raw_s"] = time.perf_counter() - t
        t = time.perf_counter()
        MemoryBank.build(os.path.join(tmp, "vq"), model, tok, refs, retriever=Retriever(), quantizer="default",
                         overwrite=True, progress=not quiet, seed=seed)
        out["build_vq_s"] = time.perf_counter() - t
        MemoryBank.build(os.path.join(tmp, "cold"), model, tok, refs, retriever=Retriever(), encode=False,
                         overwrite=True, progress=False, seed=seed)
        for kind in ("raw", "vq"):
            cold = MemoryBank.open(os.path.join(tmp, kind), model, tok, cache_size=0)
            warm = MemoryBank.open(os.path.join(tmp, kind), model, tok, cache_size=len(refs))
            for b in batches:  # fill the LRU cache
                warm.get(b)
            tc, tw = [], []
            for b in batches:  # interleave the two
                t = time.perf_counter(); cold.get(b); tc.append(time.perf_counter() - t)
                t = time.perf_counter(); warm.get(b); tw.append(time.perf_counter() - t)
            out[kind] = {"bytes_per_memory": cold.bytes_per_memory(),
                         "get_cold_memories_per_s": K / median(tc), "get_cached_memories_per_s": K / median(tw),
                         "get_cold_ms_per_call": median(tc) * 1e3, "get_cached_ms_per_call": median(tw) * 1e3,
                         "cache_info_cached": warm.cache_info()}
        enc = MemoryBank.open(os.path.join(tmp, "cold"), model, tok)
        te = []
        seen = set()
        for b in batches:
            if seen & set(b):
                continue
            seen |= set(b)
            t = time.perf_counter(); enc.get(b); te.append(time.perf_counter() - t)
        out["encode_on_first_get_memories_per_s"] = K / median(te)
        out["encode_on_first_get_calls"] = len(te)
    bpm = out["raw"]["bytes_per_memory"]
    out["bytes_per_memory"] = {"raw_stored": bpm["stored"], "raw_bf16": bpm["raw_bf16"],
                               "vq_stored": out["vq"]["bytes_per_memory"]["stored"], "positions": bpm["positions"],
                               "vq_compression": bpm["stored"] / out["vq"]["bytes_per_memory"]["stored"]}
    return out


def main(argv=None) -> dict:
    args = parse_args(NAME, argv, __doc__)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    seed_all(args.seed)
    sizes = [10 ** 3, 10 ** 4] if args.quick else [10 ** 4, 10 ** 5]
    n_queries = 50 if args.quick else 200
    t0 = time.perf_counter()
    rows = retrieval(sizes, n_queries, args.seed, args.quiet)
    bank = get_throughput(300 if args.quick else 1000, args.seed, args.quiet, 40 if args.quick else 200)
    result = {"benchmark": NAME, "quick": args.quick, "seed": args.seed, "machine": machine(args.threads),
              "embedder": f"HashedNgramEmbedder(dim={DIM})", "k": K, "n_queries": n_queries, "sizes": sizes,
              "not_run": "10^6 references (4 GB of float32 vectors at d=1024; HNSW/IVF-PQ build beyond the time budget)",
              "retrieval": rows, "bank": bank, "bytes_per_memory": bank["bytes_per_memory"],
              "wall_s": time.perf_counter() - t0}
    write_json(args.out, result, seed=args.seed)
    p = plt()
    fig, (ax, ax2) = p.subplots(1, 2, figsize=(10, 3.6))
    for name in dict.fromkeys(r["label"] for r in rows):
        pts = [r for r in rows if r["label"] == name]
        ax.plot([r["n"] for r in pts], [r["search_ms_median"] for r in pts], "o-", label=name)
        ax2.plot([r["n"] for r in pts], [r["recall_at_5"] for r in pts], "o-", label=name)
    ax.set_xscale("log"); ax.set_yscale("log"); ax.set_xlabel("references"); ax.set_ylabel("search ms / query")
    ax2.set_xscale("log"); ax2.set_xlabel("references"); ax2.set_ylabel("recall@5 vs Flat"); ax2.set_ylim(0, 1.05)
    ax.legend(fontsize=7); ax.grid(alpha=.3); ax2.grid(alpha=.3)
    fig.suptitle(f"retrieval, HashedNgramEmbedder dim {DIM}, {args.threads} thread(s)", fontsize=9)
    fig.tight_layout(); fig.savefig(png_path(args.out), dpi=100); p.close(fig)
    print(f"{'n':>7} {'index':>16} {'setting':>20} {'build s':>8} {'ms/query':>9} {'recall@5':>9} {'hit@5':>6}")
    for r in rows:
        print(f"{r['n']:7d} {r['index']:>16} {r['label']:>20} {r['build_s']:8.2f} {r['search_ms_median']:9.3f} "
              f"{r['recall_at_5']:9.3f} {r['person_hit_at_5']:6.3f}")
    for kind in ("raw", "vq"):
        b = bank[kind]
        print(f"bank {kind}: {b['bytes_per_memory']['stored']} B/memory, get cold {b['get_cold_memories_per_s']:.0f} "
              f"mem/s, cached {b['get_cached_memories_per_s']:.0f} mem/s")
    print(f"encode on first get: {bank['encode_on_first_get_memories_per_s']:.0f} mem/s")
    return result


if __name__ == "__main__":
    main()
