"""Issue 15: which levers make a mini model read memory in the paper's format (top-8 tokens, 5 memories)?

One run = `mini_m3.reading.run_reading` with the settings given here; each run writes OUT/results.json (argv, commit,
seed, versions). `experiments/README.md`, "Reading in the paper's format (issue 15)", keeps the table of runs,
failures included.

    python experiments/reading_levers.py --out runs/base --preset small --continual-steps 2000
    python experiments/reading_levers.py --out runs/deep --model n_layers=8 --curriculum-steps 300
    python experiments/reading_levers.py table runs/*/results.json     # the markdown table of runs
    python experiments/reading_levers.py seeds runs/s0/results.json runs/s1/results.json  # mean [min, max] per axis
    python experiments/reading_levers.py formats OUT.json runs/a runs/b  # each model read in 4 memory formats
    python experiments/reading_levers.py diagnose OUT.json runs/a runs/b # kept answer tokens, top-16, distractors
    python experiments/reading_levers.py sink OUT.json runs/a runs/b     # where memory attention goes
    python experiments/reading_levers.py kept OUT.json runs/a runs/b     # held-out answer tokens the top-8 keeps
    python experiments/reading_levers.py first OUT.json runs/a runs/b    # each attribute's first answer token, by steps
    python experiments/reading_levers.py forced OUT.json runs/a runs/b   # top-8 with the answer forced in (diagnostic)
    python experiments/reading_levers.py questions OUT.json runs/a     # top-8 ranked by training questions' queries
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from mini_m3.config import MEMORY_SELECTORS
from mini_m3.reading import ReadingSettings, run_reading

# --help of the flags made from ReadingSettings' fields (all but model and progress)
SETTING_HELP = {
    "seed": "seed of the world, documents, initialisation, questions and banks",
    "preset": "model preset (Memory3Config.from_name; --model overrides its fields)",
    "n_people": "people in the BioWorld",
    "n_docs": "training documents",
    "name_share": "people per first / last name (look-alikes; BioWorld.generate)",
    "value_share": "people per generated city / company",
    "wordings": "BioWorld wordings: 'base', 'wide' for more training biography and question templates, or "
                "'compositional' for hundreds more per attribute, or 'neutral': those, and 30 % of training "
                "biography sentences name no attribute, only its value (levers; the held-out families are unchanged)",
    "vocab_size": "tokenizer vocabulary (trained on training text only)",
    "bio_fraction": "share of training documents that are biographies (the rest: QA)",
    "max_qa": "at most this many questions (about one person) per QA document",
    "batch_size": "sequences per step",
    "warmup_steps": "no-memory warmup steps (0: none)",
    "continual_steps": "steps of the main continual (memory) stage",
    "curriculum_steps": "continual steps reading only the top-1 memory, before the main continual stage (a lever)",
    "lr": "peak learning rate",
    "eval_questions": "questions per evaluation axis",
    "eval_every": "held-out QA every N continual steps (a temporary bank each time; 0: none)",
    "soft_selection": "start temperature of soft top-k selection in the main continual stage (a lever; 0: the "
                      "paper's hard top-k)",
    "soft_selection_until": "fraction of the continual steps where soft selection and selection distillation end",
    "soft_selection_gate": "what soft selection's slot weight scales: 'logit' (the slot's attention score) or "
                           "'logit+value' (its value too, so the reader cannot outbid a small weight; a lever)",
    "selection_distill": "weight of selection distillation in the main continual stage (a lever; 0: off)",
    "selection_target": "what selection distillation fits the top-k score to: 'attention' (the reader's "
                        "attention per token) or 'attribution' (max(0, -dLoss/d slot log-weight))",
    "format_mix": "share of the main continual stage's steps (evenly spaced) that read every token of the chunk's "
                  "own memory instead of the model's format (a lever; 0 = the paper's format throughout)",
    "memory_grad": "gradients flow through the live reference encoding in continual training (the paper's natural "
                   "reading); --no-memory-grad encodes references without them (a lever: a cheaper step, no "
                   "gradient reaches the writer)",
    "shared_memories": "groups of 5 one-chunk sequences read one set of references, each chunk's own top-1 "
                       "retrieval first, then the other members' (the leader's retrieved look-alikes where they have "
                       "chunks): one reference encoded per chunk, as the paper's training reads its own and the "
                       "previous 4 chunks' (a lever: about 1/5 of the encoding per step)",
    "stages": "later continual stages as a JSON list, each {\"steps\": N} with optional \"lr\", \"selector\" "
              "and \"memories_per_chunk\" (default: the model's format): a format chain in one run, each stage "
              "with its own optimizer and schedule, as a continuation would have",
    "init_model": "continue from a run's OUT/model, trained with the same settings but steps and memory format "
                  "(empty: a fresh model)",
    "threads": "torch and faiss threads",
}


def parse_model(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, _, v = it.partition("=")
        out[k] = json.loads(v) if v[:1] in "0123456789-[{tf" else v
    return out


def table(paths: list[str]) -> str:
    """One markdown row per results.json: the levers of the run, then memory / off for every axis. The model is
    written `6L d64 kv8x16`: layers, width, KV heads x head dim, with `q40` before the KV heads where the query heads
    are more (grouped-query attention: `6L d64 q40 kv8x16`). (Runs before name_share / value_share existed used
    4 / 8.)"""
    from mini_m3.reading import AXES
    rows = ["| run | world (people per name / value, vocab) | model, memory format | steps: warmup + 1-memory "
            "curriculum + main | " + " | ".join(AXES) + " |", "|---|---|---|---|" + "---|" * len(AXES)]
    for path in paths:
        r = json.loads(open(path).read())
        s, c = r["settings"], r["config"]
        query = f"q{c['n_heads']} " if c["n_heads"] != c["n_kv_heads"] else ""  # GQA: query heads per KV head > 1
        model = (f"{c['n_layers']}L d{c['d_model']} {query}kv{c['n_kv_heads']}x{c['head_dim']}, "
                 f"memory layers {c['memory_layers']}, "
                 f"{r['memory_settings']['selector']}/{r['memory_settings']['tokens_per_head']}/"
                 f"{r['memory_settings']['memories_per_chunk']}")
        if c.get("memory_selection_queries"):  # the "learned" selector's queries (deviation 73)
            model += f", {c['memory_selection_queries']} selection queries per head"
        if s.get("soft_selection"):  # training-time levers of the top-k (deviations 70, 71)
            model += f", soft selection T0 {s['soft_selection']} to {s['soft_selection_until']}"
            if s.get("soft_selection_gate", "logit") != "logit":
                model += f" ({s['soft_selection_gate']} gate)"
        if s.get("selection_distill"):
            target = s.get("selection_target", "attention")
            model += (f", selection distillation{'' if target == 'attention' else ' (' + target + ')'} "
                      f"{s['selection_distill']} to {s['soft_selection_until']}")
        if s.get("format_mix"):  # every so many steps read all tokens of 1 memory (a lever, point 29)
            model += f", format mixing {s['format_mix']:g} (all tokens, 1 memory)"
        if s.get("shared_memories"):  # groups of chunks read one set of references (a lever, point 43)
            model += ", shared memories (one reference encoded per chunk)"
        if not s.get("memory_grad", True):  # references encoded without gradients in training (a lever, point 32)
            model += ", no gradient through reference encoding"
        cells = [f"{r['axes'][a]['memory']:.3f} / {r['axes'][a]['memory_off']:.3f}" for a in AXES]
        world = f"{s.get('name_share', 4)} / {s.get('value_share', 8)}, {s['vocab_size']}"
        if s.get("wordings", "base") != "base":
            world += f", {s['wordings']} wordings"
        init = f" (from `{s['init_model']}`)" if s.get("init_model") else ""
        if s.get("lr", 2e-3) != 2e-3:  # the default peak learning rate is left unsaid
            init += f", peak LR {s['lr']:g}"
        for st in s.get("stages", []):  # the format chain after the main stage: steps, format, LR
            fmt = f"{st.get('selector', r['memory_settings']['selector'])}/" \
                  f"{st.get('memories_per_chunk', r['memory_settings']['memories_per_chunk'])}"
            init += f" + {st['steps']} {fmt} at LR {st.get('lr', s.get('lr', 2e-3)):g}"
        rows.append(f"| `{path}` | {world} | {model} | {s['warmup_steps']} + {s['curriculum_steps']} + "
                    f"{s['continual_steps']}{init} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


SEED_FREE = ("seed", "progress")  # settings that may differ between the seeds of one command


def seeds(paths: list[str]) -> str:
    """One command's seeds side by side: per axis each run's memory (memory off) exact match and the mean [min, max]
    of memory over the runs, then the held-out people's exact match per attribute. Refuses results whose settings
    (other than the seed) or model config differ, and repeated seeds: a spread over seeds only means something for
    one command."""
    from mini_m3.demo import AXIS_NAMES  # the demo's axis labels (indented there for its console table)
    from mini_m3.reading import AXES
    rs = [json.loads(open(p).read()) for p in paths]
    if len(rs) < 2:
        raise ValueError(f"seeds needs the results of at least 2 seeds, got {len(rs)}")
    strip = lambda st: {k: v for k, v in st.items() if k not in SEED_FREE}
    for p, r in zip(paths[1:], rs[1:]):
        diff = sorted(k for k in set(strip(r["settings"])) | set(strip(rs[0]["settings"]))
                      if r["settings"].get(k) != rs[0]["settings"].get(k))
        if diff or r["config"] != rs[0]["config"]:
            raise ValueError(f"{p} is another command than {paths[0]}: settings {diff or 'equal'}, config "
                             f"{'equal' if r['config'] == rs[0]['config'] else 'differs'}")
    seed_list = [r["settings"]["seed"] for r in rs]
    if len(set(seed_list)) != len(seed_list):
        raise ValueError(f"repeated seeds {seed_list}: each run must be another seed")
    head = "| 200 questions per axis, memory (memory off) | " + " | ".join(f"seed {x}" for x in seed_list)
    rows = [head + " | mean [min, max] |", "|---|" + "---|" * (len(rs) + 1)]
    for a in AXES:
        mem = [r["axes"][a]["memory"] for r in rs]
        cells = [f"{r['axes'][a]['memory']:.3f} ({r['axes'][a]['memory_off']:.3f})" for r in rs]
        rows.append(f"| {AXIS_NAMES[a].strip()} | " + " | ".join(cells) +
                    f" | {sum(mem) / len(mem):.3f} [{min(mem):.3f}, {max(mem):.3f}] |")
    attrs = list(rs[0]["axes"]["heldout"]["by_attribute"]["memory"])
    per = [" / ".join(f"{r['axes']['heldout']['by_attribute']['memory'][x]['exact_match']:.2f}" for x in attrs)
           for r in rs]
    rows.append(f"| held-out {' / '.join(x.replace('_', ' ') for x in attrs)} | " + " | ".join(per) + " | |")
    return "\n".join(rows)


def run_world(run_dir: str):
    """The settings of a run (its results.json, no progress output) and its rebuilt world: (settings,
    `build_reading_data`'s tuple). Diagnostics rebuild the world of the first run and read every run in it."""
    from mini_m3.reading import build_reading_data
    settings = json.loads((Path(run_dir) / "results.json").read_text())["settings"]
    s = ReadingSettings(**{**settings, "progress": False})
    return s, build_reading_data(s)


def run_model(run: str, tok, first: str):
    """A run's model, refused if its tokenizer is not the world's (`tok`, the world of run `first`)."""
    from mini_m3.checkpoint import load_pretrained
    model, run_tok = load_pretrained(Path(run) / "model")
    assert run_tok.fingerprint() == tok.fingerprint(), f"{run}: another tokenizer than {first}"
    return model


FORMATS = (("all", 1), ("all", 5), ("attention", 1), ("attention", 5))
OWN_TOP_K = ("learned", "disjoint", "headmax")  # top-k selectors a model may be trained with instead of the paper's


def own_top_k(model) -> str:
    """The top-k selector a diagnostic reads `model` with: its own if it was trained with a named top-k lever
    (`OWN_TOP_K`), else the paper's "attention" (e.g. for a model trained with all tokens)."""
    return model.cfg.memory_selector if model.cfg.memory_selector in OWN_TOP_K else "attention"


def read_bank(m, tok, refs: list[str], items, memories=None) -> dict:
    """`qa_eval` of `items` (its "correct": which ones model `m` answers exactly) reading memory from a temporary bank
    of `refs` in its own format (its memories computed by `m`, or given: an iterable of `ExplicitMemory` batches in
    reference order)."""
    import tempfile

    import torch

    from mini_m3.evaluate import qa_eval
    from mini_m3.memory.bank import MemoryBank
    from mini_m3.memory.retrieve import Retriever

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        bank = MemoryBank.build(Path(tmp) / "bank", m, tok, refs, retriever=Retriever(), progress=False,
                                memories=memories)
        return qa_eval(m, tok, items, mode="memory", bank=bank)


def formats(run_dirs: list[str], out: str, n: int = 200, only: str | None = None) -> dict:
    """Which half of the paper's format breaks reading: each run's model read in all four combinations of
    {all tokens, top-8} x {1, 5 memories} (and with 8 tokens per head of its own selector if it was trained with
    another, e.g. "disjoint", and of "headmax" if its KV heads serve several query heads) on the held-out axis (its
    bank rebuilt in each format through `with_memory_format`, a deliberate ablation), in all and per asked attribute
    (`by_attribute`: exact match, the first answer token, the later ones). only: read the formats of this selector
    alone (`--only SELECTOR`). All runs must share the world settings of the first."""
    from mini_m3.reading import by_attribute, reading_questions
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_json

    s, (world, others, tok, cfg, refs, data, docs) = run_world(run_dirs[0])
    items = reading_questions(world, others, n, s.seed)["heldout"]
    result = {"question_set": "heldout", "n": n, "runs": {}}
    for run in run_dirs:
        model = run_model(run, tok, run_dirs[0])
        row, per = {}, {}
        own = model.cfg.memory_selector  # a model trained with another selector is also read with its own
        extra = ((own, 1), (own, 5)) if own not in ("attention", "all") else ()
        if model.cfg.n_query_groups > 1 and own != "headmax":  # open choice 2's other reading: max, not sum
            extra += (("headmax", 1), ("headmax", 5))
        for sel, k in FORMATS + extra:
            if only is not None and sel != only:
                continue
            m = model.with_memory_format(selector=sel, tokens_per_head=None if sel == "all" else 8,
                                         memories_per_chunk=k)
            r = read_bank(m, tok, refs, items)
            row[f"{sel}/{k}"] = r["accuracy"]
            per[f"{sel}/{k}"] = by_attribute(items, r)
            print(run, sel, k, f"{row[f'{sel}/{k}']:.3f}",
                  {a: f"{v['exact_match']:.2f} (first {v['first_piece']:.2f})" for a, v in per[f"{sel}/{k}"].items()},
                  flush=True)
        if not row:
            raise SystemExit(f"{run}: no format of selector {only!r} to read (its formats: "
                             f"{sorted({sel for sel, _ in FORMATS + extra})})")
        result["runs"][run] = {"trained_in": model.cfg.memory_format, "heldout_qa": row,
                               "heldout_qa_by_attribute": per}
    write_json(out, result, seed=s.seed)
    return result


class _ChosenDistractors:
    """A bank whose search returns the asked person's biography first and `kind` distractors after it: "retrieved"
    (retrieval's other candidates: look-alikes) or "random" (people drawn at random, as the paper's training
    reads the previous chunks' unrelated references). It reads the label (the asked person): a diagnostic of what
    breaks reading, never an evaluation."""

    def __init__(self, bank, people: list[int], kind: str, n_bank: int, seed: int = 0):
        import numpy as np
        self._bank, self._people, self._kind, self._n, self._i = bank, people, kind, n_bank, 0
        self._rng = np.random.default_rng(seed)

    def __getattr__(self, name):
        return getattr(self._bank, name)

    def __len__(self):
        return len(self._bank)

    def search(self, prompts, k, **kw):
        rows = []
        for row in self._bank.search(prompts, k, **kw):
            own = self._people[self._i]
            self._i += 1
            if self._kind == "retrieved":
                others = [r for r in row if r != own]
            else:
                others = [int(x) for x in self._rng.choice(self._n, k + 1, replace=False) if x != own]
            rows.append([own] + others[:k - 1])
        return rows


def answer_span(tok, ids: list[int], value: str) -> list[int] | None:
    """Token positions of an answer `value` inside a reference's token ids (its first occurrence), or None."""
    for v in (tok.encode(" " + value), tok.encode(value)):
        hits = [i for i in range(len(ids) - len(v) + 1) if ids[i:i + len(v)] == v]
        if hits:
            return list(range(hits[0], hits[0] + len(v)))
    return None


def kept_by_head(mem, offset: int) -> list[list[set[int]]]:
    """The token indices (in the reference, after removing the `offset`-token prefix) that each memory head of the
    first reference of ExplicitMemory `mem` keeps: [memory layer][KV head] -> set."""
    return [[set((mem.positions[0, l, h][mem.mask[0, l, h]] - offset).tolist()) for h in range(mem.positions.shape[2])]
            for l in range(mem.positions.shape[1])]


def answer_tokens_kept(model, tok, refs: list[str], people, k: int = 8, score_queries=None) -> dict:
    """How much of each answer the top-k selection (attention received, k tokens per KV head; from the learned
    selection queries for a "learned" model, divided among the heads for a "disjoint" one) keeps in `people`'s
    bank biographies: per attribute, the share of the answer's tokens kept in each memory layer ("per_layer") and in
    some memory layer ("any_layer"), and of answers whose first token some layer keeps ("first_any_layer"); and
    "any_layer" pooled over every answer token ("pooled_any_layer").
    score_queries: rank by the attention from these queries instead (`encode_reference_tokens`)."""
    import numpy as np
    import torch

    from mini_m3.data.bios import ATTRIBUTES
    from mini_m3.memory.encode import encode_reference_tokens

    scored = own_top_k(model)
    top = model.with_memory_format(selector=scored, tokens_per_head=k, memories_per_chunk=5)
    kept = {a: {"per_layer": [], "any_layer": [], "first_any_layer": []} for a in ATTRIBUTES}
    pooled, whole_layer, whole_head, distinct, name_layer, both_layer = [], [], [], [], [], []
    for p in people:
        ids = tok.encode_references([refs[p.pid]])[0]
        with torch.no_grad():
            mem = encode_reference_tokens(top, [ids], score_queries=score_queries)
        off = model.cfg.prefix_length
        heads = kept_by_head(mem, off)
        layers = [set().union(*hs) for hs in heads]
        distinct += [len(L) / sum(map(len, hs)) for L, hs in zip(layers, heads)]  # 1: no head repeats another's
        name = answer_span(tok, ids, p.name)  # the full name's first mention (the introduction); None: not counted
        name = set(name) if name else None
        if name:
            name_layer.append(any(name <= L for L in layers))
        for a in ATTRIBUTES:
            sp = answer_span(tok, ids, p.facts()[a])
            if sp:
                kept[a]["per_layer"].append(np.mean([[i in L for i in sp] for L in layers]))
                kept[a]["any_layer"].append(np.mean([any(i in L for L in layers) for i in sp]))
                kept[a]["first_any_layer"].append(any(sp[0] in L for L in layers))  # the answer's first token
                pooled += [any(i in L for L in layers) for i in sp]
                whole_layer.append(any(set(sp) <= L for L in layers))
                whole_head.append(any(set(sp) <= H for hs in heads for H in hs))
                if name:
                    both_layer.append(any((set(sp) | name) <= L for L in layers))
    return {"per_attribute": {a: {key: float(np.mean(v)) for key, v in d.items()} for a, d in kept.items()},
            "pooled_any_layer": float(np.mean(pooled)), "n_answer_tokens": len(pooled),
            # exact match needs every piece: the share of answers kept whole by one memory layer (its heads
            # together) and by one head
            "whole_answer_one_layer": float(np.mean(whole_layer)), "whole_answer_one_head": float(np.mean(whole_head)),
            # distinct tokens a memory layer keeps over its kept slots (1: no two heads keep the same token)
            "distinct_tokens_per_slot": float(np.mean(distinct)),
            # which memory is about the asked person: the full name kept whole by one memory layer, and the name
            # together with a whole answer (what reading one of 5 memories needs from one layer)
            "whole_name_one_layer": float(np.mean(name_layer)),
            "whole_answer_and_name_one_layer": float(np.mean(both_layer))}


def layer_copies(model, tok, refs: list[str], people, k: int = 8) -> dict:
    """What the top-k score (the paper's attention received, k tokens per KV head) would keep of the answers in
    `people`'s bank biographies if every layer were a memory layer: the model's weights as they are, each layer
    scored on its own queries and keys (a layer that is not a memory layer has never written or read memories, so
    this says what a lever adding it would start from, not what it would read). Per layer, the mean number of KV heads
    keeping an answer token ("heads_per_answer_token"); per set of memory layers (the model's own, its own plus each
    other layer, every layer), the share of answer tokens some head keeps ("kept"; "kept_later": the tokens after
    an answer's first), the mean number of heads keeping one ("mean_heads") and the shares kept by 2 or more and by
    4 or more heads (point 33: a token 4-7 heads keep is read 0.92-1.00, one that one head keeps 0.68-0.82)."""
    import numpy as np
    import torch

    from mini_m3.data.bios import ATTRIBUTES
    from mini_m3.memory.encode import encode_reference_tokens
    from mini_m3.model import Memory3

    selector = own_top_k(model)
    if selector == "learned":
        raise ValueError("layers: learned selection queries exist only in the memory layers a model was trained with")
    cfg = model.cfg.with_memory_format(selector, k, 5)
    every = Memory3(cfg.replace(memory_layers=tuple(range(cfg.n_layers))))
    missing, unexpected = every.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)  # memory layers add no parameters
    every.eval()
    copies, first = [], []  # per answer token: heads keeping it in each layer; is it its answer's first token
    for p in people:
        ids = tok.encode_references([refs[p.pid]])[0]
        with torch.no_grad():
            heads = kept_by_head(encode_reference_tokens(every, [ids]), cfg.prefix_length)
        for a in ATTRIBUTES:
            for j, i in enumerate(answer_span(tok, ids, p.facts()[a]) or []):
                copies.append([sum(i in h for h in layer) for layer in heads])
                first.append(j == 0)
    c, later = np.array(copies), ~np.array(first)
    own = list(model.cfg.memory_layers)
    sets = {"own": own, **{f"own+{l}": sorted(own + [l]) for l in range(cfg.n_layers) if l not in own},
            "every": list(range(cfg.n_layers))}
    rows = {}
    for name, layers in sets.items():
        n = c[:, layers].sum(1)
        rows[name] = {"layers": layers, "kept": float((n > 0).mean()), "kept_later": float((n[later] > 0).mean()),
                      "mean_heads": float(n.mean()), "heads_2_or_more": float((n >= 2).mean()),
                      "heads_4_or_more": float((n >= 4).mean())}
    return {"n_answer_tokens": len(c), "heads_per_answer_token": c.mean(0).tolist(), "layer_sets": rows}


def layers(run_dirs: list[str], out: str, n_bios: int = 100) -> dict:
    """`layer_copies` over the first `n_bios` held-out bank biographies, per run: would more memory layers keep each
    answer token in more heads? All runs must share the world settings of the first."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_json

    s, (world, others, tok, cfg, refs, data, docs) = run_world(run_dirs[0])
    heldout = [p for p in world.people if p.split == "heldout"][:n_bios]
    result = {"n_biographies": n_bios, "k": 8, "runs": {}}
    for run in run_dirs:
        r = result["runs"][run] = layer_copies(run_model(run, tok, run_dirs[0]), tok, refs, heldout)
        print(run, [round(x, 2) for x in r["heads_per_answer_token"]], flush=True)
        for name, row in r["layer_sets"].items():
            print(f"  {name:8s} {row['layers']}: kept {row['kept']:.3f} (later {row['kept_later']:.3f}), "
                  f"heads {row['mean_heads']:.2f}, 2+ {row['heads_2_or_more']:.3f}, 4+ {row['heads_4_or_more']:.3f}",
                  flush=True)
    write_json(out, result, seed=s.seed)
    return result


def kept(run_dirs: list[str], out: str, n_bios: int = 100) -> dict:
    """The share of held-out answer tokens each run's top-8 selection keeps (`answer_tokens_kept`), over the first
    `n_bios` held-out bank biographies, and over the first `n_bios` told in each wording family ("by_bio_family":
    does the selection keep the answers of biographies in wordings training never used?). All runs must share the
    world settings of the first."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_json

    from mini_m3.data.bios import FAMILIES

    s, (world, others, tok, cfg, refs, data, docs) = run_world(run_dirs[0])
    heldout = [p for p in world.people if p.split == "heldout"]
    result = {"n_biographies": n_bios, "k": 8, "runs": {}}
    for run in run_dirs:
        model = run_model(run, tok, run_dirs[0])
        result["runs"][run] = answer_tokens_kept(model, tok, refs, heldout[:n_bios])
        result["runs"][run]["by_bio_family"] = {
            f: answer_tokens_kept(model, tok, refs, [p for p in heldout if p.bio_family == f][:n_bios])
            for f in FAMILIES}
        r = result["runs"][run]
        print("  by biography wording family:", {f: round(v["pooled_any_layer"], 3)
                                                  for f, v in r["by_bio_family"].items()}, flush=True)
        print(run, f"{r['pooled_any_layer']:.3f} whole: {r['whole_answer_one_layer']:.3f} (layer) "
                   f"{r['whole_answer_one_head']:.3f} (head); distinct per slot {r['distinct_tokens_per_slot']:.3f}; "
                   f"name {r['whole_name_one_layer']:.3f}, name and answer {r['whole_answer_and_name_one_layer']:.3f}",
              flush=True)
    write_json(out, result, seed=s.seed)
    return result


def diagnose(run_dirs: list[str], out: str, n: int = 200, n_bios: int = 100) -> dict:
    """What stops a model from reading in the paper's format, on the held-out axis: (1) the share of each
    attribute's answer tokens that the top-8 selection keeps (per memory layer, and in any memory layer), over
    `n_bios` held-out bank biographies; (2) held-out QA read with 8 and 16 tokens per head (more tokens kept per
    head stand in for more KV heads), 1 and 5 memories; (3) 5 memories with the right biography always first and
    the other 4 either retrieval's look-alikes or random people (label-reading diagnostic). All runs must share
    the world settings of the first."""
    import tempfile

    import torch

    from mini_m3.evaluate import qa_eval
    from mini_m3.memory.bank import MemoryBank
    from mini_m3.memory.retrieve import Retriever
    from mini_m3.reading import reading_questions
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_json

    s, (world, others, tok, cfg, refs, data, docs) = run_world(run_dirs[0])
    items = reading_questions(world, others, n, s.seed)["heldout"]
    heldout = [p for p in world.people if p.split == "heldout"][:n_bios]

    result = {"question_set": "heldout", "n": n, "n_biographies": n_bios, "runs": {}}
    for run in run_dirs:
        model = run_model(run, tok, run_dirs[0])
        row = {"answer_tokens_kept_top8": answer_tokens_kept(model, tok, refs, heldout)["per_attribute"]}
        qa = {}
        for k_tok, k_mem in ((8, 1), (8, 5), (16, 1), (16, 5)):
            m = model.with_memory_format(selector="attention", tokens_per_head=k_tok, memories_per_chunk=k_mem)
            with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
                bank = MemoryBank.build(Path(tmp) / "bank", m, tok, refs, retriever=Retriever(), progress=False)
                qa[f"top{k_tok}/{k_mem}"] = qa_eval(m, tok, items, mode="memory", bank=bank)["accuracy"]
                if k_tok == 8 and k_mem == 5:
                    for kind in ("retrieved", "random"):
                        b = _ChosenDistractors(bank, [it.person for it in items], kind, len(refs) - len(others),
                                               seed=s.seed)
                        qa[f"top8/5, own first + {kind} distractors"] = qa_eval(m, tok, items, mode="memory",
                                                                               bank=b)["accuracy"]
            print(run, {k: round(v, 3) for k, v in qa.items()}, flush=True)
        row["heldout_qa"] = qa
        result["runs"][run] = {"trained_in": model.cfg.memory_format, **row}
        print(run, json.dumps(row["answer_tokens_kept_top8"]), flush=True)
    write_json(out, result, seed=s.seed)
    return result


CONTEXT = 3  # `forced`: tokens before the answer forced with it in its second variant


def forced(run_dirs: list[str], out: str, n: int = 200) -> dict:
    """Is the top-8 selection the whole wall, or can the reader not read 8 tokens per head? Each run's model read
    in the paper's format (top-8, 5 memories) on the held-out axis four ways: as it is; with the asked attribute's
    answer tokens forced into every memory head's kept set in every biography of the bank (`encode_reference_tokens`
    `force=`, the rest of the 8 slots by attention received as usual); the same with the CONTEXT tokens before the
    answer forced too (the words that say what the value is); and with all tokens kept (the reader's ceiling).
    Forcing reads the labels: a diagnostic of the kept set, never an evaluation or a lever. All runs must share the
    world settings of the first."""
    import torch

    from mini_m3.data.bios import ATTRIBUTES
    from mini_m3.memory.encode import encode_reference_tokens
    from mini_m3.reading import reading_questions
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_json

    s, (world, others, tok, cfg, refs, data, docs) = run_world(run_dirs[0])
    items = reading_questions(world, others, n, s.seed)["heldout"]
    people = list(world.people) + list(others)  # index = pid = bank row
    ids = tok.encode_references(refs)
    # each bank reference's answer span per attribute (None: not found, nothing forced), found once for all runs
    spans = {a: [answer_span(tok, r, p.facts()[a]) for r, p in zip(ids, people)] for a in ATTRIBUTES}
    by_attr = {a: [i for i, it in enumerate(items) if it.attribute == a] for a in ATTRIBUTES}

    def forced_memories(m, attribute, before=0, batch=64):  # the bank's memories with `attribute`'s answer forced
        for b in range(0, len(ids), batch):                   # (and the `before` tokens that precede it)
            rows = ids[b:b + batch]
            force = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.bool)
            for i, span in enumerate(spans[attribute][b:b + batch]):
                if span:
                    force[i, list(range(max(0, span[0] - before), span[0])) + span] = True
            yield encode_reference_tokens(m, rows, force=force, pad_id=tok.pad_id,
                                          reference_ids=range(b, b + len(rows)))

    def read(m, its, memories=None):
        return read_bank(m, tok, refs, its, memories)["correct"]

    result = {"question_set": "heldout", "n": n, "format": "attention/8/5", "runs": {}}
    for run in run_dirs:
        model = run_model(run, tok, run_dirs[0])
        top = model.with_memory_format(selector="attention", tokens_per_head=8, memories_per_chunk=5)
        rows = {"top8": read(top, items),
                "all tokens": read(model.with_memory_format(selector="all", memories_per_chunk=5), items)}
        for name, before in (("top8, answer forced", 0), (f"top8, answer and the {CONTEXT} tokens before it forced",
                                                          CONTEXT)):
            hit = [False] * len(items)
            for a, idx in by_attr.items():
                if idx:
                    for i, ok in zip(idx, read(top, [items[i] for i in idx], forced_memories(top, a, before))):
                        hit[i] = bool(ok)
            rows[name] = hit
        row = {k: float(sum(v) / len(v)) for k, v in rows.items()}
        row["per_attribute"] = {k: {a: float(sum(v[i] for i in idx) / max(1, len(idx))) for a, idx in by_attr.items()}
                                for k, v in rows.items()}
        result["runs"][run] = {"trained_in": model.cfg.memory_format, "heldout_qa": row, "answer_span_found": {
            a: sum(sp is not None for sp in spans[a]) / len(ids) for a in by_attr if by_attr[a]}}
        print(run, {k: round(v, 3) for k, v in row.items() if k != "per_attribute"}, flush=True)
    write_json(out, result, seed=s.seed)
    return result


def question_queries(model, tok, items, where: str = "answer") -> list:
    """Each memory layer's queries (before RoPE, (P, H, d_h)) where QA text asks for an answer: `items`' prompt and
    answer run through `model` with memory off, and the queries kept at the positions that predict an answer
    token (where="answer"), or at every position (where="all")."""
    import torch

    if where not in ("answer", "all"):
        raise ValueError(f"where must be 'answer' or 'all', got {where!r}")
    layers = model.cfg.memory_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in layers]
    out = {l: [] for l in layers}
    with torch.no_grad():
        for it in items:
            prompt, answer = [tok.bos_id] + tok.encode(it.prompt), tok.encode(" " + it.answer)
            _, cache = model.run_with_cache(torch.tensor([prompt + answer]), names=names)
            pos = (list(range(len(prompt) - 1, len(prompt) + len(answer) - 1)) if where == "answer"
                   else list(range(len(prompt) + len(answer))))
            for l, name in zip(layers, names):
                block = model.blocks[l]
                q, _, _ = block.attn.project(block.attn_norm(cache[name]))  # (1, H, T, d_h)
                out[l].append(q[0, :, pos].transpose(0, 1))  # (len(pos), H, d_h)
    return [torch.cat(out[l]) for l in layers]


def questions(run_dirs: list[str], out: str, n: int = 200, n_askers: int = 300, n_bios: int = 100) -> dict:
    """A selection score aimed at what later text asks about (point 18): each run's model read in the paper's format
    (top-8 per KV head, 5 memories; held-out axis) with its tokens ranked by the attention they receive (no RoPE, no
    mask, as the paper's score) from the queries of training questions at the positions that predict the answer
    (`question_queries` over `n_askers` QA items about trained people in training wordings, memory off), instead
    of from the reference's own tokens; and from as many queries drawn from every position of the same QA text
    (the control: is it where the queries ask, or only that other tokens ask?). The held-out people, values
    and answers never reach the queries. Also the share of answer tokens each score keeps (`answer_tokens_kept`,
    `n_bios` held-out biographies). The model is not trained with this score: a named lever's first measurement.
    All runs must share the world settings of the first."""
    import torch

    from mini_m3.memory.encode import encode_reference_tokens
    from mini_m3.reading import reading_questions
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_json

    s, (world, others, tok, cfg, refs, data, docs) = run_world(run_dirs[0])
    items = reading_questions(world, others, n, s.seed)["heldout"]
    askers = world.eval_questions("memory", n_askers, seed=s.seed + 1, question_family="train")
    heldout = [p for p in world.people if p.split == "heldout"][:n_bios]
    ids = tok.encode_references(refs)

    def memories(m, queries, batch=64):  # the bank's memories ranked by the queries' attention
        for b in range(0, len(ids), batch):
            yield encode_reference_tokens(m, ids[b:b + batch], pad_id=tok.pad_id, score_queries=queries,
                                          reference_ids=range(b, b + len(ids[b:b + batch])))

    result = {"question_set": "heldout", "n": n, "format": "attention/8/5", "askers": n_askers, "runs": {}}
    for run in run_dirs:
        model = run_model(run, tok, run_dirs[0])
        top = model.with_memory_format(selector="attention", tokens_per_head=8, memories_per_chunk=5)
        row = {"top8 (the paper's score)": {"queries": 0, "kept": answer_tokens_kept(model, tok, refs, heldout),
                                            "correct": read_bank(top, tok, refs, items)["correct"]}}
        answer_q = question_queries(model, tok, askers, "answer")
        every_q = question_queries(model, tok, askers, "all")
        pick = torch.randperm(every_q[0].shape[0], generator=torch.Generator().manual_seed(s.seed))
        pick = pick[:answer_q[0].shape[0]]  # as many queries as the answer positions give
        for where, queries in (("answer", answer_q), ("all", [q[pick] for q in every_q])):
            row[f"top8, ranked by training questions' queries ({where} positions)"] = {
                "queries": int(queries[0].shape[0]),
                "kept": answer_tokens_kept(model, tok, refs, heldout, score_queries=queries),
                "correct": read_bank(top, tok, refs, items, memories(top, queries))["correct"]}
        result["runs"][run] = {"trained_in": model.cfg.memory_format, "heldout_qa": {
            name: {"exact_match": sum(r.pop("correct")) / len(items), **r} for name, r in row.items()}}
        print(run, {k: (round(v["exact_match"], 3), round(v["kept"]["pooled_any_layer"], 3))
                    for k, v in result["runs"][run]["heldout_qa"].items()}, flush=True)
    write_json(out, result, seed=s.seed)
    return result


def sink(run_dirs: list[str], out: str, batches: int = 4, batch_size: int = 32) -> dict:
    """Where a model's memory attention goes, on training chunks read with every reference token kept (5 memories):
    per memory layer, the share of the context's attention that goes to memory slots at all, the part of it on the
    chunk's own (first-retrieved) reference, and the part of that held by the 8 tokens it attends to most
    (`MemoryKV.usage`, summed over queries and query heads). All runs must share the world settings of the first."""
    import torch

    from mini_m3.checkpoint import load_pretrained
    from mini_m3.train import TrainConfig, batch_order, continual_memory
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_json

    s, (*_, data, _) = run_world(run_dirs[0])
    keep_all = TrainConfig(stage="continual", steps=1, selection_distill=1.0, selector="attention")
    result = {"batches": batches, "batch_size": batch_size, "runs": {}}
    for run in run_dirs:
        model, _ = load_pretrained(Path(run) / "model")
        model.eval()
        acc = {}
        with torch.no_grad():
            for b in range(batches):
                rows = batch_order(len(data), batch_size, b, s.seed)
                kv, mem, local = continual_memory(model, data, rows, keep_all, distill=True)
                model(data.tokens[rows], memory=kv)
                B, C, n = local.shape
                R = mem.selection.shape[-1]
                queries = B * data.tokens.shape[1] * model.cfg.n_query_groups  # per memory head
                for layer in model.cfg.memory_layers:
                    u = kv.usage[layer].reshape(B, C, -1, n, R)  # (B, C, H_mem, n, R)
                    own = u[:, :, :, 0]
                    a = acc.setdefault(layer, {"share": 0.0, "own": 0.0, "top8_of_own": 0.0, "heads": 0})
                    H = u.shape[2]
                    a["share"] += float(u.sum()) / queries
                    a["own"] += float(own.sum() / u.sum())
                    a["top8_of_own"] += float((own.sort(-1, descending=True).values[..., :8].sum(-1)
                                               / own.sum(-1).clamp_min(1e-9)).mean())
                    a["heads"] += H
        row = {}
        for layer, a in acc.items():
            row[f"layer {layer}"] = {"memory_share": a["share"] / a["heads"], "own_reference": a["own"] / batches,
                                     "top8_of_own": a["top8_of_own"] / batches}
        result["runs"][run] = row
        print(run, json.dumps(row), flush=True)
    write_json(out, result, seed=s.seed)
    return result


def attends(run_dirs: list[str], out: str, n: int = 400) -> dict:
    """Where the memory attention of the answer position goes: each run's model reads the asked person's own top-8
    memory only (1 memory, so nothing else competes), and at the question's last token (where the answer's first
    token is predicted) each memory layer's attention to the memory slots is summed, averaged over query heads, by
    what the kept token is in the biography: an attribute's first answer token, a later one, the name, or other. Per
    asked attribute and memory layer (held-out questions). It reads the label (the asked person's reference is
    given): a diagnostic, never an evaluation. All runs must share the world settings of the first."""
    from collections import defaultdict

    import torch

    from mini_m3.data.bios import ATTRIBUTES
    from mini_m3.memory.encode import encode_reference_tokens
    from mini_m3.reading import reading_questions
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_json

    s, (world, others, tok, cfg, refs, data, docs) = run_world(run_dirs[0])
    people = {p.pid: p for p in world.people}
    items = reading_questions(world, others, n, s.seed)["heldout"]
    result = {"question_set": "heldout", "n": n, "memory": "the asked person's own, top-8, 1 per chunk", "runs": {}}
    for run in run_dirs:
        model = run_model(run, tok, run_dirs[0])
        one = model.with_memory_format(selector="attention", tokens_per_head=8, memories_per_chunk=1).eval()
        c = one.cfg
        if list(c.memory_heads) != list(range(c.n_kv_heads)):  # memory head h_mem is KV head h_mem below
            raise ValueError(f"{run}: attends reads models whose memory heads are all the KV heads")
        names = [f"blocks.{l}.attn.hook_pattern" for l in c.memory_layers]
        share = defaultdict(lambda: defaultdict(float))
        asked = defaultdict(int)
        for it in items:
            ids = tok.encode_references([refs[it.person]])[0]
            what = {}
            for a in ATTRIBUTES:
                for j, i in enumerate(answer_span(tok, ids, people[it.person].facts()[a]) or []):
                    what[i] = f"{a} (first)" if j == 0 else f"{a} (later)"
            for i in answer_span(tok, ids, people[it.person].name) or []:
                what.setdefault(i, "name")
            x = torch.tensor([[tok.bos_id] + tok.encode(it.prompt)])
            with torch.no_grad():
                mem = encode_reference_tokens(one, [ids])
                _, cache = one.run_with_cache(x, names=names, memory=mem.to_memory_kv(torch.zeros(1, 1, 1).long()),
                                              query_chunks=torch.zeros(x.shape[1], dtype=torch.long))
            asked[it.attribute] += 1
            k = mem.keys.shape[-2]
            for li, layer in enumerate(c.memory_layers):
                pattern = cache[names[li]][0, :, -1, c.prefix_length:c.prefix_length + k]  # (H, k): memory slots
                row = share[f"{it.attribute} / layer {layer}"]
                for h in range(pattern.shape[0]):
                    hk = h // c.n_query_groups
                    for j in range(k):
                        if mem.mask[0, li, hk, j]:
                            t = int(mem.positions[0, li, hk, j]) - c.prefix_length
                            row[what.get(t, "other")] += float(pattern[h, j]) / pattern.shape[0]
                row["all memory slots"] += float(pattern.sum()) / pattern.shape[0]
        rows = {key: {w: v / asked[key.split(" / ")[0]] for w, v in sorted(d.items(), key=lambda x: -x[1])}
                for key, d in sorted(share.items())}
        result["runs"][run] = rows
        for key, d in rows.items():
            print(run, key, {w: round(v, 3) for w, v in list(d.items())[:5]}, flush=True)
    write_json(out, result, seed=s.seed)
    return result


def choice_scores(m, tok, items, top5: list[list[int]], people, bank=None) -> dict:
    """`choice`'s row for one format: exact match, and how often the asked value outscores every different value
    held by the retrieved people (`top5`: bank ids = pids, -1 pad) in answer log-likelihood (bank None: memory off)."""
    import dataclasses

    import numpy as np

    from mini_m3.evaluate import qa_eval

    mode = "none" if bank is None else "memory"
    own = qa_eval(m, tok, items, mode=mode, bank=bank)
    scores = [own["logliks"]]
    for j in range(5):  # the j-th retrieved person's value of the asked attribute (the asked one's own if none)
        alt = [dataclasses.replace(it, answer=getattr(people[r[j]], it.attribute) if j < len(r) and r[j] >= 0
                                   else it.answer) for it, r in zip(items, top5)]
        scores.append(qa_eval(m, tok, alt, mode=mode, bank=bank)["logliks"])
    L = np.array(scores).T  # (n, 6): the asked value, then the 5 retrieved people's
    chose, wrong, found = [], [], []
    for i, (it, r) in enumerate(zip(items, top5)):
        other = [L[i, j + 1] for j in range(len(r)) if r[j] >= 0 and getattr(people[r[j]], it.attribute) != it.answer]
        best = max(other, default=-np.inf)
        chose.append(L[i, 0] > best)
        wrong.append(best > L[i, 0])
        found.append(it.person in r)
    return {"exact_match": own["accuracy"], "chose": float(np.mean(chose)), "distractor": float(np.mean(wrong)),
            "retrieved": float(np.mean(found))}


def choice(run_dirs: list[str], out: str, n: int = 200) -> dict:
    """Choosing the memory, or reading it? For each held-out question, the answer log-likelihood the model gives the
    asked person's value and each different value of the asked attribute held by the 5 people retrieved for it (whose
    memories the paper's format reads), read in the paper's format (top-8, 5 memories; a model trained with a named
    top-k lever reads its own, `own_top_k`), with top-8 and 1 memory, with all tokens and 5 memories or 1, and with
    memory off (the prior). "chose": the asked person's value scores highest; "distractor": a retrieved other person's
    value scores higher (read from the wrong memory, or guessed); "retrieved": the asked person is among the 5. Exact
    match beside it. Biographies in training and in held-out wordings. It reads the labels: a diagnostic, never an
    evaluation. All runs must share the world settings of the first."""
    import tempfile

    import torch

    from mini_m3.evaluate import EVAL_LEAKAGE_THRESHOLD
    from mini_m3.memory.bank import MemoryBank
    from mini_m3.memory.retrieve import Retriever
    from mini_m3.reading import reading_questions
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_json

    s, (world, others, tok, cfg, refs, data, docs) = run_world(run_dirs[0])
    people = list(world.people) + list(others)  # the bank's order: index = pid
    assert all(p.pid == i for i, p in enumerate(people)), "bank index is not pid"
    axes = {k: v for k, v in reading_questions(world, others, n, s.seed).items() if k in ("heldout", "new_bio_wording")}
    formats = (("top", 5), ("top", 1), ("all", 5), ("all", 1), ("off", 0))  # the first: retrieval
    result = {"n": n, "candidates": "the asked person's value and the different values of the 5 retrieved people",
              "runs": {}}
    for run in run_dirs:
        model = run_model(run, tok, run_dirs[0])
        row, top5 = {}, {}
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
            for f, (sel, k) in enumerate(formats):
                m, bank, name = model, None, "memory off"
                if sel != "off":  # "top": the paper's top-8, or the model's own top-k lever (`own_top_k`)
                    m = model.with_memory_format(selector=own_top_k(model) if sel == "top" else sel,
                                                 tokens_per_head=None if sel == "all" else 8, memories_per_chunk=k)
                    bank = MemoryBank.build(Path(tmp) / f"bank{f}", m, tok, refs, retriever=Retriever(),
                                            progress=False)
                    name = f"{'top-8' if sel == 'top' else 'all tokens'}, {k} memor{'y' if k == 1 else 'ies'}"
                for axis, items in axes.items():
                    if axis not in top5:  # retrieval reads the prompt only: the same 5 people in every format
                        top5[axis] = [[int(i) for i in r[:5]] for r in bank.search(
                            [it.prompt for it in items], 5, leakage_threshold=EVAL_LEAKAGE_THRESHOLD)]
                    row[f"{name} | {axis}"] = choice_scores(m, tok, items, top5[axis], people, bank)
                    print(run, name, axis, {kk: round(v, 3) for kk, v in row[f"{name} | {axis}"].items()}, flush=True)
        result["runs"][run] = row
    write_json(out, result, seed=s.seed)
    return result


def run_steps(settings: dict) -> int:
    """A run's own training steps: warmup + 1-memory curriculum + main."""
    return settings["warmup_steps"] + settings["curriculum_steps"] + settings["continual_steps"]


def chain_steps(run: str) -> int:
    """Training steps of a run folder and of every run its `--init-model` continued from (`chain_results` on the run
    folders' results.json). A run of the chain whose results.json is gone is an error, not a shorter chain."""
    return sum(run_steps(r["settings"]) for _, r in chain_results(str(Path(run) / "results.json"), committed=False))


def first_token_reads(model, tok, refs: list[str], items) -> dict:
    """Per asked attribute of `items`: n, and how often the answer's first token is `model`'s greedy prediction
    ("first_memory", "first_memory_off") and its mean probability ("p_memory", "p_memory_off"), reading only the
    asked person's own memory (`refs[item.person]`, in `model`'s memory format) or none."""
    from collections import defaultdict

    import torch

    from mini_m3.memory.encode import encode_reference_tokens

    acc = defaultdict(lambda: defaultdict(float))
    for it in items:
        x = torch.tensor([[tok.bos_id] + tok.encode(it.prompt)])
        gold = tok.encode(" " + it.answer)[0]
        with torch.no_grad():
            kv = encode_reference_tokens(model, [tok.encode_references([refs[it.person]])[0]]).to_memory_kv(
                torch.zeros(1, 1, 1).long())  # chunk 0 reads memory 0
            for arm, kw in (("memory", {"memory": kv, "query_chunks": torch.zeros(x.shape[1], dtype=torch.long)}),
                            ("memory_off", {})):
                logits = model(x, **kw).logits[0, -1]  # (vocab,): where the answer's first token is predicted
                a = acc[it.attribute]
                a[f"first_{arm}"] += float(logits.argmax() == gold)
                a[f"p_{arm}"] += float(torch.softmax(logits.float(), -1)[gold])
        acc[it.attribute]["n"] += 1
    return {attr: {k: (int(v) if k == "n" else v / a["n"]) for k, v in sorted(a.items())}
            for attr, a in sorted(acc.items())}


def first(run_dirs: list[str], out: str, n: int = 200) -> dict:
    """When each asked attribute's reader forms: `first_token_reads` of held-out questions, each model reading the
    asked person's own memory as top-8 tokens per head, 1 memory (so nothing competes). Run it on the checkpoints of
    one training chain (`chain_steps` gives each one's steps) to see the readers form one attribute at a time. It
    reads the label (the asked person's reference is given): a diagnostic, never an evaluation. All runs must share
    the world settings of the first."""
    from mini_m3.reading import reading_questions
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import png_path, write_json

    s, (world, others, tok, cfg, refs, data, docs) = run_world(run_dirs[0])
    items = reading_questions(world, others, n, s.seed)["heldout"]
    result = {"question_set": "heldout", "n": n, "memory": "the asked person's own, top-8, 1 per chunk", "runs": {}}
    for run in run_dirs:
        model = run_model(run, tok, run_dirs[0])
        one = model.with_memory_format(selector="attention", tokens_per_head=8, memories_per_chunk=1).eval()
        row = first_token_reads(one, tok, refs, items)
        result["runs"][run] = {"steps": (steps := chain_steps(run)), "per_attribute": row}
        print(run, steps, {k: round(v["first_memory"], 2) for k, v in row.items()}, flush=True)
    write_json(out, result, seed=s.seed)
    plot_first(result, png_path(out))
    return result


def plot_first(result: dict, path) -> None:
    """`first`'s figure: per asked attribute, the share of first answer tokens predicted from the asked person's own
    memory (solid) and with memory off (dotted) against each checkpoint's training steps, in the order given."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import plt, save_figure

    runs = list(result["runs"].values())
    steps = [r["steps"] for r in runs]
    fig, ax = plt().subplots(figsize=(7, 4))
    for i, attr in enumerate(runs[0]["per_attribute"]):
        color = f"C{i}"
        ax.plot(steps, [r["per_attribute"][attr]["first_memory"] for r in runs], "o-", color=color, label=attr)
        ax.plot(steps, [r["per_attribute"][attr]["first_memory_off"] for r in runs], ":", color=color)
    for step, run in zip(steps, result["runs"]):
        ax.annotate(Path(run).name, (step, 0.0), rotation=90, fontsize=7, va="bottom", ha="right")
    ax.set(xlabel="training steps (the run and those it continued from)", ylim=(-0.02, 1.02),
           ylabel="first answer token predicted", title=f"reading its own top-8 memory ({result['question_set']}; "
           "dotted: memory off)")
    ax.legend(fontsize=8, loc="center left")
    save_figure(fig, path)


def span_reads(model, tok, refs: list[str], items, k: int = 8) -> dict:
    """Per asked attribute of `items`, each answer token read teacher-forced from the asked person's own memory
    (`refs[item.person]`, 1 memory) in the paper's top-8 (top-`k` tokens per KV head; a model trained with a named
    top-k lever, `own_top_k`, reads its own) and with every token kept: n, the
    share of them that the top-8 keeps in some memory layer ("kept"), and how often each is `model`'s greedy prediction:
    with the top-8, where it was kept ("top8_if_kept") and where it was not ("top8_if_lost"), and with all tokens
    ("all"), for the first answer token ("first") and the later ones ("later") apart. A later token read where the top-8
    lost it must come from another kept token (which carries its neighbours) or from the model's weights.
    "top8_if_heads_B": the same read split by how many memory heads (layer, KV head) keep the token, in bins B (0, 1,
    2-3, 4-7, 8+). An item whose answer is not in its reference verbatim is skipped (the counts "n" say what was
    read)."""
    from collections import Counter, defaultdict

    import torch

    from mini_m3.memory.encode import encode_reference_tokens

    top = model.with_memory_format(selector=own_top_k(model), tokens_per_head=k, memories_per_chunk=1).eval()
    every = model.with_memory_format(selector="all", memories_per_chunk=1).eval()
    acc = defaultdict(lambda: defaultdict(lambda: [0, 0]))  # attribute -> measure -> [hits, n]
    off = model.cfg.prefix_length
    for it in items:
        ids = tok.encode_references([refs[it.person]])[0]
        answer = tok.encode(" " + it.answer)
        sp = answer_span(tok, ids, it.answer)
        if not sp or len(sp) != len(answer):
            continue
        prompt = [tok.bos_id] + tok.encode(it.prompt)
        x = torch.tensor([prompt + answer[:-1]])
        where = torch.zeros(x.shape[1], dtype=torch.long)  # every position reads memory 0
        with torch.no_grad():
            pred = {}
            for arm, m in (("top8", top), ("all", every)):
                mem = encode_reference_tokens(m, [ids])
                kv = mem.to_memory_kv(torch.zeros(1, 1, 1).long())
                pred[arm] = m(x, memory=kv, query_chunks=where).logits[0, len(prompt) - 1:].argmax(-1).tolist()
                if arm == "top8":  # token index -> how many memory heads (layer, KV head) keep it
                    copies = Counter(i for layer in kept_by_head(mem, off) for head in layer for i in head)
        a = acc[it.attribute]
        for i, (gold, pos) in enumerate(zip(answer, sp)):
            part = "first" if i == 0 else "later"
            kept = copies[pos] > 0
            a[f"{part}_kept"][0] += kept
            a[f"{part}_kept"][1] += 1
            a[f"{part}_top8_if_{'kept' if kept else 'lost'}"][0] += pred["top8"][i] == gold
            a[f"{part}_top8_if_{'kept' if kept else 'lost'}"][1] += 1
            a[f"{part}_all"][0] += pred["all"][i] == gold
            a[f"{part}_all"][1] += 1
            c = copies[pos]  # kept by how many memory heads, in bins
            b = "0" if c == 0 else "1" if c == 1 else "2-3" if c <= 3 else "4-7" if c <= 7 else "8+"
            a[f"{part}_top8_if_heads_{b}"][0] += pred["top8"][i] == gold
            a[f"{part}_top8_if_heads_{b}"][1] += 1
    out = {}
    for attr, a in sorted(acc.items()):
        out[attr] = {key: {"share": h / n if n else None, "n": n} for key, (h, n) in sorted(a.items())}
    pooled = defaultdict(lambda: [0, 0])
    for a in acc.values():
        for key, (h, n) in a.items():
            pooled[key][0] += h
            pooled[key][1] += n
    out["all_attributes"] = {key: {"share": h / n if n else None, "n": n} for key, (h, n) in sorted(pooled.items())}
    return out


def span(run_dirs: list[str], out: str, n: int = 200) -> dict:
    """Why later answer tokens are lost in the paper's format: `span_reads` of held-out questions, each model
    reading the asked person's own memory (1 memory, so nothing competes) as its top-8 and with all tokens kept.
    It reads the label (the asked person's reference is given): a diagnostic, never an evaluation. All runs must
    share the world settings of the first."""
    from mini_m3.reading import reading_questions
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_json

    s, (world, others, tok, cfg, refs, data, docs) = run_world(run_dirs[0])
    items = reading_questions(world, others, n, s.seed)["heldout"]
    result = {"question_set": "heldout", "n": n, "memory": "the asked person's own, 1 per chunk: top-8 and all "
              "tokens", "runs": {}}
    for run in run_dirs:
        row = span_reads(run_model(run, tok, run_dirs[0]), tok, refs, items)
        result["runs"][run] = row
        print(run, {k: (v["n"], round(v["share"], 3)) for k, v in row["all_attributes"].items()}, flush=True)
    write_json(out, result, seed=s.seed)
    return result


def chain_results(path: str, committed: bool = True) -> list[tuple[str, dict]]:
    """A training chain, first run first: the results JSON `path` and, before it, each run it continued from by its
    `--init-model` (`.../RUN/model`). committed=True: each link is the committed `reading_RUN.json` beside `path`;
    False: `path` is a run folder's results.json, and each link is `RUN/results.json`. A missing link is an error, not
    a shorter chain."""
    chain, seen, p = [], set(), Path(path)
    while True:
        if p in seen:
            raise ValueError(f"{path}: the chain loops at {p}")
        seen.add(p)
        if not p.exists():
            raise FileNotFoundError(f"{path}: {p} is missing (no results.json for a run of the chain), so its steps "
                                    "are unknown")
        r = json.loads(p.read_text())
        chain.append((str(p), r))
        init = r["settings"].get("init_model")
        if not init:
            return chain[::-1]
        run = Path(init).parent
        p = p.parent / f"reading_{run.name}.json" if committed else run / "results.json"


def curve(paths: list[str], out: str) -> dict:
    """Held-out reading along training chains: for each results JSON given (the last run of a chain), every run of its
    chain (`chain_results`) with its cumulative training steps, its memory format and what it read on held-out people
    with memory and memory off. Writes OUT.json and OUT.png: held-out exact match against steps, one line per chain,
    filled where the run was evaluated in the paper's format (top-8 tokens per KV head, 5 memories per chunk) and
    joined by the line, hollow in any other (a stage in another format), one colour per query-head count. From
    committed results only: nothing is trained or read."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import plt, png_path, save_figure, write_json

    chains = {}
    for path in paths:
        steps, rows = 0, []
        for run, r in chain_results(path):
            st, ms, c = r["settings"], r["memory_settings"], r["config"]
            steps += run_steps(st)
            rows.append({"run": run, "steps": steps, "format": f"{ms['selector']}/{ms['tokens_per_head']}/"
                         f"{ms['memories_per_chunk']}", "paper_format": ms["selector"] == "attention"
                         and ms["tokens_per_head"] == 8 and ms["memories_per_chunk"] == 5,
                         "query_heads": c["n_heads"], "kv_heads": c["n_kv_heads"], "head_dim": c["head_dim"],
                         "heldout": r["axes"]["heldout"]["memory"], "heldout_off": r["axes"]["heldout"]["memory_off"],
                         "commit": r["provenance"]["commit"]})
        chains[path] = rows
    result = {"measure": "exact match on 200 held-out people's questions, the run's own format", "chains": chains}
    write_json(out, result, seed=0)
    fig, ax = plt().subplots(figsize=(8, 4.5))
    colours = {q: f"C{i}" for i, q in enumerate(sorted({r["query_heads"] for rows in chains.values() for r in rows}))}
    for path, rows in chains.items():
        colour = colours[rows[-1]["query_heads"]]
        paper = [r for r in rows if r["paper_format"]]  # the line joins the paper-format evaluations only
        ax.plot([r["steps"] for r in paper], [r["heldout"] for r in paper], "-", color=colour, alpha=0.6, lw=1)
        x, y = rows[-1]["steps"], rows[-1]["heldout"]
        for r in rows:
            ax.plot(r["steps"], r["heldout"], "o", color=colour, ms=5,
                    mfc=colour if r["paper_format"] else "white")
        ax.annotate(Path(path).stem.replace("reading_", ""), (x, y), fontsize=7, xytext=(3, 0),
                    textcoords="offset points", va="center")
    for q, colour in colours.items():
        ax.plot([], [], "o", color=colour, label=f"{q} query heads")
    ax.plot([], [], "o", color="gray", mfc="white", label="evaluated in another format")
    ax.axhline(0.9, color="gray", ls=":", lw=1)
    ax.set(xlabel="training steps (the run and those it continued from)", ylabel="held-out exact match",
           ylim=(-0.02, 1.02), title="reading held-out people along each training chain (filled: the paper's format)")
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, png_path(out))
    return result


SUBCOMMANDS = {"table": "table RESULTS.json ...: the markdown table of runs",
               "seeds": "seeds RESULTS.json RESULTS.json ...: one command's seeds side by side, mean [min, max] per "
                        "axis",
               "formats": "formats OUT.json RUN_DIR ... [--only SELECTOR]: held-out QA of each run read in other "
                          "memory formats (--only: those of one selector)",
               "diagnose": "diagnose OUT.json RUN_DIR ...: answer tokens kept by top-8, reading with distractors",
               "sink": "sink OUT.json RUN_DIR ...: where the context's attention to memory goes",
               "attends": "attends OUT.json RUN_DIR ...: what the answer position's memory attention reads, per "
                          "asked attribute (a label-reading diagnostic)",
               "first": "first OUT.json RUN_DIR ...: per asked attribute, the answer's first token read from the "
                        "asked person's own memory, along a training chain (a label-reading diagnostic)",
               "span": "span OUT.json RUN_DIR ...: per asked attribute, each answer token read from the asked "
                       "person's own memory, kept or lost by the top-8 (a label-reading diagnostic)",
               "kept": "kept OUT.json RUN_DIR ...: the share of held-out answer tokens the top-8 keeps",
               "layers": "layers OUT.json RUN_DIR ...: how many heads the top-8 would keep each held-out answer token "
                         "in if other layers were memory layers too",
               "forced": "forced OUT.json RUN_DIR ...: top-8 reading with the answer forced into the kept set "
                         "(a label-reading diagnostic)",
               "questions": "questions OUT.json RUN_DIR ...: top-8 ranked by the attention of training questions' "
                            "queries",
               "choice": "choice OUT.json RUN_DIR ...: does the asked value outscore the other retrieved people's "
                         "values (a label-reading diagnostic)",
               "curve": "curve OUT.json RESULTS.json ...: held-out reading along each results file's training chain "
                        "(committed results only)"}


def parse_run(argv: list[str]) -> tuple[str, ReadingSettings]:
    """A training run's flags: (the --out folder, its ReadingSettings)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="run folder: results.json, the model, the bank, training logs")
    p.add_argument("--model", nargs="*", default=[], help="Memory3Config overrides, e.g. n_layers=8 memory_tokens_per_head=8")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    for f in fields(ReadingSettings):
        if f.name in ("model", "progress"):
            continue
        if f.name == "stages":  # a JSON list of stage dicts
            p.add_argument("--stages", type=json.loads, default=[], help=SETTING_HELP[f.name])
            continue
        if isinstance(f.default, bool):  # --memory-grad / --no-memory-grad (type=bool would read "False" as True)
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=f.default,
                           help=SETTING_HELP[f.name])
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=SETTING_HELP[f.name])
    a = p.parse_args(argv)
    kw = {f.name: getattr(a, f.name) for f in fields(ReadingSettings) if f.name not in ("model", "progress")}
    return a.out, ReadingSettings(**kw, model=parse_model(a.model), progress=not a.quiet)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in SUBCOMMANDS and (len(argv) < (2 if argv[0] == "table" else 3)
                                               or {"-h", "--help"} & set(argv[1:])):
        print(f"usage: python experiments/reading_levers.py {SUBCOMMANDS[argv[0]]}")
        raise SystemExit(0 if {"-h", "--help"} & set(argv[1:]) else 2)
    if argv[:1] == ["table"]:
        print(table(argv[1:]))
        return
    if argv[:1] == ["seeds"]:
        try:
            print(seeds(argv[1:]))
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        return
    diagnostics = {"formats": formats, "diagnose": diagnose, "kept": kept, "layers": layers, "forced": forced,
                   "questions": questions, "sink": sink, "first": first, "attends": attends, "span": span,
                   "choice": choice, "curve": curve}
    if argv[:1] and argv[0] in diagnostics:  # NAME OUT.json RUN_DIR [RUN_DIR ...]
        rest = argv[2:]
        if argv[0] == "formats" and "--only" in rest:  # formats OUT.json RUN_DIR ... --only SELECTOR
            i = rest.index("--only")
            if i + 2 != len(rest) or rest[i + 1] not in MEMORY_SELECTORS:
                raise SystemExit(f"--only takes one selector of {list(MEMORY_SELECTORS)}, after the run folders")
            diagnostics["formats"](rest[:i], argv[1], only=rest[i + 1])
            return
        diagnostics[argv[0]](rest, argv[1])
        return
    out, s = parse_run(argv)
    run_reading(out, s, argv=["experiments/reading_levers.py", *argv])


if __name__ == "__main__":
    main()
