"""§5 the 2.4B recipe: GPUs, memory per GPU and throughput for FSDP2 training of paper-2.4b (both stages).

Three ingredients, each from something measured or from the cost model:

1. Sharded state: FSDP2 with bf16 compute keeps fp32 master weights, fp32 gradients and two fp32 AdamW moments
   per parameter, sharded over N ranks: 16 B x P / N. Plus the unsharded bf16 working copies: the root (embedding
   and LM head stay gathered through forward and backward) and two blocks (the current one and the prefetched
   one).
2. Activations, measured: a 2-layer model of the paper's width (d = 3200, 40 heads, 8 KV heads, d_h 80,
   W = 3200) in bf16 runs forward with `torch.autograd.graph.saved_tensors_hooks` counting the distinct storage
   bytes autograd keeps for backward, at two context lengths; the slope over tokens gives bytes per token per
   layer (weights, which are saved too, cancel in the slope). The same for the continual stage's live reference
   encoding (bytes per reference token per memory layer). The LM head's logits are counted from the vocabulary.
   Activation checkpointing is not used (not implemented here).
3. FLOPs per token from `mini_m3.theory.costs` (Appendix A): warmup = implicit_write_cost / l_ref (6N plus
   attention at l_train = 2048); continual adds 3 x explicit_write_cost / l_chunk (one 128-token reference
   encoded per 64-token chunk, forward and backward) and 3 x 5 x explicit_read_cost / l_chunk (reading 5
   memories). Throughput = MFU x peak bf16 FLOP/s / FLOPs per token, at an assumed MFU.

`bf16_sgd_step` takes one real continual-stage step of paper-2.4b on one device (bf16 weights, SGD inside backward):
the check (paper_notes/scaling.md) that the full-size shape trains at all.

    python experiments/recipe_2p4b.py [--quick] [--out experiments/results/recipe_2p4b.json]
"""

from __future__ import annotations

import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

from _common import machine, parse_args, seed_all, write_json
from mini_m3.config import Memory3Config
from mini_m3.distributed import init_parameters_, restore_buffers
from mini_m3.memory.encode import encode_reference_tokens
from mini_m3.model import Memory3
from mini_m3.theory.costs import explicit_read_cost, explicit_write_cost, implicit_write_cost
from mini_m3.train import ChunkedData, TrainConfig, train_step

NAME = "recipe_2p4b"
GPUS = {"A100 80GB": (312e12, 80), "H100 SXM 80GB": (989e12, 80)}  # dense bf16 peak FLOP/s, GB
MFU = 0.40
PAPER_TOKENS = {"warmup": 3.1e12, "continual": 1.2e11}  # §5: warmup stopped at ~3.1T, continual diverged at ~120B
PAPER_BATCH_TOKENS = 4 * 2 ** 20  # §5: ~4M tokens per step (2048 sequences of 2048)
GiB = 2 ** 30


def _bf16_model(cfg: Memory3Config, *, device: str = "cpu", seed: int = 0) -> Memory3:
    """bf16 weights built on the meta device and materialised in place (no fp32 copy ever exists)."""
    with torch.device("meta"):
        m = Memory3(cfg)
    for p in m.parameters():
        p.data = p.data.to(torch.bfloat16)  # on the meta device: no memory
    m = restore_buffers(m.to_empty(device=device))
    init_parameters_(m, seed)
    return m.train()


def bf16_sgd_step(preset: str = "paper-2.4b", *, seq_len: int = 128, lr: float = 0.5, seed: int = 0,
                  device: str = "cpu") -> dict:
    """One continual-stage training step of a full-size preset on ONE device that cannot hold fp32 weights,
    gradients and AdamW state (paper-2.4b: 2.82e9 parameters x 16 B = 45 GB): bf16 weights, built on the meta
    device and materialised in place, and plain SGD applied inside backward (a post-accumulate-grad hook
    updates each parameter and frees its gradient), so peak memory is the bf16 weights plus activations of a
    short sequence. The step reads live-encoded memories: one random 128-token reference per 64-token chunk,
    5 memories per chunk. Returns losses before and after the step on the same batch, the gradient norm, the
    number of parameters updated, and wall times. It checks shapes and code paths, not training recipes
    (tests/test_distributed.py runs it on paper-2.4b with `-m bigmem`)."""
    cfg = Memory3Config.from_name(preset, max_seq_len=seq_len)
    t0 = time.perf_counter()
    model = _bf16_model(cfg, device=device, seed=seed)
    init_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(seed)
    C = seq_len // cfg.chunk_length
    tokens = torch.randint(4, cfg.vocab_size, (1, seq_len + 1), generator=gen)
    refs = [torch.randint(4, cfg.vocab_size, (cfg.reference_length,), generator=gen).tolist() for _ in range(C)]
    data = ChunkedData(tokens[:, :-1], tokens[:, 1:], torch.arange(C)[None], refs)
    tc = TrainConfig(stage="continual", steps=1, batch_size=1)
    rows = torch.tensor([0])
    stats = {"sq": 0.0, "updated": 0}

    @torch.no_grad()
    def sgd(p: torch.Tensor) -> None:
        stats["sq"] += float(p.grad.float().pow(2).sum())
        stats["updated"] += 1
        p.add_(p.grad, alpha=-lr)
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(sgd) for p in model.parameters()]
    model.train()
    t0 = time.perf_counter()
    loss = train_step(model, data, rows, tc)
    loss.backward()
    step_s = time.perf_counter() - t0
    for h in handles:
        h.remove()
    with torch.no_grad():
        after = float(train_step(model, data, rows, tc))
    return {"preset": preset, "parameters": sum(p.numel() for p in model.parameters()), "seq_len": seq_len,
            "references": C, "dtype": "bfloat16", "lr": lr, "loss_before": float(loss.detach()), "loss_after": after,
            "grad_norm": stats["sq"] ** 0.5, "parameters_updated": stats["updated"],
            "n_parameter_tensors": len(list(model.parameters())), "init_s": init_s, "step_s": step_s}


def _saved_bytes(fn) -> int:
    seen: dict = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure_activations(lengths: tuple[int, int], n_refs: tuple[int, int]) -> dict:
    """Bytes autograd saves per token per layer (main pass) and per reference token per memory layer."""
    cfg = Memory3Config.from_name("paper-2.4b", n_layers=2, memory_layers=(0,), vocab_size=256,
                                  max_seq_len=max(lengths))
    m = _bf16_model(cfg)
    ids = lambda n, t: torch.randint(4, 256, (n, t), generator=torch.Generator().manual_seed(0))
    main = [_saved_bytes(lambda: m(ids(1, t), targets=ids(1, t))) for t in lengths]
    per_token_layer = (main[1] - main[0]) / (lengths[1] - lengths[0]) / cfg.n_layers
    enc = [_saved_bytes(lambda: encode_reference_tokens(m, ids(n, cfg.reference_length))) for n in n_refs]
    per_ref_token_layer = (enc[1] - enc[0]) / ((n_refs[1] - n_refs[0]) * cfg.reference_length) / len(cfg.memory_layers)
    return {"per_token_per_layer_bytes": per_token_layer, "per_reference_token_per_memory_layer_bytes": per_ref_token_layer,
            "lengths": list(lengths), "n_refs": list(n_refs), "saved_main_bytes": main, "saved_encode_bytes": enc,
            "note": "2-layer model of paper-2.4b width in bf16, layer 0 a memory layer; slope over tokens; "
                    "includes the fp32 tensors RMSNorm and RoPE keep"}


def recipe(act: dict, seq_len: int = 2048) -> dict:
    cfg = Memory3Config.from_name("paper-2.4b")
    with torch.device("meta"):
        m = Memory3(cfg)
    P = sum(p.numel() for p in m.parameters())
    block = sum(p.numel() for p in m.blocks[0].parameters())
    root = P - cfg.n_layers * block
    C = seq_len // cfg.chunk_length
    ref_tokens = C * (cfg.prefix_length + cfg.reference_length)  # one new reference per chunk, encoded live
    logits = seq_len * cfg.vocab_size * (2 + 4 + 4)  # bf16 logits, their fp32 copy, log-softmax for backward
    act_warm = cfg.n_layers * seq_len * act["per_token_per_layer_bytes"] + logits
    act_cont = act_warm + len(cfg.memory_layers) * ref_tokens * act["per_reference_token_per_memory_layer_bytes"]
    working = 2 * (root + 2 * block)  # bf16 gathered root + current and prefetched block
    flops_warm = implicit_write_cost(cfg, seq_len) / cfg.reference_length
    flops_enc = 3 * explicit_write_cost(cfg) / cfg.chunk_length
    flops_read = 3 * cfg.memories_per_chunk * explicit_read_cost(cfg) / cfg.chunk_length
    flops_cont = flops_warm + flops_enc + flops_read
    rows = []
    for n in (8, 16, 32, 64, 128):
        state = 16 * P / n
        for gpu, (peak, mem_gb) in GPUS.items():
            budget = mem_gb * 1e9 * 0.9 - state - working  # keep 10 % for allocator slack and workspaces
            micro = {st: max(0, int(budget // a)) for st, a in (("warmup", act_warm), ("continual", act_cont))}
            tps = {st: MFU * peak / f for st, f in (("warmup", flops_warm), ("continual", flops_cont))}
            days = {st: PAPER_TOKENS[st] / (n * tps[st]) / 86400 for st in tps}
            rows.append({"gpus": n, "gpu": gpu, "state_gb_per_gpu": state / 1e9, "working_gb": working / 1e9,
                         "max_micro_batch": micro,
                         "peak_gb_at_micro_1": {st: (state + working + a) / 1e9 for st, a in
                                                (("warmup", act_warm), ("continual", act_cont))},
                         "tokens_per_s_per_gpu": tps, "days_for_paper_tokens": days,
                         "accumulation_steps_for_4M_batch": {st: math.ceil(PAPER_BATCH_TOKENS / seq_len / n / max(1, micro[st]))
                                                             for st in micro}})
    return {"parameters": P, "non_embedding_parameters": m.num_parameters(), "block_parameters": block,
            "root_parameters": root, "seq_len": seq_len, "state_bytes_per_parameter": 16,
            "activation_gib_per_sequence": {"warmup": act_warm / GiB, "continual": act_cont / GiB},
            "logits_gib_per_sequence": logits / GiB, "reference_tokens_per_sequence": ref_tokens,
            "gflop_per_token": {"warmup": flops_warm / 1e9, "continual": flops_cont / 1e9,
                                "continual_encoding": flops_enc / 1e9, "continual_reading": flops_read / 1e9},
            "continual_over_warmup_flops": flops_cont / flops_warm, "assumed_mfu": MFU, "rows": rows}


def main(argv=None) -> dict:
    args = parse_args(NAME, argv, __doc__)
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    t0 = time.perf_counter()
    act = measure_activations((128, 256) if args.quick else (256, 768), (2, 4) if args.quick else (4, 12))
    r = recipe(act)
    result = {"benchmark": NAME, "quick": args.quick, "machine": machine(args.threads), "activations": act, **r,
              "wall_s": time.perf_counter() - t0}
    write_json(args.out, result, seed=args.seed)
    print(f"paper-2.4b: {r['parameters']:,} parameters; activations per 2048-token sequence "
          f"{r['activation_gib_per_sequence']['warmup']:.1f} GiB (warmup), "
          f"{r['activation_gib_per_sequence']['continual']:.1f} GiB (continual); "
          f"{act['per_token_per_layer_bytes'] / 1024:.0f} KiB per token per layer")
    print(f"GFLOP per token: warmup {r['gflop_per_token']['warmup']:.2f}, continual {r['gflop_per_token']['continual']:.2f}"
          f" ({r['continual_over_warmup_flops']:.2f}x)")
    print(f"{'GPUs':>5} {'GPU':>14} {'state GB':>9} {'micro w/c':>10} {'tok/s/GPU w/c':>16} {'days w (3.1T)':>14} "
          f"{'days c (120B)':>14}")
    for row in r["rows"]:
        mb, tps, d = row["max_micro_batch"], row["tokens_per_s_per_gpu"], row["days_for_paper_tokens"]
        print(f"{row['gpus']:5d} {row['gpu']:>14} {row['state_gb_per_gpu']:9.2f} {mb['warmup']:>4}/{mb['continual']:<5}"
              f" {tps['warmup']:>7.0f}/{tps['continual']:<7.0f} {d['warmup']:14.1f} {d['continual']:14.1f}")
    return result


if __name__ == "__main__":
    main()
