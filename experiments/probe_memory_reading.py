"""Does the model learn to read memory? A bare probe of the continual stage on the knowledge world (§3.6).

Trains the demo's `small` model (optionally after a no-memory warmup) and reports QA exact match with memory
on and off, on `memory` people (QA seen in training) and `heldout` people (never seen), in the held-out and the
training phrasing. Used for the numbers in experiments/README.md ("Does reading memory pay?").

    python experiments/probe_memory_reading.py SELECTOR CONTINUAL_STEPS WARMUP_STEPS
    python experiments/probe_memory_reading.py all 400 0
"""

import argparse
import sys
import time

import torch

from mini_m3 import Memory3, Memory3Config, MemoryBank, Retriever, Tokenizer
from mini_m3.config import MEMORY_SELECTORS
from mini_m3.data.world import World
from mini_m3.demo import DemoSettings
from mini_m3.world_data import build_world_data
from mini_m3.evaluate import qa_eval
from mini_m3.train import TrainConfig, train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("selector", choices=MEMORY_SELECTORS, help="memory token selector the model trains and reads with")
    p.add_argument("steps", type=int, help="continual-stage steps (with memory)")
    p.add_argument("warm", type=int, help="warmup-stage steps before it (no memory; 0: none)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    selector, steps, warm = a.selector, a.steps, a.warm
    torch.set_num_threads(1)
    s = DemoSettings(n_people=2000, n_docs=12000)
    world = World.generate(s.n_people, seed=0)
    tok = Tokenizer.train(world.tokenizer_corpus(seed=0), 2048)
    cfg = Memory3Config.from_name("small", vocab_size=2048, memory_selector=selector)  # the format it trains in
    refs = world.references()
    data = build_world_data(world, tok, s, 64, Retriever().fit(refs), tok.encode_references(refs), False)
    torch.manual_seed(0)
    model = Memory3(cfg)
    t = time.time()
    if warm:
        train(model, data, TrainConfig(stage="warmup", steps=warm, batch_size=8, lr=3e-3, quiet=True, decay_fraction=0))
    r = train(model, data, TrainConfig(stage="continual", steps=steps, batch_size=8, lr=3e-3, quiet=True,
                                       warmup_steps=0 if warm else 20))
    print("train", time.time() - t, r["final_loss"], flush=True)
    bank = MemoryBank.build(f"runs/probe_{selector}_{steps}_{warm}", model, tok, refs, overwrite=True, progress=False)
    for split in ["memory", "heldout"]:
        for phrasing in ("heldout", "train"):
            items = world.eval_questions(split, 200, seed=0, phrasing=phrasing)
            acc = {mode: qa_eval(model, tok, items, mode=mode, bank=bank if mode != "none" else None)["accuracy"]
                   for mode in ["memory", "none"]}
            print(split, f"{phrasing} phrasing", acc, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
