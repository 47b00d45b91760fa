"""§3.6 + §7 reading explicit memory in the paper's format: train on the BioWorld, evaluate every generalisation axis.

One run: generate a :class:`~mini_m3.data.bios.BioWorld`; train the tokenizer on training text only; retrieve
the paper's 5 memories for every training chunk (its own biography and, mostly, look-alikes sharing a first or
last name); pretrain in two stages (warmup without memory, then continual training reading 5 memories of the
model's own memory format, top-8 tokens per KV head by default); build the bank of every person (held-out people
and people with names in another style included); and report QA exact match per axis:

==========================  ===========================================================================
axis                        held-out people (bank only, names and values from pools training never saw) …
``heldout``                 … told and asked in training wordings
``new_bio_wording``         … whose bank biography uses the held-out sentence templates
``new_question_wording``    … asked with the held-out question templates
``all_new``                 … both at once
``other_style_names``       people added to the bank after training, named in another style (real names)
``trained``                 ``memory`` people, whose QA (not biography) was in training
==========================  ===========================================================================

each with memory, memory off, and retrieval top-1. Library code: the demo and ``experiments/reading_levers.py``
call :func:`run_reading`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import COMPANION_FILES, load_pretrained, save_pretrained
from .config import MEMORY_FORMAT_FIELDS, Memory3Config
from .data.bios import ATTRIBUTES, BioWorld
from .data.world import QAItem, qa_prompt
from .evaluate import qa_eval, retrieval_hit_rate
from .memory.bank import MemoryBank
from .memory.retrieve import Retriever
from .model import Memory3
from .provenance import fixed_numerics, provenance
from .tokenizer import Tokenizer
from .train import (ChunkedData, pack_documents, retrieve_for_chunks, share_memories, stage_lr_warmup, train,
                    two_stage_configs)
from .utils import atomic_write_text

STAGE_KEYS = ("steps", "lr", "selector", "memories_per_chunk")  # ReadingSettings.stages
AXES = ("heldout", "new_bio_wording", "new_question_wording", "all_new", "other_style_names", "trained")


@dataclass
class ReadingSettings:
    seed: int = 0
    preset: str = "small"
    model: dict = field(default_factory=dict)  # Memory3Config overrides (n_layers=..., memory format, ...)
    n_people: int = 6000
    n_docs: int = 60000
    name_share: int = 2  # people per first / last name (look-alikes), BioWorld.generate
    value_share: int = 2  # people per generated city / company
    wordings: str = "base"  # BioWorld wordings: "wide", "compositional", "neutral" add training templates (levers)
    vocab_size: int = 1024
    bio_fraction: float = 0.1
    max_qa: int = 3
    batch_size: int = 32
    warmup_steps: int = 300
    continual_steps: int = 2000
    curriculum_steps: int = 0  # continual steps reading only the top-1 memory before the paper's 5 (a lever)
    lr: float = 2e-3
    eval_questions: int = 200
    eval_every: int = 0  # continual steps between held-out QA checks (a temporary bank each time), 0 = none
    soft_selection: float = 0.0  # TrainConfig.soft_selection of the main continual stage (a lever; 0 = the paper)
    soft_selection_until: float = 0.5  # also the end of selection distillation's phase
    soft_selection_gate: str = "logit"  # TrainConfig.soft_selection_gate: what a slot's soft weight scales (a lever)
    selection_distill: float = 0.0  # TrainConfig.selection_distill of the main continual stage (a lever)
    selection_target: str = "attention"  # TrainConfig.selection_target: what the distillation fits (a lever)
    format_mix: float = 0.0  # TrainConfig.format_mix of the main continual stage: share of all-tokens 1-memory steps
    memory_grad: bool = True  # TrainConfig.memory_grad: gradients through reference encoding (False: a lever)
    shared_memories: bool = False  # groups of chunks read one set of references, one encoded per chunk (a lever)
    init_model: str = ""  # continue from a run's OUT/model: same settings but steps, memory format and layers
    # later continual stages, one after another, each {"steps": N} with optional "lr" (default: lr),
    # "selector" and "memories_per_chunk" (default: the model's): a memory-format chain in one run, each stage
    # with its own optimizer and WSD schedule (no LR warmup, the last 10 % decays), as a continuation run would;
    # memory_grad and shared_memories hold in every stage, the other training levers in the main stage only
    stages: list = field(default_factory=list)
    threads: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        from .config import MEMORY_SELECTORS
        def count(v):  # an integer >= 1 (not a bool)
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        for k, st in enumerate(self.stages):
            ok = (isinstance(st, dict) and set(st) <= set(STAGE_KEYS) and count(st.get("steps"))
                  and st.get("selector", "attention") in MEMORY_SELECTORS and count(st.get("memories_per_chunk", 1))
                  and isinstance(st.get("lr", 1.0), (int, float)) and st.get("lr", 1.0) > 0)
            if not ok:
                raise ValueError(f"ReadingSettings.stages[{k}]={st!r}: a stage is a dict with 'steps' (an integer "
                                 f">= 1) and optional 'lr' (> 0), 'selector' (one of {list(MEMORY_SELECTORS)}) and "
                                 f"'memories_per_chunk' (1 to the model's)")

    def model_config(self, vocab_size: int) -> Memory3Config:
        return Memory3Config.from_name(self.preset, vocab_size=vocab_size, **self.model)


FLAGSHIP_MODEL = {"n_layers": 6, "n_heads": 8, "n_kv_heads": 8, "head_dim": 16, "memory_layers": [1, 2, 3],
                  "memory_selector": "attention", "memory_tokens_per_head": 8, "memories_per_chunk": 5}


def flagship_settings(seed: int = 0, *, threads: int = 2, quick: bool = False, **over) -> ReadingSettings:
    """Issue 15's flagship recipe, one run (`mini-m3 flagship`; experiments/README.md point 44): `tiny` with 8 KV heads
    of 16 dimensions and memory layers 1-3, saved in the paper's format (top-8 tokens per KV head, 5 memories per
    chunk). Warmup without memory; top-8 reading only the chunk's own memory (the readers form); the paper's format,
    5 chunks sharing one set of references (`shared_memories`, one reference encoded per chunk); then at a quarter
    of the learning rate the paper's format, all tokens of 1 memory (a named lever, deviation 75: it forms the
    birth-date reader, point 28), the paper's format, all tokens of 5 memories (point 31) and the paper's format.
    quick=True: the same chain on a small world with a few steps per stage (tests). `over`: any other setting."""
    paper, low = {}, {"lr": 5e-4}
    chain = [(2400, paper), (600, {"selector": "all", "memories_per_chunk": 1}), (1200, paper),
             (300, {"selector": "all", "memories_per_chunk": 5}), (2100, paper)]
    base = dict(seed=seed, preset="tiny", model=dict(FLAGSHIP_MODEL), warmup_steps=300, curriculum_steps=4000,
                continual_steps=4700, shared_memories=True, threads=threads,
                stages=[{"steps": n, **low, **fmt} for n, fmt in chain])
    if quick:
        base.update(n_people=200, n_docs=600, warmup_steps=4, curriculum_steps=3, continual_steps=3, batch_size=8,
                    eval_questions=8, stages=[{"steps": 2, **low, **fmt} for _, fmt in chain])
    return ReadingSettings(**{**base, **over})


def reading_world(s: ReadingSettings) -> BioWorld:
    """The run's world of people, from its settings (training and `load_reading_run` both generate it here)."""
    return BioWorld.generate(s.n_people, seed=s.seed, name_share=s.name_share, value_share=s.value_share,
                             wordings=s.wordings)


def build_reading_data(s: ReadingSettings):
    """World, tokenizer (training text only), bank texts (every person, then other-style people), retriever and
    the training data with each chunk's retrieved memories."""
    world = reading_world(s)
    docs = world.training_documents(s.n_docs, seed=s.seed, bio_fraction=s.bio_fraction, max_qa=s.max_qa)
    tokenizer = Tokenizer.train(world.tokenizer_corpus(docs), s.vocab_size)
    cfg = s.model_config(tokenizer.vocab_size)
    others, references = bank_texts(world, s, tokenizer, cfg)
    reference_tokens = tokenizer.encode_references(references)
    # training retrieves among the people training may see: a held-out biography is never read in training,
    # not even as another chunk's distractor; other-style people join the bank only after training
    seen = torch.tensor([p.pid for p in world.people if p.split != "heldout"])
    retriever = Retriever().fit([references[i] for i in seen.tolist()])
    ids = tokenizer.encode_batch([d.text for d in docs])
    tokens, targets = pack_documents(ids, cfg.chunk_length, 1, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                                     pad_id=tokenizer.pad_id)
    local = retrieve_for_chunks(tokens, cfg.chunk_length, tokenizer, retriever,
                                [reference_tokens[i] for i in seen.tolist()], progress=s.progress,
                                memories=cfg.memories_per_chunk)
    refs = torch.where(local >= 0, seen[local.clamp(min=0)], -1)  # retriever rows -> pids
    if s.shared_memories and cfg.memories_per_chunk > 1:  # 5 chunks read one set: its own top-1 each (a lever)
        order, refs = share_memories(refs, cfg.memories_per_chunk, seed=s.seed, tokens=tokens,
                                     references=reference_tokens)
        tokens, targets, docs = tokens[order], targets[order], [docs[i] for i in order.tolist()]
    data = ChunkedData(tokens, targets, refs, reference_tokens)
    return world, others, tokenizer, cfg, references, data, docs


def bank_texts(world: BioWorld, s: ReadingSettings, tokenizer, cfg: Memory3Config) -> tuple[list, list[str]]:
    """The people added after training (other-style names) and the bank's texts: one biography per person, every
    person of `world` then the others, index = pid (each biography the first wording that fits in a reference)."""
    fits = lambda t: len(tokenizer.encode_reference(t)) <= cfg.reference_length  # noqa: E731 (as banks encode)
    others = world.other_style_people(100, seed=s.seed)
    return others, world.references(fits) + world.references(fits, people=others)


def texts_sha256(texts) -> str:
    """A fingerprint of a list of texts (order included): a saved run records its bank's, a loader checks it."""
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


RUN_FILE, RUN_FORMAT, RUN_VERSION = COMPANION_FILES[0], "mini_m3.reading_run", 1


@dataclass
class ReadingRun:
    """A trained reading model with what it needs to be evaluated again: its settings, and its world of people and
    bank texts regenerated from them (`load_reading_run`). The shipped flagship (notebooks/assets/memory3_demo) is
    one."""
    model: Memory3
    tokenizer: Tokenizer
    settings: ReadingSettings
    world: BioWorld
    others: list
    references: list[str]

    def questions(self, n: int | None = None) -> dict:
        """The evaluation items of every axis, as the run evaluated them (n: its eval_questions)."""
        return reading_questions(self.world, self.others, n or self.settings.eval_questions, self.settings.seed)

    def build_bank(self, directory, *, quantizer=None, progress: bool = False, **kw) -> MemoryBank:
        """Every person's memory in the model's own format (held-out and other-style people included); `kw`: more
        `MemoryBank.build` options (e.g. vq_train_references)."""
        return MemoryBank.build(directory, self.model, self.tokenizer, self.references, retriever=Retriever(),
                                overwrite=True, progress=progress, seed=self.settings.seed, quantizer=quantizer, **kw)


def write_reading_run(model_dir, settings: ReadingSettings, references_sha256: str, **extra) -> Path:
    """The file `load_reading_run` reads beside a model directory's weights: the run's settings and its bank's
    fingerprint (`extra`: e.g. where the run's results are)."""
    path = Path(model_dir) / RUN_FILE
    atomic_write_text(path, json.dumps({"format": RUN_FORMAT, "version": RUN_VERSION, "settings": asdict(settings),
                                        "references_sha256": references_sha256, **extra}, indent=1))
    return path


def is_reading_run(model_dir: str | os.PathLike) -> bool:
    """Whether `load_reading_run` can load `model_dir`: it holds a `reading_run.json`, or a reading run's results.json
    (with its settings and bank fingerprint) lies beside it."""
    model_dir = Path(model_dir)
    if (model_dir / RUN_FILE).exists():
        return True
    try:
        meta = json.loads((model_dir.parent / "results.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "references_sha256" in meta and "settings" in meta


def load_reading_run(model_dir: str | os.PathLike) -> ReadingRun:
    """A model directory of a reading run: `OUT/model` of `run_reading` (settings from `OUT/results.json`), or one
    with a `reading_run.json` (`write_reading_run`; the shipped flagship). The world is regenerated from the settings
    and checked against the run: the model's config must be the settings' and the bank texts must have the run's
    fingerprint (a changed world generator is an error, not silently other people)."""
    model_dir = Path(model_dir)
    own, beside = model_dir / RUN_FILE, model_dir.parent / "results.json"
    source = own if own.exists() else beside
    if not source.exists():
        raise FileNotFoundError(f"{model_dir}: neither {RUN_FILE} in it nor a run's results.json beside it")
    try:
        meta = json.loads(source.read_text())
        if source == own and (meta.get("format"), meta.get("version")) != (RUN_FORMAT, RUN_VERSION):
            raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}, expected "
                             f"{RUN_FORMAT!r} version {RUN_VERSION}")
        settings = ReadingSettings(**{**meta["settings"], "progress": False})
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{source} is not a reading run's settings: {e}") from e
    model, tokenizer = load_pretrained(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer.json: a reading run saves its tokenizer with the model")
    if settings.model_config(tokenizer.vocab_size) != model.cfg:
        raise ValueError(f"{model_dir}: the model's config is not the one its settings in {source} give")
    world = reading_world(settings)
    others, references = bank_texts(world, settings, tokenizer, model.cfg)
    want = meta.get("references_sha256")
    if want is not None and texts_sha256(references) != want:
        raise ValueError(f"{model_dir}: the world regenerated from its settings is not the one it was trained on "
                         f"(bank texts differ from the run's fingerprint): has the world generator or the tokenizer "
                         f"changed since? Train it again")
    return ReadingRun(model, tokenizer, settings, world, others, references)


def reading_questions(world: BioWorld, others, n: int, seed: int) -> dict:
    """The evaluation items of every axis (see the module docstring)."""
    q = lambda split, qf, bf=None: world.eval_questions(split, n, seed=seed, question_family=qf, bio_family=bf)  # noqa: E731
    rng = np.random.default_rng(seed)
    other_items = []
    for _ in range(n):
        p = others[int(rng.integers(len(others)))]
        a = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
        templates = world.templates("question", "train", a)
        question, answer = world.qa(p, a, family="train", template=int(rng.integers(len(templates))))
        other_items.append(QAItem(p.pid, a, question, answer, qa_prompt(question)))
    return {"heldout": q("heldout", "train", "train"), "new_bio_wording": q("heldout", "train", "heldout"),
            "new_question_wording": q("heldout", "heldout", "train"), "all_new": q("heldout", "heldout", "heldout"),
            "other_style_names": other_items, "trained": q("memory", "train")}


def by_attribute(items, result: dict) -> dict:
    """A `qa_eval` result split by the asked attribute: {attribute: {"n", "exact_match", "first_piece",
    "later_pieces"}}. "first_piece": the share of answers whose first token is predicted (finding the answer);
    "later_pieces": the share of the other answer tokens predicted given the true ones before them (copying the
    span; None for one-token answers). Both teacher forced, from `qa_eval`'s "pieces"."""
    acc = {}
    for it, ok, hit in zip(items, result["correct"], result["pieces"]):
        a = acc.setdefault(it.attribute, {"n": 0, "exact": 0, "first": 0, "later": [0, 0]})
        a["n"] += 1
        a["exact"] += bool(ok)
        a["first"] += bool(hit[0])
        a["later"][0] += sum(map(bool, hit[1:]))
        a["later"][1] += len(hit) - 1
    return {k: {"n": a["n"], "exact_match": a["exact"] / a["n"], "first_piece": a["first"] / a["n"],
                "later_pieces": a["later"][0] / a["later"][1] if a["later"][1] else None}
            for k, a in sorted(acc.items())}


def evaluate_axes(model: Memory3, tokenizer, bank, items: dict) -> dict:
    out = {}
    for axis, its in items.items():
        mem = qa_eval(model, tokenizer, its, mode="memory", bank=bank)
        off = qa_eval(model, tokenizer, its, mode="none")
        out[axis] = {"memory": mem["accuracy"], "memory_off": off["accuracy"], "n": mem["n"],
                     "by_attribute": {"memory": by_attribute(its, mem), "memory_off": by_attribute(its, off)},
                     "answer_loglik": {"memory": mem["answer_loglik"], "memory_off": off["answer_loglik"]},
                     "retrieval_top1": retrieval_hit_rate(its, mem["retrieved"], 1),
                     f"retrieval_top{model.cfg.memories_per_chunk}": retrieval_hit_rate(its, mem["retrieved"])}
    return out


def run_reading(out_dir: str | os.PathLike, s: ReadingSettings | None = None, *, argv=None) -> dict:
    s = s or ReadingSettings()
    with fixed_numerics(s.seed, s.threads):
        return _run(Path(out_dir), s, argv)


@dataclass
class TrainedReading:
    """What `train_reading` returns: the trained model with its run's world, bank texts and evaluation items."""
    model: Memory3
    tokenizer: Tokenizer
    world: BioWorld
    others: list
    references: list[str]
    items: dict  # {axis: QA items}, `reading_questions`
    stages: dict  # {stage name: `train`'s summary}
    training_retrieval_top1: float
    train_seconds: float
    provenance: dict


def _run(out: Path, s: ReadingSettings, argv) -> dict:
    t0 = time.perf_counter()
    t = train_reading(out, s)
    model, tokenizer, cfg = t.model, t.tokenizer, t.model.cfg
    save_pretrained(model, out / "model", tokenizer)
    bank = MemoryBank.build(out / "bank", model, tokenizer, t.references, retriever=Retriever(),
                            overwrite=True, progress=s.progress, seed=s.seed)
    axes = evaluate_axes(model, tokenizer, bank, t.items)
    results = {
        "axes": axes, "training_retrieval_top1": t.training_retrieval_top1,
        "memory_settings": cfg.memory_format,
        "final_loss": {k: v["final_loss"] for k, v in t.stages.items()},
        "step_time": {k: v["step_time"] for k, v in t.stages.items()},
        "train_seconds": t.train_seconds, "wall_seconds": time.perf_counter() - t0,
        "parameters": {"non_embedding": model.num_parameters(), "total": model.num_parameters(False)},
        "config": cfg.to_dict(), "settings": asdict(s), "world": t.world.summary(),
        "references_sha256": texts_sha256(t.references), "seed": s.seed,
        "argv": list(argv) if argv is not None else None, "provenance": t.provenance,
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    (print if s.progress else (lambda *a: None))(format_axes(results))
    return results


def train_reading(out: Path, s: ReadingSettings) -> TrainedReading:
    """The training half of a reading run (stage logs under `out`): world, tokenizer, data, the model trained
    through warmup, curriculum, continual and the later stages; and the evaluation items of every axis. Call it
    inside `fixed_numerics(s.seed, s.threads)`, as `run_reading` and the demo do."""
    out.mkdir(parents=True, exist_ok=True)
    say = print if s.progress else (lambda *a, **k: None)
    t0 = time.perf_counter()
    prov = provenance(s.seed)
    retrieved = s.model_config(s.vocab_size).memories_per_chunk  # what each training chunk retrieves
    for k, st in enumerate(s.stages):  # before any work: a stage reads at most that many
        if st.get("memories_per_chunk", 1) > retrieved:
            raise ValueError(f"stages[{k}] reads {st['memories_per_chunk']} memories per chunk; the training "
                             f"chunks retrieve {retrieved} (the model's memories_per_chunk)")
    world, others, tokenizer, cfg, references, data, docs = build_reading_data(s)
    own = [d.person for d in docs]
    first = data.chunk_refs[..., 0].flatten().tolist() if data.chunk_refs.dim() == 3 else data.chunk_refs.flatten().tolist()
    train_top1 = float(np.mean([p == r for p, r in zip(own, first)]))
    say(f"world {world.summary()}; vocab {tokenizer.vocab_size}; {len(data)} chunks; training retrieval top-1 "
        f"{train_top1:.3f}; t={time.perf_counter() - t0:.0f}s")
    torch.manual_seed(s.seed)
    model = Memory3(cfg)
    if s.init_model:  # longer training in pieces: the same world and tokenizer, the previous run's weights
        prev, prev_tok = load_pretrained(s.init_model)
        # the memory format may change (a format curriculum: all tokens and 1 memory first, then the paper's),
        # learned selection queries may be added (a model without them: they start from their initialisation), and
        # the memory layers may change (a layer that was not one starts writing and reading memories; a lever)
        free = (*MEMORY_FORMAT_FIELDS, "memory_selection_queries", "memory_layers")
        same_shape = dataclasses.replace(prev.cfg, **{f: getattr(cfg, f) for f in free}) == cfg
        adds_queries = prev.cfg.memory_selection_queries in (0, cfg.memory_selection_queries)
        if not same_shape or not adds_queries or prev_tok.fingerprint() != tokenizer.fingerprint():
            raise ValueError(f"{s.init_model} was trained with another model config or tokenizer than these settings")
        if prev.cfg.memory_selection_queries and tuple(prev.cfg.memory_layers) != tuple(cfg.memory_layers):
            # starting the new layers' queries would restart the trained ones too (init_selection_queries)
            raise ValueError(f"{s.init_model} has learned selection queries: its memory layers cannot change")
        missing, unexpected = model.load_state_dict(prev.state_dict(), strict=False)
        if unexpected or not all(k.endswith(".attn.select_q") for k in missing):
            raise ValueError(f"{s.init_model}: its weights do not fit these settings (missing {missing}, "
                             f"unexpected {unexpected})")
        if missing:  # new learned selection queries start as the paper's askers (a sample of reference queries)
            from .memory.encode import init_selection_queries
            trained = [data.references[p.pid] for p in world.people if p.split != "heldout"]  # never held-out ones
            init_selection_queries(model, trained, seed=s.seed)

    items = reading_questions(world, others, s.eval_questions, s.seed)
    watch = {k: v[:max(20, s.eval_questions // 4)] for k, v in items.items() if k in ("heldout", "all_new")}

    def check(m, step):  # held-out QA during training: a bank of the current weights
        with torch.no_grad():
            b = MemoryBank.build(out / "bank_check", m, tokenizer, references, retriever=Retriever(),
                                 overwrite=True, progress=False, seed=s.seed)
            r = {f"qa_{k}": qa_eval(m, tokenizer, v, mode="memory", bank=b)["accuracy"] for k, v in watch.items()}
        m.train()
        say(f"step {step + 1}: {r}")
        return r

    def stage(name, tc, d, m=model):
        tc = dataclasses.replace(tc, eval_every=s.eval_every if tc.stage == "continual" else 0)
        return train(m, d, tc, out_dir=out / name, tokenizer=tokenizer, resume=False,
                     eval_fn=check if tc.stage == "continual" and s.eval_every else None)

    # §3.6's two stages (`two_stage_configs`), each scheduled on its own as `mini-m3 train` does: the LR warms up
    # over 10 % of the warmup stage only; the decay covers the last 10 % of warmup + main continual steps
    cont_groups = cfg.memories_per_chunk if s.shared_memories and cfg.memories_per_chunk > 1 else 1
    warm, cont = two_stage_configs(s.warmup_steps, s.continual_steps,
                                   lr_warmup=stage_lr_warmup(s.warmup_steps),
                                   batch_size=s.batch_size, lr=s.lr, seed=s.seed, quiet=not s.progress,
                                   threads=s.threads, soft_selection=s.soft_selection,
                                   soft_selection_until=s.soft_selection_until,
                                   soft_selection_gate=s.soft_selection_gate, selection_distill=s.selection_distill,
                                   selection_target=s.selection_target, format_mix=s.format_mix,
                                   memory_grad=s.memory_grad,
                                   memory_groups=cont_groups)
    res = {}
    if warm is not None:
        res["warmup"] = stage("warmup", warm, data)
    if s.curriculum_steps:  # between the two: continual steps reading only the top-1 memory, no LR warmup or decay
        one = ChunkedData(data.tokens, data.targets, data.chunk_refs[..., :1].contiguous(), data.references)
        res["curriculum"] = stage("curriculum", dataclasses.replace(cont, steps=s.curriculum_steps, decay_fraction=0.0,
                                                                   soft_selection=0.0, selection_distill=0.0,
                                                                   format_mix=0.0), one)
    if cont is not None:
        res["continual"] = stage("continual", cont, data)
    for k, st in enumerate(s.stages, 1):  # the format chain: each stage a continuation in its own format
        view = model.with_memory_format(selector=st.get("selector"), memories_per_chunk=st.get("memories_per_chunk"))
        one = two_stage_configs(0, st["steps"], lr_warmup=0, batch_size=s.batch_size, lr=st.get("lr", s.lr),
                                seed=s.seed, quiet=not s.progress, threads=s.threads, memory_grad=s.memory_grad,
                                memory_groups=cont_groups if view.cfg.memories_per_chunk > 1 else 1)[1]
        res[f"stage{k}"] = stage(f"stage{k}", one, data, view)
    return TrainedReading(model, tokenizer, world, others, references, items, res, train_top1,
                          time.perf_counter() - t0, prov)


def format_axes(r: dict) -> str:
    m = r["memory_settings"]
    lines = [f"memory format: {m['selector']}, {m['tokens_per_head']} tokens/head, {m['memories_per_chunk']} "
             f"memories/chunk",
             f"{'axis':24s} {'memory':>7s} {'off':>6s} {'top-1':>6s}"]
    for k, v in r["axes"].items():
        lines.append(f"{k:24s} {v['memory']:7.3f} {v['memory_off']:6.3f} {v['retrieval_top1']:6.3f}")
    lines.append(f"train {r['train_seconds']:.0f}s, wall {r['wall_seconds']:.0f}s, seed {r['seed']}")
    return "\n".join(lines)


__all__ = ["AXES", "FLAGSHIP_MODEL", "STAGE_KEYS", "ReadingRun", "ReadingSettings", "TrainedReading", "bank_texts",
           "build_reading_data", "evaluate_axes", "flagship_settings", "format_axes", "is_reading_run",
           "load_reading_run", "reading_questions", "reading_world", "run_reading", "texts_sha256", "train_reading", "write_reading_run"]
