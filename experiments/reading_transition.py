"""When does reading memory start to pay? (§3.6, issue 4): train on the knowledge world, watch held-out QA.

Continual training with memory (optionally after a no-memory warmup) on world documents, one thread, seed 0.
Every --every steps a bank is built with the current weights and held-out people (biographies only in the
bank) are asked in the training phrasing; it prints exact match for

    held1  reading the top-1 retrieved memory          held5  reading the top-5 (the paper's count)
    mem5   `memory`-split people, top-5                off    no memory

    python experiments/reading_transition.py --selector all --steps 2000          # 1 memory, all tokens
    python experiments/reading_transition.py --selector attention --steps 2500    # the paper's top-8
    python experiments/reading_transition.py --cps 5 --batch 6 --mem 5 --lookalike --selector attention \\
        --lr 6e-3 --steps 2500 --over max_seq_len=320                             # look-alike distractors
    python experiments/reading_transition.py ... --save A.safetensors / --load A.safetensors  # curricula

`experiments/README.md` ("Does reading memory pay?") quotes the runs; their log is
`results/reading_transition.log`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from mini_m3 import Memory3, Memory3Config, MemoryBank
from mini_m3.checkpoint import load_weights, save_weights
from mini_m3.config import MEMORY_SELECTORS
from mini_m3.demo import DemoSettings
from mini_m3.world_data import build_world_data, setup_world
from mini_m3.evaluate import qa_eval
from mini_m3.train import TrainConfig, train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (Memory3Config.from_name)")
    p.add_argument("--steps", type=int, default=2500, help="continual (memory) steps")
    p.add_argument("--warmup", type=int, default=0, help="no-memory steps first")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (warmup and continual)")
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--cps", type=int, default=1, help="chunks per sequence")
    p.add_argument("--mix", default="qa=1", help="document mix, e.g. qa=0.8,bio=0.1,skill=0.1")
    p.add_argument("--selector", default="all", choices=MEMORY_SELECTORS, help="memory format the model trains in")
    p.add_argument("--mem", type=int, default=1, help="memories per chunk (own + previous chunks' references)")
    p.add_argument("--people", type=int, default=2000, help="people in the knowledge world")
    p.add_argument("--docs", type=int, default=24000, help="training documents")
    p.add_argument("--every", type=int, default=500,
                   help="held-out QA every N continual steps (a bank of the current weights each time)")
    p.add_argument("--lookalike", action="store_true", help="pack look-alike people into one sequence")
    p.add_argument("--save", help="write the trained weights here (.safetensors; None: not saved)")
    p.add_argument("--load", help="start from these weights (.safetensors; None: a fresh model)")
    p.add_argument("--over", default="", help="config overrides, e.g. max_seq_len=320")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    mix = tuple((k, float(v)) for k, v in (kv.split("=") for kv in a.mix.split(",")))
    s = DemoSettings(n_people=a.people, n_docs=a.docs, chunks_per_sequence=a.cps, mix=mix, preset=a.preset)
    w = setup_world(s)
    docs = w.world.training_documents(s.n_docs, seed=0, mix=dict(mix))
    if a.lookalike:
        docs = w.world.group_lookalikes(docs, a.cps)
    data = build_world_data(w.world, w.tokenizer, s, 64, w.retriever, w.reference_tokens, False, docs=docs)
    over = {k: int(v) for k, v in (kv.split("=") for kv in a.over.split(",") if kv)}
    torch.manual_seed(0)
    # the memory format is the model's: training, the banks and QA read --selector and --mem from its config
    model = Memory3(Memory3Config.from_name(a.preset, vocab_size=w.cfg.vocab_size, memories_per_chunk=a.mem,
                                            memory_selector=a.selector, **over))
    if a.load:
        load_weights(model, a.load)
    print(a, model.num_parameters(), len(data), flush=True)
    items = w.world.eval_questions("heldout", 100, seed=1, phrasing="train")
    titems = w.world.eval_questions("memory", 100, seed=1, phrasing="train")
    t0 = time.time()

    def evaluate(m, step):
        with tempfile.TemporaryDirectory() as d:
            bank = MemoryBank.build(d, m, w.tokenizer, w.references, overwrite=True, progress=False)
            out = {}
            for k in (1, 5):
                r = qa_eval(m, w.tokenizer, items, mode="memory", bank=bank, memories_per_chunk=k)
                out[f"held{k}"] = round(r["accuracy"], 2)
            out["mem5"] = round(qa_eval(m, w.tokenizer, titems, mode="memory", bank=bank,
                                        memories_per_chunk=5)["accuracy"], 2)
            out["off"] = round(qa_eval(m, w.tokenizer, items)["accuracy"], 2)
        print(f"step {step + 1} ({time.time() - t0:.0f}s): {out}", flush=True)
        return {}

    if a.warmup:
        train(model, data, TrainConfig(stage="warmup", steps=a.warmup, batch_size=a.batch, lr=a.lr, quiet=True,
                                       decay_fraction=0.0))
        print(f"warmup done {time.time() - t0:.0f}s", flush=True)
    train(model, data, TrainConfig(stage="continual", steps=a.steps, batch_size=a.batch, lr=a.lr,
                                   quiet=True, eval_every=a.every,
                                   warmup_steps=0 if a.warmup else 20), eval_fn=evaluate)
    if a.save:
        save_weights(model, a.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
