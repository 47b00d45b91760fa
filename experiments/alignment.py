"""§6 and Table 19 at mini scale: base -> SFT -> DPO from the flagship, and how often each model makes up facts.

Starts from a reading run's model (default: the shipped flagship, ``notebooks/assets/memory3_demo``, issue 15: the
paper's memory format, top-8 tokens per KV head, 5 memories per chunk), loaded with
``mini_m3.reading.load_reading_run``: its world of people (a ``BioWorld``) is regenerated from the run's settings and
checked. Its bank (every person, held-out people included) is built in the work directory. Arms:

  base           the flagship, asked in its pretraining format ("Q: ... A:", bare value)
  sft            SFT with explicit memory attached (our choice), chat format
  sft_no_memory  SFT without memory (the other reading of the paper)
  dpo            DPO (beta 0.01) starting from `sft`, reference = `sft`, memory attached
  dpo_overcautious  the same DPO on pairs of which a third of the real-person ones reject "I do not know." (chosen:
                 the true answer) instead of a wrong value (`preference_pairs(overcautious_fraction=1/3)`, a lever:
                 plain DPO learns to abstain about everyone)

SFT data: questions about the world's training people (``memory`` and ``text``) in its training question wordings,
answered in a sentence that names the person, one to three turns; a quarter about people who exist nowhere (fake
names from the training people's name pools), answered "I do not know." (``mini_m3.data.instructions``). Each arm is
probed (`mini_m3.finetune.factuality_probe`) with memory and without, with questions in the training wordings and in
the held-out ones: (a) held-out people, whose biographies are only in the bank (exact match of the reply, and of the
value it states); (b) people who exist nowhere, named from the held-out people's name pools (as new to the
tokenizer as a held-out person): the rate of replies stating a value (made up) or "I do not know." (abstain).
Fine-tuned arms read a bank of their own (cold start: each memory is written by the tuned weights on first
retrieval, Remark 9).

    python experiments/alignment.py [--quick] [--model notebooks/assets/memory3_demo] [--out results/alignment.json]
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import machine, parse_args, plt, png_path, seed_all, write_json  # noqa: E402

from mini_m3.data.instructions import preference_pairs, sft_examples  # noqa: E402
from mini_m3.finetune import (DPOConfig, SFTConfig, bank_for_model, dpo, factuality_probe, reward_margin,  # noqa: E402
                              sft)
from mini_m3.reading import load_reading_run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FLAGSHIP = ROOT / "notebooks" / "assets" / "memory3_demo"
ARMS = ("base", "sft", "sft_no_memory", "dpo", "dpo_overcautious")
LABELS = {"base": "base (Q/A format)", "sft": "SFT + memory", "sft_no_memory": "SFT, no memory",
          "dpo": "SFT + memory -> DPO", "dpo_overcautious": "-> DPO, overcautious pairs"}
OVERCAUTIOUS = 1 / 3  # dpo_overcautious: the share of real-person pairs that reject the abstention
PHRASINGS = ("train", "heldout")  # the probe's question wordings: training ones, and ones training never used
FULL = dict(n_sft=3000, sft_epochs=3, n_pairs=2000, dpo_steps=250, probe=150, batch=16)
QUICK = dict(n_sft=400, sft_steps=40, n_pairs=160, dpo_steps=20, probe=30, batch=16)


def _extra(p):
    p.add_argument("--model", default=str(FLAGSHIP),
                   help="a reading run's model directory (mini_m3.reading.load_reading_run): the flagship by default")
    p.add_argument("--work-dir", default=None,
                   help="logs and banks (None: runs/alignment, or runs/alignment_quick with --quick)")


def probes(model, tok, bank, world, fmt: str, n: int, seed: int) -> dict:
    """factuality_probe in each question wording of PHRASINGS: {phrasing: probe result}."""
    return {ph: factuality_probe(model, tok, world, bank=bank, fmt=fmt, n_known=n, n_unknown=n, seed=seed,
                                 phrasing=ph) for ph in PHRASINGS}


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
    say = print if progress else (lambda *x, **k: None)
    t_start = time.perf_counter()
    P = QUICK if quick else FULL

    run = load_reading_run(a.model)
    base, tok, world = run.model, run.tokenizer, run.world
    say(f"bank: {len(run.references)} biographies, {base.cfg.memory_format}")
    bank = run.build_bank(work / "bank_raw", progress=progress)

    examples = sft_examples(world, P["n_sft"], seed=a.seed)
    sft_steps = P.get("sft_steps") or math.ceil(P["sft_epochs"] * P["n_sft"] / P["batch"])
    sft_cfg = SFTConfig(steps=sft_steps, batch_size=P["batch"], seed=a.seed, quiet=a.quiet, threads=a.threads)
    dpo_cfg = DPOConfig(steps=P["dpo_steps"], batch_size=P["batch"], seed=a.seed, quiet=a.quiet, threads=a.threads)

    arms: dict[str, dict] = {}
    say("probe: base")
    arms["base"] = {"fmt": "qa", "probe": probes(base, tok, bank, world, "qa", P["probe"], a.seed)}

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
        arms[name] = {"fmt": "chat", "train": train, "probe": probes(model, tok, own, world, "chat", P["probe"],
                                                                       a.seed)}
        models[name] = model

    held = preference_pairs(world, P["probe"], seed=a.seed + 1)  # pairs not trained on (new draw)
    for name, frac in (("dpo", 0.0), ("dpo_overcautious", OVERCAUTIOUS)):
        say(f"train: {name}")
        policy = copy.deepcopy(models["sft"])
        pairs = preference_pairs(world, P["n_pairs"], seed=a.seed, overcautious_fraction=frac)
        t0 = time.perf_counter()
        r = dpo(policy, models["sft"], tok, pairs, dpo_cfg, bank=bank, out_dir=work / name, resume=False)
        own = bank_for_model(policy, tok, bank, work / "banks" / name)
        say(f"probe: {name}")
        arms[name] = {"fmt": "chat", "overcautious_fraction": frac,
                      "pair_kinds": {k: sum(p.kind == k for p in pairs) for k in sorted({p.kind for p in pairs})},
                      "train": {"final_loss": r["final_loss"], "first_loss": r["losses"][0],
                                "final_reward_margin": r["reward_margins"][-1], "steps": r["steps_run"],
                                "step_time": r["step_time"], "seconds": time.perf_counter() - t0,
                                "reward_margin_new_pairs": reward_margin(policy, models["sft"], tok, held,
                                                                         beta=dpo_cfg.beta, bank=bank)},
                      "probe": probes(policy, tok, own, world, "chat", P["probe"], a.seed)}

    table = []
    for ph in PHRASINGS:
        for name in ARMS:
            pr = arms[name]["probe"][ph]
            row = {"arm": name, "phrasing": ph}
            for mode in ("memory", "none"):
                row[f"heldout_accuracy_{mode}"] = pr[mode]["known"]["accuracy"]
                row[f"heldout_value_accuracy_{mode}"] = pr[mode]["known"]["value_accuracy"]
                row[f"made_up_rate_{mode}"] = pr[mode]["unknown"]["made_up_rate"]
                row[f"abstain_rate_{mode}"] = pr[mode]["unknown"]["abstain_rate"]
            table.append(row)
    results = {
        "experiment": "alignment (§6, Table 19 at mini scale) from the flagship", "quick": quick, "seed": a.seed,
        "model": str(a.model), "reading_settings": dataclasses.asdict(run.settings),
        "bank": {"path": str(bank.path), "memory_format": base.cfg.memory_format, "n": len(bank)},
        "world": world.summary(), "n_sft_examples": len(examples), "n_pairs": P["n_pairs"],
        "sft_kinds": {k: sum(e.kind == k for e in examples) for k in sorted({e.kind for e in examples})},
        "probe": {"n_known": P["probe"], "n_unknown": P["probe"], "known_split": "heldout", "phrasings": PHRASINGS},
        "sft_config": dataclasses.asdict(sft_cfg), "dpo_config": dataclasses.asdict(dpo_cfg),
        "table": table, "arms": arms, "machine": machine(a.threads), "wall_seconds": time.perf_counter() - t_start,
    }
    write_json(out, results, seed=a.seed)
    plot(results, png_path(out))
    print(format_table(results))
    print(f"written {out} and {png_path(out)}")
    return 0


def format_table(r: dict) -> str:
    cols = (("acc mem", "heldout_accuracy_memory"), ("acc none", "heldout_accuracy_none"),
            ("value mem", "heldout_value_accuracy_memory"), ("made-up mem", "made_up_rate_memory"),
            ("made-up none", "made_up_rate_none"), ("abstain mem", "abstain_rate_memory"),
            ("abstain none", "abstain_rate_none"))
    lines = []
    for ph in PHRASINGS:
        lines.append(f"questions in {'training' if ph == 'train' else 'held-out'} wordings: (a) held-out people, "
                     f"(b) people who exist nowhere")
        lines.append(f"{'arm':28s}" + "".join(f"{'(a) ' + c if k.startswith('heldout') else '(b) ' + c:>17s}"
                                            for c, k in cols))
        for row in r["table"]:
            if row["phrasing"] == ph:
                lines.append(f"{LABELS[row['arm']]:28s}" + "".join(f"{row[k]:17.3f}" for _, k in cols))
    return "\n".join(lines)


def plot(r: dict, path) -> None:
    p = plt()
    import numpy as np
    fig, axes = p.subplots(len(PHRASINGS), 3, figsize=(14, 3.6 * len(PHRASINGS)), squeeze=False)
    for axrow, ph in zip(axes, PHRASINGS):
        rows = [row for row in r["table"] if row["phrasing"] == ph]
        x = np.arange(len(rows))
        wording = "training" if ph == "train" else "held-out"
        for ax, key, title in ((axrow[0], "heldout_accuracy", "(a) held-out people: exact match"),
                               (axrow[1], "made_up_rate", "(b) non-existent people: made-up answers"),
                               (axrow[2], "abstain_rate", "(b) non-existent people: \"I do not know.\"")):
            ax.bar(x - 0.2, [row[f"{key}_memory"] for row in rows], 0.4, label="with memory")
            ax.bar(x + 0.2, [row[f"{key}_none"] for row in rows], 0.4, label="without memory", color="C7")
            ax.set_xticks(x, [LABELS[row["arm"]] for row in rows], rotation=15, ha="right", fontsize=8)
            ax.set_ylim(0, 1); ax.set_title(f"{title}\nquestions in {wording} wordings", fontsize=9)
            ax.grid(axis="y", alpha=.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"mini_m3 alignment from the flagship{' (quick)' if r['quick'] else ''}, seed {r['seed']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    p.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
