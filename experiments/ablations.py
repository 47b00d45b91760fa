"""Ablations of the explicit-memory design choices (§3.3, §3.6, §8) on the knowledge world.

One no-memory warmup is trained once; every variant then continues from a copy of that checkpoint with the
same data, seed and step count, changing one knob of the memory design:

  tokens_per_head  1, 2, 4, 8 (paper), 16, all         memory_layers  first half (paper), middle 25-75 %, all
  selector         attention (paper), exp, random, first memory_heads  1, all KV heads (paper)
  memories_per_chunk 1, 3, 5 (paper), 7                vq             off, on (evaluation-time only)

For each variant we report the final training loss, the held-out LM loss on QA documents about held-out
people with memory, the answer log-likelihood and exact match on held-out people (memory mode). The
retrieval interval (32/64/128-token chunks) is not ablated: it changes the data layout, not a model knob.

    python experiments/ablations.py [--quick] [--out experiments/results/ablations.json] [--only GROUP]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import plt as pyplot, png_path, write_json  # noqa: E402

from mini_m3 import Memory3, Memory3Config, MemoryBank  # noqa: E402
from mini_m3.data.world import format_qa  # noqa: E402
from mini_m3.demo import DemoSettings, build_world_data, setup_world  # noqa: E402
from mini_m3.evaluate import qa_eval  # noqa: E402
from mini_m3.train import TrainConfig, evaluate_loss, train  # noqa: E402


def variants(cfg: Memory3Config) -> dict[str, list[tuple[str, dict, dict]]]:
    """group -> [(label, config overrides, train/eval overrides)]"""
    L = cfg.n_layers
    middle = tuple(range(L // 4, max(L // 4 + 1, (3 * L + 3) // 4)))
    return {
        "tokens_per_head": [(str(k), {}, {"tokens_per_head": k}) for k in (1, 2, 4, 8, 16)]
                           + [("all", {}, {"selector": "all"})],
        "selector": [(s, {}, {"selector": s}) for s in ("attention", "exp", "random", "first")],
        "memory_layers": [("first half", {}, {}), (f"middle {list(middle)}", {"memory_layers": middle}, {}),
                          ("all", {"memory_layers": tuple(range(L))}, {})],
        "memory_heads": [("1", {"memory_heads": (0,)}, {}), ("all", {}, {})],
        "memories_per_chunk": [(str(n), {"memories_per_chunk": n}, {}) for n in (1, 3, 5, 7)],
        "vq": [("off", {}, {}), ("on", {}, {"quantizer": "default"})],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="experiments/results/ablations.json")
    p.add_argument("--only", default=None, help="comma-separated groups to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--continual-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    s = DemoSettings.quick(seed=a.seed) if a.quick else DemoSettings(seed=a.seed, n_docs=12000)
    W = a.warmup_steps if a.warmup_steps is not None else (10 if a.quick else s.warmup_steps)
    C = a.continual_steps if a.continual_steps is not None else (5 if a.quick else 150)
    w = setup_world(s)
    world, tok, base_cfg, refs, ref_tokens, retriever = (w.world, w.tokenizer, w.cfg, w.references,
                                                          w.reference_tokens, w.retriever)
    data = build_world_data(world, tok, s, base_cfg.chunk_length, retriever, ref_tokens, not a.quiet)
    # held-out LM data: QA documents (training format) about held-out people, who never appear in training
    heldout_people = world.people_in("heldout")
    held_docs = []
    for i, d in enumerate(world.training_documents(64, seed=s.seed + 7, mix={"qa": 1.0})):
        p = heldout_people[i % len(heldout_people)]
        lines = [format_qa(*world.qa(p, attr)) for attr in d.detail.split(",")]
        held_docs.append(type(d)("\n".join(lines), p.pid, "qa", d.detail))
    held = build_world_data(world, tok, s, base_cfg.chunk_length, retriever, ref_tokens, False, docs=held_docs)
    items = world.eval_questions("heldout", min(s.eval_questions, 100), seed=s.seed, phrasing=s.eval_phrasing)

    torch.manual_seed(s.seed)
    warm = Memory3(base_cfg)
    common = dict(batch_size=s.batch_size, lr=s.lr, seed=s.seed, quiet=a.quiet)
    total = W + C
    train(warm, data, TrainConfig(stage="warmup", steps=W, warmup_steps=max(1, total // 10), decay_fraction=0.0,
                                  **common))
    groups = variants(base_cfg)
    if a.only:
        groups = {g: v for g, v in groups.items() if g in a.only.split(",")}
    results = {"settings": {**s.__dict__, "warmup_steps": W, "continual_steps": C}, "groups": {}}
    for group, vs in groups.items():
        results["groups"][group] = {}
        for label, cfg_over, knobs in vs:
            t0 = time.perf_counter()
            cfg = base_cfg.replace(**cfg_over)
            model = Memory3(cfg)
            model.load_state_dict(copy.deepcopy(warm.state_dict()))
            selector = knobs.get("selector", "attention")
            tph = knobs.get("tokens_per_head")
            tc = TrainConfig(stage="continual", steps=C, warmup_steps=0, decay_fraction=min(1.0, 0.1 * total / C),
                             selector=selector, tokens_per_head=tph, **common)
            r = train(model, data, tc)
            lm = evaluate_loss(model, held, tc, max_batches=8)
            with tempfile.TemporaryDirectory() as d:
                bank = MemoryBank.build(d, model, tok, refs, selector=selector, tokens_per_head=tph,
                                        quantizer=knobs.get("quantizer"), overwrite=True, progress=False, seed=s.seed)
                qa = qa_eval(model, tok, items, mode="memory", bank=bank)
            results["groups"][group][label] = {
                "final_train_loss": r["final_loss"], "heldout_lm_loss": lm, "heldout_qa": qa["accuracy"],
                "heldout_answer_loglik": qa["answer_loglik"], "seconds": time.perf_counter() - t0}
            if not a.quiet:
                print(group, label, results["groups"][group][label], flush=True)
    out = Path(a.out)
    write_json(out, results)
    plot(results, png_path(out))
    return 0


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    groups = results["groups"]
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.2), squeeze=False)
    for ax, (group, res) in zip(axes[0], groups.items()):
        labels = list(res)
        ax.bar(range(len(labels)), [res[k]["heldout_lm_loss"] for k in labels], color="C0")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(group, fontsize=9)
        lo = min(res[k]["heldout_lm_loss"] for k in labels)
        ax.set_ylim(lo * 0.9, None)
        for i, k in enumerate(labels):
            ax.text(i, res[k]["heldout_lm_loss"], f"EM {res[k]['heldout_qa']:.2f}", ha="center", va="bottom", fontsize=6)
    axes[0][0].set_ylabel("held-out LM loss with memory")
    fig.suptitle(f"ablations ({results['settings']['continual_steps']} continual steps after "
                 f"{results['settings']['warmup_steps']} warmup steps; seed {results['settings']['seed']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
