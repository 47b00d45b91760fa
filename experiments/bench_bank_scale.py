"""§3.4 banks of millions: bytes, build time and lookup time (search and get) of a MemoryBank as it grows
(10^4, 10^5, 10^6 references), extrapolated to the paper's 1.1e8 references.

What is real and what is synthetic, plainly:
- **Real code paths.** Everything below goes through `MemoryBank.build` / `MemoryBank.open` / `MemoryBank.get` /
  `MemoryBank.search`. Storage is raw bf16 in sharded, memory-mapped `.npy` files (65,536 references per shard),
  with a `Retriever` whose index is IVF-PQ (`IVF{sqrt n},PQ64`, nprobe 64) over `HashedNgramEmbedder(dim=256)`
  vectors.
- **Synthetic memories.** The explicit memories are NOT encoded by a model: encoding 10^6 references through even
  the `small` model would take about an hour here (251 memories/s, bench_bank). Keys and values are drawn from a
  seeded normal generator in bf16, with random sorted token positions. They have the `small` preset's shape:
  3 memory layers x 2 heads x 8 tokens x 32 dims, so 6144 B of K+V per reference. They reach the bank through
  `MemoryBank.build(..., memories=...)`, which writes precomputed memories shard by shard. The model (random
  `small` weights) only provides the shape and the fingerprint.
- **Cheap reference texts.** The texts are templated biographies of synthetic worlds (`mini_m3.data.world`; worlds
  of 10^4 people with different seeds are concatenated, so names recur across worlds). They are embedded with a
  small hashed n-gram embedder (dim 256), not BGE-M3 (1024-dim, ~100x slower per text). Retrieval *quality* on
  them says little. We report recall@5 of IVF-PQ against exact search on the same vectors, to show the
  approximate index is not broken.

Timings:
- **build** is split into synthesizing K/V (not bank work, reported apart), writing shards (bf16 conversion,
  `np.save`, sha256), and the rest (texts file, retriever fit = embed + train + add, save, manifest).
- **open** is `MemoryBank.open(verify="size")` with the bank's files dropped from the page cache first.
- **search** is one query at a time (embed + IVF-PQ search, median), and batches of 32.
- **get** is batches of 5 ids (one retrieval of one chunk) and of 160 ids (the paper's Table 21 protocol: 32
  sequences x 5), measured three ways:
  - *cold*: memory maps closed and shard files dropped from the page cache with `posix_fadvise(DONTNEED)`
    before every call, so the bytes come from the disk. Here that disk is a virtual disk, which the host may
    cache.
  - *page cache*: mmapped, LRU cache off.
  - *LRU*: the bank's RAM cache holds them.

Bank files are deleted after each size (only results are kept).

    OMP_NUM_THREADS=1 nice -n 10 python experiments/bench_bank_scale.py [--quick] [--out FILE.json] [--keep DIR]
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faiss
import numpy as np
import torch

from _common import machine, median, parse_args, plt, png_path, seed_all, write_json
from mini_m3.config import Memory3Config
from mini_m3.data.world import ATTRIBUTES, World
from mini_m3.memory.bank import MemoryBank
from mini_m3.memory.encode import ExplicitMemory
from mini_m3.memory.retrieve import HashedNgramEmbedder, Retriever
from mini_m3.model import Memory3
from mini_m3.theory.costs import PAPER_KNOWLEDGE_BASE_REFERENCES, memory_bank_bytes

NAME = "bench_bank_scale"
DIM = 256
K = 5
SHARD = 65_536
NPROBE = 64  # of sqrt(n) lists: PQ64 at nprobe 64 keeps most of exact search's person hits (0.57 vs 0.65 at 2e4)
PAPER_N = PAPER_KNOWLEDGE_BASE_REFERENCES


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def texts_and_queries(n: int, n_queries: int, seed: int) -> tuple[list[str], list[str], list[int]]:
    """n biographies (5 templates per person, worlds of <= 10^4 people, seeds seed, seed+1, ...); queries ask
    about people of the first world (person i owns texts 5i..5i+4)."""
    texts, first, w = [], None, 0
    while len(texts) < n:
        world = World.generate(min(max(1, (n - len(texts)) // 5 + 1), 10_000), seed=seed + w)
        first = first or world
        texts += [world.biography(p, template=t) for p in world.people for t in range(5)]
        w += 1
    rng = random.Random(seed)
    who = [rng.randrange(len(first.people)) for _ in range(n_queries)]
    queries = [first.qa(first.people[i], rng.choice(ATTRIBUTES))[0] for i in who]
    return texts[:n], queries, who


class SyntheticMemories:
    """Iterable of ExplicitMemory shards with seeded random bf16 K/V; records time spent synthesizing and when
    the last shard was handed over (= when the bank finished writing shards)."""

    def __init__(self, cfg: Memory3Config, n: int, seed: int):
        self.cfg, self.n, self.seed = cfg, n, seed
        self.synth_s, self.done_at = 0.0, None

    def __iter__(self):
        cfg = self.cfg
        Lm, Hm, k, d = len(cfg.memory_layers), len(cfg.memory_heads), cfg.memory_tokens_per_head, cfg.head_dim
        gen = torch.Generator().manual_seed(self.seed)
        for start in range(0, self.n, SHARD):
            t = time.perf_counter()
            m = min(SHARD, self.n - start)
            keys = torch.randn(m, Lm, Hm, k, d, generator=gen, dtype=torch.bfloat16)
            values = torch.randn(m, Lm, Hm, k, d, generator=gen, dtype=torch.bfloat16)
            pos = torch.rand(m, Lm, Hm, cfg.reference_length, generator=gen).argsort(-1)[..., :k].sort(-1).values
            mem = ExplicitMemory(keys, values, pos + cfg.prefix_length, torch.ones(m, Lm, Hm, k, dtype=torch.bool),
                                 torch.arange(start, start + m))
            self.synth_s += time.perf_counter() - t
            yield mem
        self.done_at = time.perf_counter()


def dir_bytes(path: Path) -> dict:
    kinds = {"keys_values": 0, "positions": 0, "ids": 0, "texts": 0, "retriever_index": 0, "retriever_texts": 0,
             "other": 0}
    files = 0
    for p in path.rglob("*"):
        if not p.is_file():
            continue
        files += 1
        b, name = p.stat().st_size, p.name
        if name.endswith((".keys.npy", ".values.npy", ".codes.npy")):
            kinds["keys_values"] += b
        elif name.endswith(".positions.npy"):
            kinds["positions"] += b
        elif name.endswith(".ids.npy"):
            kinds["ids"] += b
        elif name.startswith("texts-"):
            kinds["texts"] += b
        elif name == "index.faiss":
            kinds["retriever_index"] += b
        elif name == "texts.json":
            kinds["retriever_texts"] += b
        else:
            kinds["other"] += b
    kinds["total"] = sum(kinds.values())
    kinds["files"] = files
    return kinds


def drop_page_cache(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def exact_top_k(retriever: Retriever, texts: list[str], queries: list[str], k: int) -> np.ndarray:
    """Exact inner-product top-k on the retriever's own embedder, streaming the corpus in chunks."""
    q = retriever.embedder.embed(queries).astype(np.float32)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    for s in range(0, len(texts), 65_536):
        x = retriever.embedder.embed(texts[s:s + 65_536]).astype(np.float32)
        sc, ix = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
        allsc, allix = np.concatenate([best_s, sc], 1), np.concatenate([best_i, ix + s], 1)
        order = np.argsort(-allsc, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(allsc, order, 1), np.take_along_axis(allix, order, 1)
    return best_i


def time_get(bank: MemoryBank, batches: list[list[int]], mode: str) -> list[float]:
    out = []
    for b in batches:
        if mode == "cold":
            bank._arrays.clear()  # close the memory maps, so the dropped pages are not held mapped
            drop_page_cache(bank.path)
        t = time.perf_counter()
        bank.get(b)
        out.append(time.perf_counter() - t)
    return out


def run_size(n: int, model: Memory3, root: Path, seed: int, n_queries: int, calls: int, quiet: bool) -> dict:
    cfg = model.cfg
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    t = time.perf_counter()
    texts, queries, who = texts_and_queries(n, n_queries, seed)
    texts_s = time.perf_counter() - t
    nlist = max(16, int(round(math.sqrt(n))))
    factory = f"IVF{nlist},PQ64"
    retriever = Retriever(HashedNgramEmbedder(dim=DIM), factory, nprobe=NPROBE)
    mems = SyntheticMemories(cfg, n, seed)
    path = root / f"bank-{n}"
    rss0 = rss_gb()
    t0 = time.perf_counter()
    MemoryBank.build(path, model, None, texts, memories=mems, retriever=retriever, storage_dtype="bfloat16",
                     shard_size=SHARD, progress=False, seed=seed)
    t_end = time.perf_counter()
    build = {"total_s": t_end - t0 - mems.synth_s, "synthesize_kv_s": mems.synth_s,
             "write_shards_s": mems.done_at - t0 - mems.synth_s, "texts_retriever_manifest_s": t_end - mems.done_at,
             "make_texts_s": texts_s}
    say(f"n={n}: built in {build['total_s']:.1f} s (+{mems.synth_s:.1f} s synthesizing K/V)")
    sizes = dir_bytes(path)

    drop_page_cache(path)
    rss1 = rss_gb()
    t = time.perf_counter()
    bank = MemoryBank.open(path, model, cache_size=0, verify="size")
    open_s = time.perf_counter() - t
    rss_open = rss_gb() - rss1

    # ---- search: Retriever of the bank (embed + IVF-PQ), one query at a time and batches of 32
    lat = []
    for q in queries:
        t = time.perf_counter()
        bank.search([q], K)
        lat.append(time.perf_counter() - t)
    qx = bank.retriever.embedder.embed(queries).astype(np.float32)
    bank.retriever._set_search_params(K)
    index_lat = []
    for i in range(len(qx)):
        t = time.perf_counter()
        bank.retriever.index.search(qx[i:i + 1], K)
        index_lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    found = np.concatenate([bank.search(queries[i:i + 32], K) for i in range(0, len(queries), 32)])
    batch_ms = (time.perf_counter() - t) / math.ceil(len(queries) / 32) * 1e3
    t = time.perf_counter()
    exact = exact_top_k(bank.retriever, texts, queries, K)
    exact_s = time.perf_counter() - t
    recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found.tolist(), exact.tolist())]))
    hit = float(np.mean([p in {i // 5 for i in row} for p, row in zip(who, found.tolist())]))
    hit_exact = float(np.mean([p in {i // 5 for i in row} for p, row in zip(who, exact.tolist())]))
    say(f"  search {median(lat) * 1e3:.2f} ms/query ({median(index_lat) * 1e3:.3f} ms index only), recall@5 vs "
        f"exact {recall:.3f}, person hit@5 {hit:.3f} (exact {hit_exact:.3f})")

    # ---- get
    rng = np.random.default_rng(seed)
    gets = {}
    for size in (5, 160):
        batches = [rng.choice(n, size, replace=False).tolist() for _ in range(calls)]
        cold = time_get(bank, batches, "cold")
        time_get(bank, batches, "page")  # bring the pages back (the cold pass dropped them)
        warm = time_get(bank, batches, "page")
        lru = MemoryBank.open(path, model, cache_size=size * calls, verify="none")
        time_get(lru, batches, "page")  # fill the LRU cache
        cached = time_get(lru, batches, "page")
        gets[size] = {mode: {"ms_per_call": median(ts) * 1e3, "memories_per_s": size / median(ts),
                             "p90_ms": float(np.percentile(ts, 90) * 1e3)}
                      for mode, ts in (("cold", cold), ("page_cache", warm), ("lru", cached))}
        say(f"  get {size}: cold {gets[size]['cold']['ms_per_call']:.1f} ms, page cache "
            f"{gets[size]['page_cache']['ms_per_call']:.2f} ms, LRU {gets[size]['lru']['ms_per_call']:.2f} ms")
        del lru
    bpm = bank.bytes_per_memory()
    del bank
    shutil.rmtree(path)
    return {"n": n, "index": factory, "nprobe": NPROBE, "embedder_dim": DIM, "shards": math.ceil(n / SHARD),
            "bytes": sizes, "bytes_per_reference": sizes["total"] / n, "bytes_per_memory": bpm, "build": build,
            "build_s_per_reference": build["total_s"] / n, "open_s": open_s, "open_rss_gb": rss_open,
            "rss_gb_during": rss1 - rss0,
            "search_ms_median": median(lat) * 1e3, "search_ms_p90": float(np.percentile(lat, 90) * 1e3),
            "index_search_ms_median": median(index_lat) * 1e3,
            "search_ms_per_batch_of_32": batch_ms, "recall_at_5_vs_exact": recall, "person_hit_at_5": hit,
            "person_hit_at_5_exact": hit_exact, "exact_search_s": exact_s, "get": {str(k): v for k, v in gets.items()}}


def extrapolate(rows: list[dict]) -> dict:
    """Per-reference bytes and build time at the largest size x 1.1e8; search latency by a power law fitted
    over the sizes; cold get scaled by the paper's bytes per memory at our measured cold read rate."""
    big = rows[-1]
    ns = np.array([r["n"] for r in rows], dtype=float)
    lat = np.array([r["index_search_ms_median"] for r in rows])
    slope, icept = np.polyfit(np.log(ns), np.log(lat), 1)
    paper = Memory3Config.from_name("paper-2.4b")
    pb = memory_bank_bytes(paper, PAPER_N)
    n_vec = len(paper.memory_layers) * len(paper.memory_heads) * paper.memory_tokens_per_head
    ours_bytes = big["bytes_per_memory"]["stored"] + big["bytes_per_memory"]["positions"]
    cold160 = big["get"]["160"]["cold"]
    read_rate = 160 * ours_bytes / (cold160["ms_per_call"] / 1e3)  # bytes/s of memories read cold
    per_mem_paper = {"raw_bf16": pb["per_reference"]["sparse"] + 2 * n_vec, "vq": pb["per_reference"]["vq"] + 2 * n_vec}
    text_b = big["bytes"]["texts"] / big["n"]
    return {
        "n": PAPER_N,
        "ours_small_shape_total_bytes": big["bytes_per_reference"] * PAPER_N,
        "paper_shape_bank_bytes": {k: v * PAPER_N for k, v in per_mem_paper.items()},
        "paper_shape_bytes_per_reference": per_mem_paper,
        "texts_bytes": text_b * PAPER_N,
        "retriever_index_bytes": big["bytes"]["retriever_index"] / big["n"] * PAPER_N,
        "ram_after_open_bytes": big["open_rss_gb"] * 2 ** 30 / big["n"] * PAPER_N,
        "build_s_single_core": big["build_s_per_reference"] * PAPER_N,
        "build_s_per_reference_at_largest": big["build_s_per_reference"],
        "search_ms_fit": {"exponent": float(slope), "ms_at_paper_n": float(math.exp(icept) * PAPER_N ** slope)},
        "cold_read_bytes_per_s": read_rate,
        "get_160_cold_ms_paper_shape": {
            "seek_bound": cold160["ms_per_call"],  # same number of random reads per memory as ours
            **{f"bandwidth_bound_{k}": 160 * v / read_rate * 1e3 for k, v in per_mem_paper.items()}},
        "note": "bytes and build time scale linearly; search time as n^exponent fitted over the measured sizes "
                "(IVF with nlist = sqrt(n) at fixed nprobe scans ~sqrt(n) codes), index search only (query embedding "
                "apart); cold get of the paper's larger memories lies between the seek-bound case (as many random "
                "reads per memory as ours: same time) and the bandwidth-bound case (bytes / our cold read rate)"}


def main(argv=None) -> dict:
    def extra(p):
        p.add_argument("--keep", help="build the banks under this directory instead of a temporary one "
                                      "(they are still deleted after measuring)")
    args = parse_args(NAME, argv, __doc__, extra)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    seed_all(args.seed)
    sizes = [2_000, 20_000] if args.quick else [10_000, 100_000, 1_000_000]
    n_queries, calls = (50, 10) if args.quick else (200, 30)
    cfg = Memory3Config.from_name("small")
    torch.manual_seed(args.seed)
    model = Memory3(cfg).eval()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bank_scale_", dir=os.environ.get("TMPDIR")))
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    need = sizes[-1] * 6700 * 1.2
    if free < need:
        raise SystemExit(f"{root} has {free / 1e9:.1f} GB free; the largest bank needs ~{need / 1e9:.1f} GB")
    t0 = time.perf_counter()
    rows = []
    try:
        for n in sizes:
            rows.append(run_size(n, model, root, args.seed, n_queries, calls, args.quiet))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    ext = extrapolate(rows)
    result = {"benchmark": NAME, "quick": args.quick, "seed": args.seed, "machine": machine(args.threads),
              "synthetic": {"memories": "seeded normal bf16 K/V, random positions, small-preset shape (not encoded)",
                            "texts": "templated biographies of synthetic worlds",
                            "embedder": f"HashedNgramEmbedder(dim={DIM})"},
              "model": "small (random weights: shape and fingerprint only)", "shard_size": SHARD, "k": K,
              "n_queries": n_queries, "get_calls": calls, "sizes": sizes, "rows": rows, "extrapolation": ext,
              "wall_s": time.perf_counter() - t0}
    write_json(args.out, result, seed=args.seed)
    plot(rows, ext, args.out)
    print(f"{'n':>9} {'GB':>7} {'build s':>8} {'open s':>7} {'search ms':>9} {'recall@5':>8} "
          f"{'get5 cold ms':>12} {'get160 cold ms':>14} {'get160 page ms':>14}")
    for r in rows:
        g5, g160 = r["get"]["5"], r["get"]["160"]
        print(f"{r['n']:9d} {r['bytes']['total'] / 1e9:7.3f} {r['build']['total_s']:8.1f} {r['open_s']:7.2f} "
              f"{r['search_ms_median']:9.3f} {r['recall_at_5_vs_exact']:8.3f} {g5['cold']['ms_per_call']:12.2f} "
              f"{g160['cold']['ms_per_call']:14.2f} {g160['page_cache']['ms_per_call']:14.2f}")
    print(f"1.1e8: ours {ext['ours_small_shape_total_bytes'] / 1e12:.2f} TB; paper shape raw "
          f"{ext['paper_shape_bank_bytes']['raw_bf16'] / 1e12:.1f} TB, VQ {ext['paper_shape_bank_bytes']['vq'] / 1e12:.2f} TB;"
          f" build {ext['build_s_single_core'] / 3600:.0f} core-hours (storage + index, no encoding); index search "
          f"~{ext['search_ms_fit']['ms_at_paper_n']:.1f} ms (n^{ext['search_ms_fit']['exponent']:.2f})")
    return result


def plot(rows: list[dict], ext: dict, out) -> None:
    p = plt()
    fig, axes = p.subplots(1, 3, figsize=(13, 3.6))
    ns = [r["n"] for r in rows]
    ax = axes[0]
    ax.plot(ns, [r["bytes"]["total"] for r in rows], "o-", label="bank total")
    ax.plot(ns, [r["bytes"]["keys_values"] for r in rows], "s--", label="K/V shards")
    ax.plot(ns, [r["bytes"]["retriever_index"] for r in rows], "^--", label="IVF-PQ index")
    ax.plot(ns, [r["bytes"]["texts"] + r["bytes"]["retriever_texts"] for r in rows], "v--", label="texts (x2)")
    ax.set_xscale("log"); ax.set_yscale("log"); ax.set_xlabel("references"); ax.set_ylabel("bytes on disk")
    ax.legend(fontsize=7); ax.grid(alpha=.3)
    ax = axes[1]
    ax.plot(ns, [r["build"]["total_s"] for r in rows], "o-", label="build (no encoding)")
    ax.plot(ns, [r["build"]["write_shards_s"] for r in rows], "s--", label="write shards")
    ax.plot(ns, [r["build"]["texts_retriever_manifest_s"] for r in rows], "^--", label="texts + retriever")
    ax.plot(ns, [r["open_s"] for r in rows], "v--", label="open")
    ax.set_xscale("log"); ax.set_yscale("log"); ax.set_xlabel("references"); ax.set_ylabel("seconds")
    ax.legend(fontsize=7); ax.grid(alpha=.3)
    ax = axes[2]
    ax.plot(ns, [r["search_ms_median"] for r in rows], "o-", label="search, 1 query")
    for size, mk in (("5", "s"), ("160", "^")):
        ax.plot(ns, [r["get"][size]["cold"]["ms_per_call"] for r in rows], mk + "-", label=f"get {size}, cold")
        ax.plot(ns, [r["get"][size]["page_cache"]["ms_per_call"] for r in rows], mk + ":", label=f"get {size}, page cache")
    ax.set_xscale("log"); ax.set_yscale("log"); ax.set_xlabel("references"); ax.set_ylabel("ms per call")
    ax.legend(fontsize=7); ax.grid(alpha=.3)
    fig.suptitle("MemoryBank at scale (synthetic bf16 K/V of the small shape, IVF-PQ retrieval, 1 thread)", fontsize=9)
    fig.tight_layout(); fig.savefig(png_path(out), dpi=100); p.close(fig)


if __name__ == "__main__":
    main()
