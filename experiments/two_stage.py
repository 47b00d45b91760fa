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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HelpFormatter, plt as pyplot, png_path, save_figure, write_json  # noqa: E402

from mini_m3.demo import FIG11_ARMS, DemoSettings, two_stage_arm  # noqa: E402
from mini_m3.world_data import build_world_data, setup_world  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run of the same code (DemoSettings.quick)")
    p.add_argument("--out", default="experiments/results/two_stage.json",
                   help="result JSON (a PNG is drawn next to it; the arms' banks go under --out without .json)")
    p.add_argument("--seed", type=int, default=0, help="DemoSettings seed: world, data, initialisation, questions")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="steps of the first stage (None: DemoSettings', 300, or 30 with --quick)")
    p.add_argument("--continual-steps", type=int, default=None,
                   help="steps of the second stage (None: DemoSettings', 3300, or 40 with --quick)")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG of an existing --out file")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-arm lines")
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
    world, tok, cfg = w.world, w.tokenizer, w.cfg
    data = build_world_data(world, tok, s, cfg.chunk_length, w.retriever, w.reference_tokens, not a.quiet)
    items = {split: world.eval_questions(people, s.eval_questions, seed=s.seed, phrasing=s.eval_phrasing)
             for split, people in (("trained", "memory"), ("heldout", "heldout"))}
    results = {"settings": {**s.__dict__, "warmup_steps": W, "continual_steps": C}, "arms": {}}
    for arm in FIG11_ARMS:  # one WSD schedule over both stages, the same learning rate at every step in each arm
        r = two_stage_arm(arm, w, data, items, s, W, C, work / arm / "bank", quiet=a.quiet)
        results["arms"][arm] = {k: r[k] for k in ("loss", "qa", "seconds")}
        if not a.quiet:
            print(arm, r["qa"], f"final loss {r['final_loss']:.3f}", flush=True)
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
