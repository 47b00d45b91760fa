"""`mini-m3 demo`: Memory³ reading explicit memory in the paper's format, measured small (§3.3-§3.6, §7).

The default demo (`run_demo`) trains the flagship's recipe (`reading.flagship_settings`), shortened to fit about
ten minutes on 2 CPU cores, on the BioWorld: a tokenizer trained on training text only; a warmup without memory;
continual training reading top-8 tokens per KV head, first of the chunk's own memory, then of the paper's 5
memories per chunk. It then writes the memory bank of every person and reports QA exact match on every held-out
axis (`reading.AXES`: people who exist only in the bank, new biography and question wordings, names in another
style) with memory and memory off, plus decoding throughput. Ten minutes do not read that format at this scale, so
the demo also evaluates a reading run trained longer (by default the shipped flagship,
notebooks/assets/memory3_demo) the same way on its own world, with its bank raw and vector-quantized and in RAG
mode. Results go to `OUT/results.json` and `OUT/results.png`; the model to `OUT/memory3_model`
(`reading.load_reading_run` reads it).

`run_alltoken_demo` (`mini-m3 demo --all-tokens`) is the earlier demo: the first knowledge world, all tokens of 1
memory per chunk, and a no-memory control trained beside it. Its numbers are in experiments/results/demo.json;
the effective-size, Fig 11 and ablation experiments build on its settings (`DemoSettings`).

The numbers depend only on the settings (seed, threads) and on what `results.json` records under "provenance":
package versions and PyTorch's CPU kernels (`cpu_capability`, AVX512 or AVX2 on x86, which round differently).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_weights, save_pretrained, save_weights
from .config import Memory3Config, atomic_write_text
from .data.world import World
from .evaluate import compare_decode_throughput, qa_eval, retrieval_hit_rate
from .memory.bank import MemoryBank
from .memory.retrieve import Retriever
from .model import Memory3
from .provenance import fixed_numerics, provenance
from .reading import (AXES, ReadingSettings, evaluate_axes, flagship_settings, load_reading_run, texts_sha256,
                      train_reading, write_reading_run)
from .train import ChunkedData, TrainConfig, plot_losses, stage_lr_warmup, train, two_stage_configs
from .world_data import WorldSettings, WorldSetup, build_world_data, setup_world

SPEED_MODES = ("memory", "none", "rag")  # decoding modes timed against each other (section 6)
# Fig 11's arms (§3.6): the kind of each of the two stages (experiments/two_stage.py, notebook 05)
FIG11_ARMS = {"control-control": ("warmup", "warmup"), "memory-memory": ("continual", "continual"),
              "control-memory": ("warmup", "continual")}


@dataclass
class DemoSettings(WorldSettings):
    """The all-token demo's settings (`run_alltoken_demo`, `mini-m3 demo --all-tokens`): `WorldSettings` (seed,
    preset, people, documents, memory format) plus its training, evaluation and timing settings. It reads
    `memories_per_chunk` memories per chunk and reports the paper's 5 as an extra row."""

    batch_size: int = 32
    warmup_steps: int = 300
    continual_steps: int = 3300
    eval_phrasing: str = "train"  # the QA format of training; the unseen paraphrase is reported as well
    lr: float = 3e-3
    eval_questions: int = 300
    vq_factory: str = "default"
    throughput_batch: int = 4
    throughput_new_tokens: int = 64
    throughput_rounds: int = 9  # interleaved rounds of memory / none / RAG decoding (+1 warm-up), medians reported
    threads: int = 2  # torch and faiss threads outside training (data, banks, evaluation), whatever the machine
    parallel: bool = True  # train the no-memory control in a second process (needs >= 2 cores to pay)

    def __post_init__(self):  # checked before training, not after it
        bad = {k: getattr(self, k) for k in ("warmup_steps", "continual_steps", "throughput_batch",
                                             "throughput_new_tokens", "throughput_rounds") if getattr(self, k) < 1}
        if bad:
            raise ValueError(f"DemoSettings: {bad} must be >= 1")

    @property
    def train_threads(self) -> int:
        """Threads of each training run: 1 when the control trains beside Memory³, else `threads`."""
        return 1 if self.parallel else self.threads

    @classmethod
    def quick(cls, **kw) -> "DemoSettings":
        base = dict(n_people=300, n_docs=2000, warmup_steps=30, continual_steps=40, eval_questions=40,
                    throughput_batch=1, throughput_new_tokens=16, throughput_rounds=3)
        base.update(kw)
        return cls(**base)


def _train_control(cfg_dict: dict, data: ChunkedData, tc: TrainConfig, out_dir: str, seed: int) -> None:
    """Body of the control process: train a fresh no-memory model and save its weights."""
    with fixed_numerics(seed, tc.threads):
        model = Memory3(Memory3Config.from_dict(cfg_dict))
        res = train(model, data, tc, out_dir=out_dir, resume=False)
    save_weights(model, Path(out_dir) / "final.safetensors")
    atomic_write_text(Path(out_dir) / "summary.json", json.dumps({k: v for k, v in res.items() if k != "losses"}))


class ControlJob:
    """The no-memory control run, in this process (`run`) or in a spawned one (`start` / `join`)."""

    def __init__(self, cfg: Memory3Config, data: ChunkedData, tc: TrainConfig, out_dir: Path, seed: int):
        self.cfg, self.args = cfg, (cfg.to_dict(), data, tc, str(out_dir), seed)
        self.out_dir, self.proc = Path(out_dir), None

    def run(self) -> None:
        _train_control(*self.args)

    def start(self) -> None:
        self.proc = torch.multiprocessing.get_context("spawn").Process(target=_train_control, args=self.args)
        self.proc.start()

    def join(self) -> None:
        self.proc.join()
        if self.proc.exitcode != 0:
            raise RuntimeError(f"the no-memory control process failed (exit code {self.proc.exitcode})")

    def result(self) -> tuple[Memory3, dict]:
        model = Memory3(self.cfg)
        load_weights(model, self.out_dir / "final.safetensors")
        return model.eval(), json.loads((self.out_dir / "summary.json").read_text())


@dataclass
class PaperDemoSettings(ReadingSettings):
    """The demo's settings (`run_demo`, `mini-m3 demo`): a reading run's (`ReadingSettings`: world, model, memory
    format, training chain) plus the VQ codec and the decoding-speed protocol. `paper_demo_settings` gives them."""

    vq_factory: str = "default"
    throughput_batch: int = 4
    throughput_new_tokens: int = 64
    throughput_rounds: int = 9  # interleaved rounds of memory / none decoding (+1 warm-up), medians reported
    vq_train_references: int = 4096  # references whose memories train the VQ codec (MemoryBank.build)
    # a trained reading run evaluated beside this one (`load_reading_run`): "shipped" = the flagship in
    # notebooks/assets/memory3_demo when the repository is there, "" = none, else a model directory
    flagship: str = "shipped"

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = {k: getattr(self, k) for k in ("throughput_batch", "throughput_new_tokens", "throughput_rounds",
                                             "vq_train_references") if getattr(self, k) < 1}
        if bad:
            raise ValueError(f"PaperDemoSettings: {bad} must be >= 1")

    def reading(self) -> ReadingSettings:
        """The reading run's part (what `load_reading_run` needs to regenerate the demo model's world)."""
        return ReadingSettings(**{f.name: getattr(self, f.name) for f in fields(ReadingSettings)})


SHIPPED_FLAGSHIP = Path(__file__).resolve().parents[1] / "notebooks" / "assets" / "memory3_demo"


def flagship_dir(s: PaperDemoSettings) -> Path | None:
    """The reading run the demo evaluates beside its own (None: none, or the shipped one is not in this checkout)."""
    if s.flagship == "shipped":
        return SHIPPED_FLAGSHIP if (SHIPPED_FLAGSHIP / "reading_run.json").exists() else None
    return Path(s.flagship) if s.flagship else None


# the demo's chain: the flagship's first stages, shortened to fit ten minutes on 2 cores with the evaluation (a
# warmup without memory; top-8 reading only the chunk's own memory; the paper's format), no lever stages. Short
# chains do not read the paper's format yet (experiments/README.md point 47: 0.000 after 3,000 steps)
DEMO_STEPS = {"warmup_steps": 300, "curriculum_steps": 1000, "continual_steps": 300}


def paper_demo_settings(seed: int = 0, *, threads: int = 2, quick: bool = False, **over) -> PaperDemoSettings:
    """The demo's recipe: `flagship_settings` (same world, model and paper's memory format) with DEMO_STEPS and no
    later stages. quick=True: a small world and a few hundred steps (the test suite runs it end to end)."""
    base = asdict(flagship_settings(seed, threads=threads))
    base.update(DEMO_STEPS, stages=[])
    if quick:
        base.update(n_people=600, n_docs=3000, warmup_steps=40, curriculum_steps=160, continual_steps=40,
                    batch_size=16, eval_questions=40)
        over = {"throughput_batch": 1, "throughput_new_tokens": 16, "throughput_rounds": 3,
                "vq_train_references": 1280, **over}  # 8 kept tokens each: faiss's 9,984 points for 256 centroids
    return PaperDemoSettings(**{**base, **over})


DEMO_GOAL = 0.90  # issue 15: held-out exact match in the paper's format
DEMO_SPEED_MODES = ("memory", "none")  # decoding modes timed against each other


def run_demo(out_dir: str | os.PathLike, settings: PaperDemoSettings | None = None, *, argv=None) -> dict:
    """`mini-m3 demo`: see the module docstring."""
    s = settings or paper_demo_settings()
    with fixed_numerics(s.seed, s.threads):  # seeds, threads, deterministic algorithms; restored after
        return _run_demo(Path(out_dir), s, argv)


def _run_demo(out: Path, s: PaperDemoSettings, argv) -> dict:
    say = print if s.progress else (lambda *a, **k: None)
    t_start = time.perf_counter()
    t = train_reading(out, s)  # world, tokenizer, data, the training chain (stage logs under OUT)
    model, tokenizer, cfg = t.model, t.tokenizer, t.model.cfg
    save_pretrained(model, out / "memory3_model", tokenizer)
    write_reading_run(out / "memory3_model", s.reading(), texts_sha256(t.references),
                      results=str(out / "results.json"))
    seconds = {"data_and_training": t.train_seconds}

    # this run's bank of every person (held-out and other-style people included); every axis with memory, memory
    # off and retrieval
    t0 = time.perf_counter()
    bank = MemoryBank.build(out / "bank_raw", model, tokenizer, t.references, retriever=Retriever(),
                            overwrite=True, progress=s.progress, seed=s.seed)
    axes = evaluate_axes(model, tokenizer, bank, t.items)
    seconds["bank_and_qa"] = time.perf_counter() - t0

    # decoding throughput (Table 21 protocol, scaled): memory vs none, same model, same 128-token prompts, the
    # modes taking turns over interleaved rounds (medians, their spread, per-round ratios). RAG is not timed: 5
    # references do not fit the mini model's 256-token context (its QA reads those that fit, "rag_references_read")
    t0 = time.perf_counter()
    prompts = [" ".join(t.references[i:i + 4]) for i in range(0, 400, 4)]
    speed = compare_decode_throughput(model, tokenizer, prompts, DEMO_SPEED_MODES, bank,
                                      rounds=s.throughput_rounds, batch_size=s.throughput_batch, prompt_tokens=128,
                                      new_tokens=s.throughput_new_tokens)
    seconds["throughput"] = time.perf_counter() - t0
    raw_bytes = bank.bytes_per_memory()
    bpm = {"raw": raw_bytes["stored"], "raw_bf16": raw_bytes["raw_bf16"]}

    # a reading run trained longer (the shipped flagship), evaluated here on its own world and questions, with its
    # bank raw and vector-quantized, and in RAG mode: what reading in the paper's format looks like when it works
    flagship, where = None, flagship_dir(s)
    if where is not None:
        t0 = time.perf_counter()
        say(f"evaluating the reading run in {where}")
        run = load_reading_run(where)
        fb = run.build_bank(out / "flagship_bank_raw", progress=s.progress)
        fvq = run.build_bank(out / "flagship_bank_vq", quantizer=s.vq_factory, progress=s.progress,
                             vq_train_references=s.vq_train_references)
        shown = "notebooks/assets/memory3_demo (shipped)" if where == SHIPPED_FLAGSHIP else str(where)
        flagship = {"model": shown, "seed": run.settings.seed, "steps": _steps(asdict(run.settings)),
                    "axes": evaluate_all_modes(run.model, run.tokenizer, fb, fvq, run.questions(s.eval_questions))}
        bpm["vq"] = fvq.bytes_per_memory()["stored"]
        seconds["flagship"] = time.perf_counter() - t0

    results = {
        "axes": axes, "flagship": flagship,
        "goal": {"heldout": DEMO_GOAL, "reached": axes["heldout"]["memory"] >= DEMO_GOAL},
        "memory_settings": cfg.memory_format, "training_retrieval_top1": t.training_retrieval_top1,
        "tokens_per_s": speed["tokens_per_s"], "tokens_per_s_spread": speed["spread"],
        "decode_ratios": speed["ratios"], "decode_rounds": speed["rounds"], "decode_method": speed["method"],
        "bytes_per_memory": bpm,
        "final_loss": {k: v["final_loss"] for k, v in t.stages.items()},
        "step_time": {k: v["step_time"] for k, v in t.stages.items()},
        "steps": {k: v["steps_run"] for k, v in t.stages.items()},
        "seconds": seconds, "train_seconds": t.train_seconds,
        "parameters": {"non_embedding": model.num_parameters(), "total": model.num_parameters(False)},
        "config": cfg.to_dict(), "settings": asdict(s), "world": t.world.summary(),
        "references_sha256": texts_sha256(t.references), "seed": s.seed,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "argv": list(argv) if argv is not None else None, "provenance": t.provenance,
        "wall_seconds": time.perf_counter() - t_start,
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    plot_demo(results, out / "results.png")
    say(format_demo(results))
    return results


def evaluate_all_modes(model, tokenizer, bank, bank_vq, items: dict) -> dict:
    """`evaluate_axes` (memory, memory off, retrieval) with VQ memory and RAG mode beside them, on every axis."""
    axes = evaluate_axes(model, tokenizer, bank, items)
    for axis, its in items.items():
        vq = qa_eval(model, tokenizer, its, mode="memory", bank=bank_vq)
        rag = qa_eval(model, tokenizer, its, mode="rag", bank=bank)
        axes[axis]["memory_vq"], axes[axis]["rag"] = vq["accuracy"], rag["accuracy"]
        axes[axis]["rag_references_read"] = rag["rag_references_read"]
        axes[axis]["answer_loglik"].update(memory_vq=vq["answer_loglik"], rag=rag["answer_loglik"])
    return axes


AXIS_NAMES = {"heldout": "held-out people", "new_bio_wording": "  new biography wordings",
              "new_question_wording": "  new question wordings", "all_new": "  both new",
              "other_style_names": "names in another style", "trained": "trained people (QA seen)"}
OWN_COLUMNS = {"memory": "memory", "memory_off": "off", "retrieval_top1": "top-1"}
FLAGSHIP_COLUMNS = {"memory": "memory", "memory_off": "off", "memory_vq": "VQ", "rag": "RAG", "retrieval_top1": "top-1"}


def _steps(st: dict) -> int:
    return st["warmup_steps"] + st["curriculum_steps"] + st["continual_steps"] + sum(x["steps"] for x in st["stages"])


def format_demo(r: dict) -> str:
    m, f = r["memory_settings"], r.get("flagship")
    row = lambda a, cols: "".join(f"{a[k]:7.3f}" for k in cols)  # noqa: E731
    head = lambda cols: "".join(f"{v:>7s}" for v in cols.values())  # noqa: E731
    lines = [f"memory format: {m['selector']}, {m['tokens_per_head']} tokens per KV head, {m['memories_per_chunk']} "
             f"memories per chunk (the paper's); {r['axes']['heldout']['n']} questions per axis",
             f"{'':26s}{'this run: ' + format(_steps(r['settings']), ',') + ' steps':21s}"
             + (f" | shipped flagship: {f['steps']:,} steps, seed {f['seed']}" if f else ""),
             f"{'QA exact match':26s}{head(OWN_COLUMNS)}" + (f" |{head(FLAGSHIP_COLUMNS)}" if f else "")]
    for axis in AXES:
        lines.append(f"{AXIS_NAMES[axis]:26s}{row(r['axes'][axis], OWN_COLUMNS)}"
                     + (f" |{row(f['axes'][axis], FLAGSHIP_COLUMNS)}" if f else ""))
    lines.extend(_decode_lines(r))
    b = r["bytes_per_memory"]
    lines.append(f"bytes per memory: raw {b['raw']}" + (f", VQ {b['vq']} ({b['raw'] / b['vq']:.1f}x smaller)"
                                                        if "vq" in b else ""))
    lines.append("step time: " + ", ".join(f"{k} {v:.3f}s" for k, v in r["step_time"].items()))
    held = r["axes"]["heldout"]
    verdict = "reaches" if held["memory"] >= r["goal"]["heldout"] else "is short of"
    lines.append(f"this run reads held-out people at {held['memory']:.3f} with memory ({held['memory_off']:.3f} off): "
                 f"it {verdict} the goal of {r['goal']['heldout']:.2f}.")
    if f:
        fh = f["axes"]["heldout"]
        lines.append(f"the flagship ({f['model']}) reads them at {fh['memory']:.3f} ({fh['memory_off']:.3f} off).")
    else:
        lines.append("no flagship evaluated (--flagship DIR, or run the demo in a checkout of the repository)")
    lines.append("`mini-m3 flagship --seed S` trains the same recipe longer, with named lever stages")
    lines.append("  (about an hour on 2 cores; experiments/README.md points 44-47; notebook 08)")
    lines.append(f"wall time {r['wall_seconds']:.0f}s: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f}s"
                                                                    for k, v in r["seconds"].items()))
    if "provenance" in r:
        lines.append(_provenance_line(r, f"{r['settings']['threads']} thread(s)"))
    return "\n".join(lines)


def plot_demo(r: dict, path: str | os.PathLike) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone
    f = r.get("flagship")
    bars = [("this run, memory", r["axes"], "memory", "C0"), ("this run, off", r["axes"], "memory_off", "C7")]
    if f:
        bars += [(f"flagship, {FLAGSHIP_COLUMNS[c]}", f["axes"], c, col)
                 for c, col in (("memory", "C3"), ("memory_off", "0.3"), ("memory_vq", "C1"), ("rag", "C2"))]
    x, width = np.arange(len(AXES)), 0.8 / len(bars)
    fig = Figure(figsize=(11, 3.8))
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1.2]})
    for k, (label, axes, c, color) in enumerate(bars):
        ax.bar(x + (k - (len(bars) - 1) / 2) * width, [axes[a][c] for a in AXES], width, label=label, color=color)
    ax.axhline(r["goal"]["heldout"], color="k", lw=0.8, ls="--", label="goal (held-out)")
    ax.set_xticks(x, [AXIS_NAMES[a].strip() for a in AXES], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("QA exact match"); ax.set_ylim(0, 1); ax.legend(fontsize=7, ncol=3); ax.grid(axis="y", alpha=.3)
    _plot_speed(ax2, r)
    m = r["memory_settings"]
    fig.suptitle(f"mini_m3 demo: {m['selector']} top-{m['tokens_per_head']}, {m['memories_per_chunk']} memories per "
                 f"chunk (seed {r['seed']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def demo_lr_warmup(s: DemoSettings) -> int:
    """LR warmup steps of both demo models: 10 % of the warmup stage (30 of the default 300), as `mini-m3 train`
    does, not the rule's 10 % of all steps (360 of 3600), which would ramp past the switch to memory."""
    return stage_lr_warmup(s.warmup_steps)


def control_train_config(s: DemoSettings, *, quiet: bool, threads: int) -> TrainConfig:
    """The no-memory control's schedule: all warmup + continual steps as one no-memory stage, at the same learning
    rate as Memory³'s two stages at every step (the same LR warmup, the decay over the last 10 % of all steps)."""
    total = s.warmup_steps + s.continual_steps
    return two_stage_configs(total, 0, lr_warmup=demo_lr_warmup(s), batch_size=s.batch_size, lr=s.lr, seed=s.seed,
                             quiet=quiet, threads=threads)[0]


def memory3_train_configs(s: DemoSettings, *, quiet: bool, threads: int) -> tuple[TrainConfig, TrainConfig]:
    """Memory³'s two stages: warmup without memory, then continual with memory, in the demo's memory format."""
    return two_stage_configs(s.warmup_steps, s.continual_steps, lr_warmup=demo_lr_warmup(s),
                             batch_size=s.batch_size, lr=s.lr, seed=s.seed, selector=s.selector,
                             tokens_per_head=s.tokens_per_head, quiet=quiet, threads=threads)


def two_stage_arm(arm: str, w: WorldSetup, data: ChunkedData, items: dict, s: DemoSettings, warmup_steps: int,
                  continual_steps: int, bank_dir: Path, **train_kw) -> dict:
    """One arm of Fig 11 (§3.6) on the demo's world: a fresh model (seed s.seed) trained on `data` in the arm's two
    stages (FIG11_ARMS) under one schedule (`two_stage_configs`; `train_kw`: more TrainConfig fields), its memory
    bank written to `bank_dir`, and QA exact match with memory and with memory off on each split of `items`
    ({split: questions}). Returns {"loss": the losses of every step, "final_loss", "qa", "seconds"}."""
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    model = Memory3(w.cfg)  # in the demo's memory format (setup_world writes s.selector into cfg)
    configs = two_stage_configs(warmup_steps, continual_steps, stages=FIG11_ARMS[arm], batch_size=s.batch_size,
                                lr=s.lr, seed=s.seed, **train_kw)
    runs = [train(model, data, tc) for tc in configs if tc is not None]
    bank = MemoryBank.build(bank_dir, model, w.tokenizer, w.references, overwrite=True, progress=False, seed=s.seed)
    qa = {split: {mode: qa_eval(model, w.tokenizer, its, mode=mode, bank=bank if mode == "memory" else None)["accuracy"]
                  for mode in ("memory", "none")} for split, its in items.items()}
    return {"loss": [x for r in runs for x in r["losses"]], "final_loss": runs[-1]["final_loss"], "qa": qa,
            "seconds": time.perf_counter() - t0}


def demo_questions(world: World, s: DemoSettings) -> tuple[list, list]:
    """(trained, held-out) QA items: trained = half `text`-split and half `memory`-split people."""
    def questions(split, n):
        return world.eval_questions(split, n, seed=s.seed, phrasing=s.eval_phrasing)
    n = s.eval_questions
    return questions("text", n // 2) + questions("memory", n - n // 2), questions("heldout", n)


def _reading_accuracy(items, r: dict) -> float:
    """Exact match over the questions whose own biography was retrieved first: reading, with retrieval's misses
    taken out."""
    ok = [c for it, c, ids in zip(items, r["correct"], r["retrieved"]) if ids[0] == it.person]
    return float(np.mean(ok)) if ok else float("nan")


def run_alltoken_demo(out_dir: str | os.PathLike, settings: DemoSettings | None = None, *,
                      progress: bool = True) -> dict:
    """The earlier demo (all tokens, 1 memory per chunk, a no-memory control): see the module docstring."""
    s = settings or DemoSettings()
    with fixed_numerics(s.seed, s.threads):  # seeds, threads, deterministic algorithms; restored after
        return _run_alltoken_demo(Path(out_dir), s, progress)


def _run_alltoken_demo(out: Path, s: DemoSettings, progress: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)
    t_start = time.perf_counter()
    prov = provenance(s.seed)  # at the start: the code this run imported, even if a commit lands meanwhile

    # 1. the world, the tokenizer, the retriever, the training data
    w = setup_world(s)
    world, tokenizer, cfg, references, reference_tokens, retriever = (
        w.world, w.tokenizer, w.cfg, w.references, w.reference_tokens, w.retriever)
    docs = world.training_documents(s.n_docs, seed=s.seed, mix=dict(s.mix))
    data = build_world_data(world, tokenizer, s, cfg.chunk_length, retriever, reference_tokens, progress, docs)
    chunk_person = [d.person for d in docs]
    flat = data.chunk_refs.flatten().tolist()
    pairs = [(p, r) for p, r in zip(chunk_person, flat) if p is not None]
    train_retrieval_acc = float(np.mean([p == r for p, r in pairs])) if pairs else float("nan")
    say(f"world: {world.summary()}; {len(data)} training sequences; training retrieval top-1 = {train_retrieval_acc:.3f}")

    # 2. the control: no memory, same shape, same tokens, same schedule (warmup + stable + decay over all steps).
    # With parallel=True it trains in a second process (one thread each), so both models train at once.
    control_tc = control_train_config(s, quiet=not progress, threads=s.train_threads)
    control_job = ControlJob(cfg, data, control_tc, out / "no_memory_model", s.seed)
    if s.parallel:
        control_job.start()
    else:
        control_job.run()
    # 3. Memory³: warmup without memory (no decay), then continual with memory (decay at the end)
    torch.manual_seed(s.seed)
    model = Memory3(cfg)
    warm_tc, cont_tc = memory3_train_configs(s, quiet=not progress, threads=s.train_threads)
    res_warm = train(model, data, warm_tc, out_dir=out / "memory3_warmup", tokenizer=tokenizer, resume=False)
    res_cont = train(model, data, cont_tc, out_dir=out / "memory3_continual", tokenizer=tokenizer, resume=False)
    if s.parallel:
        control_job.join()
        torch.set_num_threads(s.threads)
    control, res_control = control_job.result()
    plot_losses([out / "no_memory_model/warmup.jsonl", out / "memory3_warmup/warmup.jsonl"],
                out / "loss_warmup.png", ["no-memory model", "Memory3 warmup"])
    save_pretrained(model, out / "memory3_model", tokenizer)
    save_pretrained(control, out / "no_memory_model_weights", tokenizer)

    # 4. memory banks: raw (bf16) and vector-quantized
    t0 = time.perf_counter()
    bank = MemoryBank.build(out / "bank_raw", model, tokenizer, references, retriever=Retriever(),
                            selector=s.selector, tokens_per_head=s.tokens_per_head, overwrite=True,
                            progress=progress, seed=s.seed)
    bank_seconds = time.perf_counter() - t0
    bank_vq = MemoryBank.build(out / "bank_vq", model, tokenizer, references, retriever=Retriever(),
                               quantizer=s.vq_factory, selector=s.selector, tokens_per_head=s.tokens_per_head,
                               overwrite=True, progress=progress, seed=s.seed)

    # 5. QA: people seen in training (text + memory splits) and held-out people (bank only)
    def questions(split, n, phrasing=s.eval_phrasing):
        return world.eval_questions(split, n, seed=s.seed, phrasing=phrasing)
    trained, heldout = demo_questions(world, s)
    settings_eval = {
        "no_memory_model": dict(model=control, mode="none", bank=None),
        "memory": dict(model=model, mode="memory", bank=bank),
        "memory_off": dict(model=model, mode="none", bank=None),
        "memory_vq": dict(model=model, mode="memory", bank=bank_vq),
        "rag": dict(model=model, mode="rag", bank=bank),
    }
    qa, loglik, hit = {"trained": {}, "heldout": {}}, {"trained": {}, "heldout": {}}, {}
    for split, items in (("trained", trained), ("heldout", heldout)):
        for name, kw in settings_eval.items():
            r = qa_eval(kw["model"], tokenizer, items, mode=kw["mode"], bank=kw["bank"])
            qa[split][name] = r["accuracy"]
            loglik[split][name] = r["answer_loglik"]
            if name == "memory":
                hit[split] = {"top1": retrieval_hit_rate(items, r["retrieved"], 1),
                              f"top{cfg.memories_per_chunk}": retrieval_hit_rate(items, r["retrieved"]),
                              "qa_when_top1_hit": _reading_accuracy(items, r)}

    # the same held-out people asked with a phrasing never seen in training (retrieval is harder too)
    other = "heldout" if s.eval_phrasing == "train" else "train"
    para = qa_eval(model, tokenizer, questions("heldout", s.eval_questions, other), mode="memory", bank=bank)
    paraphrase = {"phrasing": other, "memory": para["accuracy"],
                  "retrieval_top1": retrieval_hit_rate(questions("heldout", s.eval_questions, other), para["retrieved"], 1)}
    # the paper reads 5 memories per chunk: retrieval's ranks 2-5 are mostly people sharing a name (look-alikes)
    five = qa_eval(model, tokenizer, heldout, mode="memory", bank=bank, memories_per_chunk=5)
    five_memories = {"memory": five["accuracy"], "answer_loglik": five["answer_loglik"],
                     "retrieval_top5": retrieval_hit_rate(heldout, five["retrieved"])}

    # 6. decoding throughput (Table 21 protocol, scaled): memory vs none vs RAG, same model, same 128-token prompts
    # (RAG puts the retrieved references in front of them). The modes take turns over interleaved rounds, so that
    # load from other jobs hits them alike: medians, their spread, and the ratios taken within each round.
    prompts = [" ".join(references[i:i + 4]) for i in range(0, 400, 4)]
    speed = compare_decode_throughput(model, tokenizer, prompts, SPEED_MODES, bank,
                                      rounds=s.throughput_rounds, batch_size=s.throughput_batch, prompt_tokens=128,
                                      new_tokens=s.throughput_new_tokens)

    bpm_raw, bpm_vq = bank.bytes_per_memory(), bank_vq.bytes_per_memory()
    results = {
        "qa": qa, "answer_loglik": loglik, "retrieval_hit_rate": hit, "qa_heldout_paraphrase": paraphrase,
        "qa_heldout_5_memories": five_memories,
        "training_retrieval_top1": train_retrieval_acc,
        "tokens_per_s": speed["tokens_per_s"],  # medians over the rounds
        "tokens_per_s_spread": speed["spread"], "decode_ratios": speed["ratios"], "decode_rounds": speed["rounds"],
        "decode_method": speed["method"],
        "bytes_per_memory": {"raw": bpm_raw["stored"], "vq": bpm_vq["stored"], "raw_bf16": bpm_raw["raw_bf16"]},
        "step_time": {"warmup": res_warm["step_time"], "continual": res_cont["step_time"],
                      "no_memory_model": res_control["step_time"]},
        "final_loss": {"no_memory_model": res_control["final_loss"], "memory3_warmup": res_warm["final_loss"],
                       "memory3_continual": res_cont["final_loss"]},
        "bank_build_seconds": bank_seconds,
        "parameters": {"non_embedding": model.num_parameters(), "total": model.num_parameters(False)},
        "config": cfg.to_dict(), "settings": asdict(s), "seed": s.seed,
        "world": world.summary(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "threads": {"train": s.train_threads, "other": s.threads},
        "provenance": prov,
        "wall_seconds": time.perf_counter() - t_start,
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    plot_results(results, out / "results.png")
    say(format_table(results))
    return results


NAMES = {"no_memory_model": "(a) no-memory model", "memory": "(b) Memory3 + memory",
         "memory_off": "(c) Memory3, memory off", "memory_vq": "(d) Memory3 + VQ memory", "rag": "(e) Memory3, RAG"}


def format_table(r: dict) -> str:
    lines = [f"{'setting':28s} {'trained QA':>11s} {'held-out QA':>12s}"]
    for key, label in NAMES.items():
        lines.append(f"{label:28s} {r['qa']['trained'][key]:11.3f} {r['qa']['heldout'][key]:12.3f}")
    pp = r["qa_heldout_paraphrase"]
    lines.append(f"held-out people asked in the {pp['phrasing']} phrasing: Memory3 + memory {pp['memory']:.3f} "
                 f"(retrieval top-1 {pp['retrieval_top1']:.3f})")
    if "qa_heldout_5_memories" in r:
        lines.append(f"held-out people, reading 5 memories (the paper's count): Memory3 + memory "
                     f"{r['qa_heldout_5_memories']['memory']:.3f}")
    st_ = r.get("settings")
    if st_ and (st_["selector"], st_["memories_per_chunk"]) != ("attention", 5):
        k = "every token" if st_["selector"] == "all" else f"{st_['tokens_per_head'] or 8} tokens per head"
        lines.append(f"memory format: {st_['selector']} ({k}), {st_['memories_per_chunk']} memory per "
                     f"chunk; the paper's (top-8 by attention, 5 memories) is not read yet at this scale: "
                     f"experiments/reading_levers.py")
    lines.extend(_decode_lines(r))
    b = r["bytes_per_memory"]
    lines.append(f"bytes per memory: raw {b['raw']}, VQ {b['vq']} ({b['raw'] / b['vq']:.1f}x smaller)")
    st = r["step_time"]
    lines.append(f"step time: warmup {st['warmup']:.3f}s, continual {st['continual']:.3f}s "
                 f"({st['continual'] / st['warmup']:.2f}x)")
    lines.append(f"wall time {r['wall_seconds']:.0f}s, seed {r['seed']}")
    if "provenance" in r:  # what the numbers depend on besides the settings
        lines.append(_provenance_line(r, f"{r['threads']['train']} training thread(s)"))
    return "\n".join(lines)


def _provenance_line(r: dict, threads: str) -> str:
    """What a demo's numbers depend on besides its settings: versions, CPU kernels, threads, commit."""
    p, v = r["provenance"], r["provenance"]["versions"]
    return (f"torch {v['torch']} ({p['cpu_capability']} kernels, {threads}), numpy {v['numpy']}, faiss {v['faiss']}, "
            f"tokenizers {v['tokenizers']}, commit {p['commit'][:7]}{'+changes' if p['dirty'] else ''}")


def _plot_speed(ax, r: dict) -> None:
    """Decoding tokens/s per mode: medians with min-max bars over the interleaved rounds (one bar each for a
    results.json from before them), the per-round ratios below."""
    t, sp = r["tokens_per_s"], r.get("tokens_per_s_spread")
    modes = list(t)
    err = [[t[m] - sp[m]["min"] for m in modes], [sp[m]["max"] - t[m] for m in modes]] if sp else None
    ax.bar(modes, [t[m] for m in modes], yerr=err, capsize=4, color=["C0", "C7", "C3"][:len(modes)])
    ax.set_ylabel("decode tokens/s")
    if sp:
        ax.set_title(f"median of {r['decode_rounds']} interleaved rounds\n(bars: min-max)", fontsize=8)
        ax.set_xlabel(f"{_ratio_text(r)}\n(median of per-round ratios)", fontsize=7)


def _decode_lines(r: dict) -> list[str]:
    """Decoding speed: medians with their min-max over the interleaved rounds, and the per-round ratios."""
    t, sp = r["tokens_per_s"], r.get("tokens_per_s_spread")
    if not sp:  # a results.json from before the interleaved rounds: one timing per mode
        return [f"decode tokens/s: memory {t['memory']:.0f}, none {t['none']:.0f}, rag {t['rag']:.0f}"]
    modes = ", ".join(f"{m} {t[m]:.0f} ({sp[m]['min']:.0f}-{sp[m]['max']:.0f})" for m in t)
    return [f"decode tokens/s, median (min-max) of {r['decode_rounds']} interleaved rounds: {modes}",
            f"  per-round ratios, median: {_ratio_text(r)}"]


def _ratio_text(r: dict) -> str:
    return ", ".join(f"{k.replace('_over_', '/')} {v['median']:.2f}" for k, v in r["decode_ratios"].items())


def plot_results(r: dict, path: str | os.PathLike) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's inline one) is left alone
    keys = list(NAMES)
    x = np.arange(len(keys))
    fig = Figure(figsize=(10, 3.6))
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1.3]})
    ax.bar(x - 0.2, [r["qa"]["trained"][k] for k in keys], 0.4, label="trained people")
    ax.bar(x + 0.2, [r["qa"]["heldout"][k] for k in keys], 0.4, label="held-out people (bank only)")
    ax.set_xticks(x, [NAMES[k] for k in keys], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("QA exact match"); ax.set_ylim(0, 1); ax.legend(fontsize=8); ax.grid(axis="y", alpha=.3)
    _plot_speed(ax2, r)
    fig.suptitle(f"mini_m3 demo ({r['config']['name']}, seed {r['seed']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
