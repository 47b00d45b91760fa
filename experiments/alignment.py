"""§6 and Table 19 at mini scale: base -> SFT -> DPO, and how often each model makes up facts.

Starts from the all-token demo's Memory³ model and raw bank (``mini-m3 demo --all-tokens --out
runs/demo_alltoken``: ``runs/demo_alltoken/memory3_model``, ``bank_raw``; the
world is regenerated from the demo's seed and size). If the demo directory has no model, a quick demo
(``DemoSettings.quick()``) is trained first, into the work directory. A demo bank this model cannot read (one
written by an older mini_m3: bank format version 3 or older) is built again from the demo model, into the work
directory, and the script says so. Arms:

  base           the demo model, asked in its pretraining format ("Q: ... A:", bare value)
  sft            SFT with explicit memory attached (our choice), chat format
  sft_no_memory  SFT without memory (the other reading of the paper)
  dpo            DPO (beta 0.01) starting from `sft`, reference = `sft`, memory attached

Each arm is probed (`mini_m3.finetune.factuality_probe`) with memory and without: (a) accuracy (exact match)
on held-out people whose biographies are only in the bank; (b) made-up rate on people who exist nowhere
(a reply stating a specific attribute value instead of "I do not know."). Fine-tuned arms read a bank of
their own (cold start: each memory is written by the tuned weights on first retrieval, Remark 9).

    python experiments/alignment.py [--quick] [--demo-dir runs/demo_alltoken] [--out experiments/results/alignment.json]
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import machine, parse_args, plt, png_path, seed_all, write_json  # noqa: E402

from mini_m3 import MemoryBank  # noqa: E402
from mini_m3.memory.bank import BankError  # noqa: E402
from mini_m3.checkpoint import load_pretrained  # noqa: E402
from mini_m3.data.instructions import preference_pairs, sft_examples  # noqa: E402
from mini_m3.data.world import World  # noqa: E402
from mini_m3.demo import DemoSettings, run_alltoken_demo  # noqa: E402
from mini_m3.finetune import (DPOConfig, SFTConfig, bank_for_model, dpo, factuality_probe, reward_margin,  # noqa: E402
                              sft)

ARMS = ("base", "sft", "sft_no_memory", "dpo")
LABELS = {"base": "base (Q/A format)", "sft": "SFT + memory", "sft_no_memory": "SFT, no memory",
          "dpo": "SFT + memory -> DPO"}
FULL = dict(n_sft=3000, sft_epochs=3, n_pairs=2000, dpo_steps=250, probe=150, batch=16)
QUICK = dict(n_sft=400, sft_steps=40, n_pairs=160, dpo_steps=20, probe=30, batch=16)


def _extra(p):
    p.add_argument("--demo-dir", default="runs/demo_alltoken",
                   help="output of `mini-m3 demo --all-tokens` (memory3_model, bank_raw)")
    p.add_argument("--work-dir", default=None,
                   help="logs and banks (None: runs/alignment, or runs/alignment_quick with --quick)")


def demo_inputs(demo_dir: Path, work: Path, quick: bool, threads: int, progress: bool) -> tuple[Path, dict, bool]:
    """The demo directory to use, its settings, and whether it was trained here."""
    if (demo_dir / "memory3_model" / "model.safetensors").exists() and (demo_dir / "bank_raw").exists():
        res = demo_dir / "results.json"
        settings = json.loads(res.read_text())["settings"] if res.exists() else dataclasses.asdict(DemoSettings())
        return demo_dir, settings, False
    here = work / "demo_quick"
    if not (here / "memory3_model" / "model.safetensors").exists():
        print(f"{demo_dir} has no trained model: training a quick demo in {here} first "
              f"({'as asked by --quick' if quick else 'NOTE: numbers will reflect a barely trained model'})")
        run_alltoken_demo(here, DemoSettings.quick(threads=threads), progress=progress)
    return here, json.loads((here / "results.json").read_text())["settings"], True


def demo_model(model_dir: Path, settings: dict):
    """The demo model and tokenizer, in the memory format the model was trained in: its config's. A config.json of
    version 1 predates the format field and loads as "attention"; for such a model the demo's settings say."""
    model, tok = load_pretrained(model_dir)
    fmt = {k: settings.get(k) for k in ("selector", "tokens_per_head", "memories_per_chunk")}
    trained = model.cfg.with_memory_format(**fmt).memory_format
    if trained != model.cfg.memory_format:
        if json.loads((model_dir / "config.json").read_text()).get("version") != 1:
            raise SystemExit(f"{model_dir / 'config.json'} says memory format {model.cfg.memory_format}, but the "
                             f"demo's settings say the model was trained in {trained}")
        print(f"NOTE: {model_dir / 'config.json'} predates the memory format field: reading the model in the format "
              f"the demo trained it in, {trained}")
        model = model.with_memory_format(**fmt)  # not an ablation: the trained format, which the old config lacks
    return model, tok


def demo_bank(demo_dir: Path, model, tok, references: list[str], work: Path, seed: int,
              progress: bool) -> tuple[MemoryBank, str | None]:
    """The demo's raw bank, or, where `model` cannot read it (a bank written by an older mini_m3, in another memory
    format, or damaged), one built again from `model` in `work` (the demo's files are left as they are); and why."""
    try:
        bank, why = MemoryBank.open(demo_dir / "bank_raw", model, tok), None
    except BankError as e:
        why = str(e)
        print(f"NOTE: the demo's bank cannot be used, so it is built again from the demo model in "
              f"{work / 'bank_raw'}: {why}", flush=True)
        bank = MemoryBank.build(work / "bank_raw", model, tok, references, overwrite=True, progress=progress,
                                seed=seed)
    if list(bank.texts) != references:
        raise SystemExit(f"{bank.path} does not hold the biographies of the demo's world")
    return bank, why


def main(argv=None) -> int:
    a = parse_args("alignment", argv, __doc__, _extra)
    quick = a.quick
    out = Path(a.out)
    if quick and out == Path(__file__).resolve().parent / "results" / "alignment.json":
        out = Path("runs/alignment_quick/alignment.json")  # quick numbers are not the experiment's result
    work = Path(a.work_dir or ("runs/alignment_quick" if quick else "runs/alignment"))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    seed_all(a.seed)
    progress = not a.quiet
    t_start = time.perf_counter()
    P = QUICK if quick else FULL

    demo_dir, settings, trained_here = demo_inputs(Path(a.demo_dir), work, quick, a.threads, progress)
    world = World.generate(settings["n_people"], seed=settings["seed"])
    base, tok = demo_model(demo_dir / "memory3_model", settings)
    bank, bank_rebuilt = demo_bank(demo_dir, base, tok, world.references(), work, settings["seed"], progress)

    examples = sft_examples(world, P["n_sft"], seed=a.seed)
    pairs = preference_pairs(world, P["n_pairs"], seed=a.seed)
    sft_steps = P.get("sft_steps") or math.ceil(P["sft_epochs"] * P["n_sft"] / P["batch"])
    sft_cfg = SFTConfig(steps=sft_steps, batch_size=P["batch"], seed=a.seed, quiet=a.quiet, threads=a.threads)
    dpo_cfg = DPOConfig(steps=P["dpo_steps"], batch_size=P["batch"], seed=a.seed, quiet=a.quiet, threads=a.threads)
    probe_kw = dict(world=world, n_known=P["probe"], n_unknown=P["probe"], seed=a.seed)

    arms: dict[str, dict] = {}
    say = print if progress else (lambda *x, **k: None)

    say("probe: base")
    arms["base"] = {"fmt": "qa", "probe": factuality_probe(base, tok, bank=bank, fmt="qa", **probe_kw)}

    models = {}
    for name, with_memory in (("sft", True), ("sft_no_memory", False)):
        say(f"train: {name}")
        model = copy.deepcopy(base)
        cfg = dataclasses.replace(sft_cfg, with_memory=with_memory)
        t0 = time.perf_counter()
        r = sft(model, tok, examples, cfg, bank=bank if with_memory else None, out_dir=work / name, resume=False)
        train = {"final_loss": r["final_loss"], "first_loss": r["losses"][0], "steps": r["steps_run"],
                 "step_time": r["step_time"], "seconds": time.perf_counter() - t0}
        if r["retrieved"] is not None:
            real = [(e.person, ids) for e, ids in zip(examples, r["retrieved"]) if e.person is not None]
            train["retrieval_hit_rate"] = sum(p in ids for p, ids in real) / max(1, len(real))
        own = bank_for_model(model, tok, bank, work / "banks" / name)
        say(f"probe: {name}")
        arms[name] = {"fmt": "chat", "train": train, "probe": factuality_probe(model, tok, bank=own, **probe_kw)}
        models[name] = model

    say("train: dpo")
    policy = copy.deepcopy(models["sft"])
    t0 = time.perf_counter()
    r = dpo(policy, models["sft"], tok, pairs, dpo_cfg, bank=bank, out_dir=work / "dpo", resume=False)
    held = preference_pairs(world, P["probe"], seed=a.seed + 1)  # pairs not trained on (new draw)
    own = bank_for_model(policy, tok, bank, work / "banks" / "dpo")
    say("probe: dpo")
    arms["dpo"] = {"fmt": "chat",
                   "train": {"final_loss": r["final_loss"], "first_loss": r["losses"][0],
                             "final_reward_margin": r["reward_margins"][-1], "steps": r["steps_run"],
                             "step_time": r["step_time"], "seconds": time.perf_counter() - t0,
                             "reward_margin_new_pairs": reward_margin(policy, models["sft"], tok, held,
                                                                      beta=dpo_cfg.beta, bank=bank)},
                   "probe": factuality_probe(policy, tok, bank=own, **probe_kw)}

    table = []
    for name in ARMS:
        pr = arms[name]["probe"]
        row = {"arm": name}
        for mode in ("memory", "none"):
            row[f"heldout_accuracy_{mode}"] = pr[mode]["known"]["accuracy"]
            row[f"made_up_rate_{mode}"] = pr[mode]["unknown"]["made_up_rate"]
            row[f"abstain_rate_{mode}"] = pr[mode]["unknown"]["abstain_rate"]
        table.append(row)
    results = {
        "experiment": "alignment (§6, Table 19 at mini scale)", "quick": quick, "seed": a.seed,
        "demo_dir": str(demo_dir), "demo_trained_here": trained_here, "demo_settings": settings,
        "bank": {"path": str(bank.path), "rebuilt_because": bank_rebuilt, "memory_format": base.cfg.memory_format},
        "world": world.summary(), "n_sft_examples": len(examples), "n_pairs": len(pairs),
        "probe": {"n_known": P["probe"], "n_unknown": P["probe"], "known_split": "heldout", "phrasing": "heldout"},
        "sft_config": dataclasses.asdict(sft_cfg), "dpo_config": dataclasses.asdict(dpo_cfg),
        "table": table, "arms": arms, "machine": machine(a.threads), "wall_seconds": time.perf_counter() - t_start,
    }
    write_json(out, results, seed=a.seed)
    plot(results, png_path(out))
    print(format_table(results))
    print(f"written {out} and {png_path(out)}")
    return 0


def format_table(r: dict) -> str:
    lines = [f"{'arm':22s} {'(a) acc mem':>11s} {'(a) acc none':>12s} {'(b) made-up mem':>15s} "
             f"{'(b) made-up none':>16s} {'(b) abstain mem':>15s} {'(b) abstain none':>16s}"]
    for row in r["table"]:
        lines.append(f"{LABELS[row['arm']]:22s} {row['heldout_accuracy_memory']:11.3f} {row['heldout_accuracy_none']:12.3f} "
                     f"{row['made_up_rate_memory']:15.3f} {row['made_up_rate_none']:16.3f} "
                     f"{row['abstain_rate_memory']:15.3f} {row['abstain_rate_none']:16.3f}")
    return "\n".join(lines)


def plot(r: dict, path) -> None:
    p = plt()
    import numpy as np
    rows = r["table"]
    x = np.arange(len(rows))
    fig, axes = p.subplots(1, 3, figsize=(14, 3.8))
    for ax, key, title in ((axes[0], "heldout_accuracy", "(a) held-out people: exact match"),
                           (axes[1], "made_up_rate", "(b) non-existent people: made-up answers"),
                           (axes[2], "abstain_rate", "(b) non-existent people: \"I do not know.\"")):
        ax.bar(x - 0.2, [row[f"{key}_memory"] for row in rows], 0.4, label="with memory")
        ax.bar(x + 0.2, [row[f"{key}_none"] for row in rows], 0.4, label="without memory", color="C7")
        ax.set_xticks(x, [LABELS[row["arm"]] for row in rows], rotation=15, ha="right", fontsize=8)
        ax.set_ylim(0, 1); ax.set_title(title, fontsize=9); ax.grid(axis="y", alpha=.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"mini_m3 alignment{' (quick)' if r['quick'] else ''}, seed {r['seed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    p.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
