"""Fig 11 at mini scale (§3.6): does memory help more when it starts after a no-memory warmup?

Three arms on the same tokens and the same WSD learning rates at every step:
  control-control  no memory throughout
  memory-memory    memory from step 0 (warmup stage also reads memory)
  control-memory   no-memory warmup, then continual training with memory (the paper's recipe)
We record the training loss of each arm, the held-out LM loss with and without memory after each stage,
and QA exact match (memory mode and memory off) on trained and held-out people.

    python experiments/two_stage.py [--quick] [--replot] [--out experiments/results/two_stage.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import plt as pyplot, png_path, save_figure, write_json  # noqa: E402

from mini_m3 import Memory3, MemoryBank  # noqa: E402
from mini_m3.demo import DemoSettings  # noqa: E402
from mini_m3.world_data import build_world_data, setup_world  # noqa: E402
from mini_m3.evaluate import qa_eval  # noqa: E402
from mini_m3.train import TrainConfig, train  # noqa: E402

ARMS = {"control-control": ("warmup", "warmup"), "memory-memory": ("continual", "continual"),
        "control-memory": ("warmup", "continual")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="experiments/results/two_stage.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--continual-steps", type=int, default=None)
    p.add_argument("--replot", action="store_true", help="only redraw the PNG of an existing --out file")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.replot:
        plot(json.loads(Path(a.out).read_text()), png_path(Path(a.out)))
        return 0
    s = DemoSettings.quick(seed=a.seed) if a.quick else DemoSettings(seed=a.seed)
    W = a.warmup_steps if a.warmup_steps is not None else s.warmup_steps
    C = a.continual_steps if a.continual_steps is not None else s.continual_steps
    torch.set_num_threads(s.threads)
    out = Path(a.out)
    work = out.with_suffix("")
    w = setup_world(s)
    world, tok, cfg, refs = w.world, w.tokenizer, w.cfg, w.references
    data = build_world_data(world, tok, s, cfg.chunk_length, w.retriever, w.reference_tokens, not a.quiet)
    items = {split: world.eval_questions(people, s.eval_questions, seed=s.seed, phrasing=s.eval_phrasing)
             for split, people in (("trained", "memory"), ("heldout", "heldout"))}
    results = {"settings": {**s.__dict__, "warmup_steps": W, "continual_steps": C}, "arms": {}}
    total = W + C
    for arm, (stage1, stage2) in ARMS.items():
        t0 = time.perf_counter()
        torch.manual_seed(s.seed)
        model = Memory3(cfg)  # in the demo's memory format (setup_world writes s.selector into cfg)
        common = dict(batch_size=s.batch_size, lr=s.lr, seed=s.seed, quiet=a.quiet)
        # one WSD schedule over both stages: warmup ramps, the decay sits in the last 10 % of all steps
        r1 = train(model, data, TrainConfig(stage=stage1, steps=W, warmup_steps=max(1, total // 10),
                                            decay_fraction=0.0, **common))
        r2 = train(model, data, TrainConfig(stage=stage2, steps=C, warmup_steps=0,
                                            decay_fraction=min(1.0, 0.1 * total / C), **common))
        bank = MemoryBank.build(work / arm / "bank", model, tok, refs, overwrite=True, progress=False, seed=s.seed)
        qa = {split: {mode: qa_eval(model, tok, its, mode=mode, bank=bank if mode == "memory" else None)["accuracy"]
                      for mode in ("memory", "none")} for split, its in items.items()}
        results["arms"][arm] = {"loss": r1["losses"] + r2["losses"], "qa": qa, "seconds": time.perf_counter() - t0}
        if not a.quiet:
            print(arm, qa, f"final loss {r2['final_loss']:.3f}", flush=True)
    write_json(out, results, seed=s.seed)
    plot(results, png_path(out))
    return 0


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    import numpy as np
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    W = results["settings"]["warmup_steps"]
    for arm, r in results["arms"].items():
        loss = np.convolve(r["loss"], np.ones(10) / 10, mode="valid")
        ax.plot(loss, label=arm, lw=1)
    ax.axvline(W, color="k", ls=":", lw=0.8)
    ax.set_yscale("log")  # the first steps fall from ~7.6; the arms differ below 1
    ax.set_xlabel("step"); ax.set_ylabel("training loss (10-step mean, log)"); ax.legend(fontsize=8); ax.grid(alpha=.3)
    arms = list(results["arms"])
    x = np.arange(len(arms))
    for i, (split, mode) in enumerate([("trained", "memory"), ("heldout", "memory"), ("heldout", "none")]):
        ax2.bar(x + (i - 1) * 0.27, [results["arms"][a]["qa"][split][mode] for a in arms], 0.27,
                label=f"{split}, memory {'on' if mode == 'memory' else 'off'}")
    ax2.set_xticks(x, arms, fontsize=8); ax2.set_ylabel("QA exact match"); ax2.set_ylim(0, 1); ax2.legend(fontsize=7)
    fig.suptitle("Fig 11 at mini scale: when should memory start?", fontsize=10)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
