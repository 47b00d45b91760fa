"""Why memory reading does not pay yet (§3.6, issue 4): four small diagnostics of what the model learns.

Each subcommand trains a fresh model on world data for a few hundred steps (one thread, seed 0) and prints
what it measured; `experiments/README.md` ("Does reading memory pay?") records the numbers.

    python experiments/diagnose_reading.py verbatim --preset tiny --steps 150
        memory sanity check: the chunk IS its reference; loss with memory vs without
    python experiments/diagnose_reading.py qa --preset tiny --steps 600 --mix qa=1
        continual training from step 0 on QA documents (one chunk per sequence, 1 memory); held-out QA with
        memory (1 and 5), RAG and none every --every steps, then a per-token loss table (memory vs none)
    python experiments/diagnose_reading.py copy --preset tiny --steps 1000
        the abstract copy skill alone ("Words: ... Copy: ..."): token accuracy of the copied half
    python experiments/diagnose_reading.py copy --textbook --steps 300
        the same data through a textbook GPT (learned positions, LayerNorm, GELU), as a control for our model
    python experiments/diagnose_reading.py reading --preset tiny --steps 800
        in-context reading comprehension alone (fictitious biography + question, no memory)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from mini_m3 import Memory3, Memory3Config, MemoryBank, Retriever, Tokenizer
from mini_m3.data.world import QAItem, World
from mini_m3.demo import DemoSettings
from mini_m3.world_data import build_world_data
from mini_m3.evaluate import qa_eval
from mini_m3.train import ChunkedData, TrainConfig, continual_memory, pack_documents, train


def world_and_tokenizer(n_people: int):
    world = World.generate(n_people, seed=0)
    return world, Tokenizer.train(world.tokenizer_corpus(seed=0), 2048)


def plain_data(tok, docs, chunks_per_sequence: int = 1) -> ChunkedData:
    ids = tok.encode_batch([d.text for d in docs])
    tokens, targets = pack_documents(ids, 64, chunks_per_sequence, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                     pad_id=tok.pad_id)
    return ChunkedData(tokens, targets, torch.full((len(tokens), chunks_per_sequence), -1), [])


def new_model(preset: str, **overrides) -> Memory3:
    """A fresh model; the memory runs pass their memory format here (memory_selector="all": every reference
    token), so training, the banks and the saved config all read it from the model."""
    torch.manual_seed(0)
    return Memory3(Memory3Config.from_name(preset, vocab_size=2048, **overrides))


def cmd_verbatim(a) -> None:
    world, tok = world_and_tokenizer(2000)
    refs = tok.encode_batch(world.references())
    tokens, targets = pack_documents(refs, 64, 1, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    data = ChunkedData(tokens, targets, torch.arange(len(refs))[:, None], refs)
    model = new_model(a.preset, memories_per_chunk=1, memory_selector="all")
    train(model, data, TrainConfig(stage="continual", steps=a.steps, batch_size=32, lr=a.lr, quiet=True))
    rows = torch.arange(1900, 1964)
    with torch.no_grad():
        mem = continual_memory(model, data, rows, TrainConfig(stage="continual"))
        on = model(data.tokens[rows], targets=data.targets[rows], memory=mem).loss
        off = model(data.tokens[rows], targets=data.targets[rows]).loss
    print(f"verbatim copy from memory after {a.steps} steps: loss with memory {on:.3f}, without {off:.3f}")


def cmd_qa(a) -> None:
    world, tok = world_and_tokenizer(a.people)
    refs = world.references()
    mix = {k: float(v) for k, v in (kv.split("=") for kv in a.mix.split(","))}
    s = DemoSettings(n_people=a.people, n_docs=a.docs, chunks_per_sequence=1)
    docs = world.training_documents(a.docs, seed=0, mix=mix)
    data = build_world_data(world, tok, s, 64, Retriever().fit(refs), tok.encode_references(refs), False, docs=docs)
    over = {"memory_layers": tuple(int(x) for x in a.memory_layers.split(","))} if a.memory_layers else {}
    model = new_model(a.preset, memories_per_chunk=1, memory_selector="all", **over)
    print("memory layers", model.cfg.memory_layers, flush=True)
    items = world.eval_questions("heldout", 100, seed=1, phrasing="train")
    t0 = time.time()

    def evaluate(m, step):
        with tempfile.TemporaryDirectory() as d:
            bank = MemoryBank.build(d, m, tok, refs, overwrite=True, progress=False)
            out = {}
            for mode, k in (("memory", 1), ("memory", 5), ("rag", 1), ("none", None)):
                r = qa_eval(m, tok, items, mode=mode, bank=None if mode == "none" else bank, memories_per_chunk=k)
                out[f"{mode}{k or ''}"] = f"EM {r['accuracy']:.2f} loglik {r['answer_loglik']:.2f}"
        print(f"step {step + 1} ({time.time() - t0:.0f}s): held-out QA {out}", flush=True)
        return {}

    train(model, data, TrainConfig(stage="continual", steps=a.steps, batch_size=a.batch, lr=a.lr, quiet=True,
                                   eval_every=a.every), eval_fn=evaluate)
    # which tokens does memory help? (training-style QA documents the model has not trained on)
    test_docs = world.training_documents(64, seed=5, mix={"qa": 1.0})
    test = build_world_data(world, tok, s, 64, Retriever().fit(refs), tok.encode_references(refs), False, docs=test_docs)
    rows = torch.arange(len(test))
    with torch.no_grad():
        mem = continual_memory(model, test, rows, TrainConfig(stage="continual"))
        y = test.targets[rows]
        on = F.cross_entropy(model(test.tokens[rows], memory=mem).logits.transpose(1, 2), y, reduction="none")
        off = F.cross_entropy(model(test.tokens[rows]).logits.transpose(1, 2), y, reduction="none")
    x = test.tokens[rows]
    prev = torch.cat([x[:, :1], x[:, :-1]], 1)
    colon = tok.encode(" A:")[-1]
    a_tok = tok.encode(" A:")[0]
    is_answer = (x == colon) & (prev == a_tok) & (y >= 0)  # position whose target is the answer's first token
    first_names = {tok.encode(" " + p.first_name)[0] for p in world.people}
    is_surname = torch.tensor([[int(t) in first_names for t in row] for row in x.tolist()]) & (y >= 0)
    for name, mask in (("answer (first token)", is_answer), ("surname after a first name", is_surname),
                       ("all tokens", y >= 0)):
        print(f"{name:28s} loss with memory {on[mask].mean():.2f}, without {off[mask].mean():.2f} "
              f"({int(mask.sum())} positions)")


class TextbookGPT(nn.Module):
    """A textbook decoder (learned positions, LayerNorm, GELU), only as a control for `copy`."""

    def __init__(self, vocab: int, d: int = 64, layers: int = 4, heads: int = 4, T: int = 64):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(d, heads, 4 * d, 0.0, "gelu", batch_first=True,
                                                               norm_first=True) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, idx, targets=None, **_):
        T = idx.shape[1]
        h = self.emb(idx) + self.pos(torch.arange(T))
        mask = nn.Transformer.generate_square_subsequent_mask(T)
        for b in self.blocks:
            h = b(h, src_mask=mask, is_causal=True)
        logits = self.ln(h) @ self.emb.weight.T
        loss = None if targets is None else F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100)
        return type("Out", (), {"logits": logits, "loss": loss})


def cmd_copy(a) -> None:
    world, tok = world_and_tokenizer(2000)
    docs = world.training_documents(8000, seed=0, mix={"skill": 1.0}, skill_kinds=("copy",))
    data = plain_data(tok, docs)
    copy_id = tok.encode("\nCopy:")[1]  # the "Copy" token; everything after it is predictable by copying
    x, y = data.tokens[-256:], data.targets[-256:]
    mask = ((x == copy_id).cumsum(1) > 0) & (y >= 0)
    mask &= x != copy_id  # skip the trivial "Copy" -> ":"
    if a.textbook:
        torch.manual_seed(0)
        model = TextbookGPT(2048)
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))
        g = torch.Generator().manual_seed(0)
        for step in range(a.steps):
            rows = torch.randint(0, len(data) - 256, (32,), generator=g)
            loss = model(data.tokens[rows], data.targets[rows]).loss
            opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
            if (step + 1) % a.every == 0:
                with torch.no_grad():
                    acc = (model(x).logits.argmax(-1) == y)[mask].float().mean()
                print(f"textbook GPT step {step + 1}: copied-half token accuracy {acc:.3f}", flush=True)
        return
    model = new_model(a.preset)

    def evaluate(m, step):
        with torch.no_grad():
            acc = (m(x).logits.argmax(-1) == y)[mask].float().mean()
        print(f"{a.preset} step {step + 1}: copied-half token accuracy {acc:.3f}", flush=True)
        return {}

    train(model, data, TrainConfig(stage="warmup", steps=a.steps, batch_size=32, lr=a.lr, quiet=True,
                                   eval_every=a.every), eval_fn=evaluate)


def cmd_reading(a) -> None:
    world, tok = world_and_tokenizer(2000)
    data = plain_data(tok, world.training_documents(20000, seed=0, mix={"reading": 1.0}), 4)
    items = []
    for d in world.training_documents(300, seed=99, mix={"reading": 1.0}):
        before, answer = d.text.rsplit(" A: ", 1)
        items.append(QAItem(-1, d.detail, "", answer, before + " A:"))
    model = new_model(a.preset)

    def evaluate(m, step):
        print(f"{a.preset} step {step + 1}: in-context reading EM {qa_eval(m, tok, items)['accuracy']:.3f}", flush=True)
        return {}

    train(model, data, TrainConfig(stage="warmup", steps=a.steps, batch_size=8, lr=a.lr, quiet=True,
                                   eval_every=a.every), eval_fn=evaluate)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=["verbatim", "qa", "copy", "reading"],
                   help="the diagnostic: verbatim (memory = the chunk's own reference), qa (continual training on "
                        "world documents), copy (the copy skill alone), reading (in-context reading, no memory)")
    p.add_argument("--preset", default="tiny", help="model preset (Memory3Config.from_name; not copy --textbook)")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    p.add_argument("--every", type=int, default=100, help="qa, copy, reading: evaluate every N steps")
    p.add_argument("--people", type=int, default=2000, help="qa: people in the world (the others use 2000)")
    p.add_argument("--docs", type=int, default=12000, help="qa: training documents")
    p.add_argument("--batch", type=int, default=32, help="qa: sequences per step (the others use fixed sizes)")
    p.add_argument("--mix", default="qa=1", help="qa: training document mix, KIND=WEIGHT,... e.g. qa=0.8,bio=0.2")
    p.add_argument("--textbook", action="store_true",
                   help="copy: train a textbook GPT (learned positions, LayerNorm, GELU) instead, as a control")
    p.add_argument("--memory-layers", default=None, help="qa: comma-separated memory layers (None: the first half)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    {"verbatim": cmd_verbatim, "qa": cmd_qa, "copy": cmd_copy, "reading": cmd_reading}[a.what](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
