"""§1 / §7 "effective size" at mini scale: how large must a no-memory model be to match Memory³ on trained people?

The paper's claim: Memory³-2.4B with explicit memory beats larger no-memory models. Here the Memory³ side is the
demo's model (`tiny`, read from the demo's results JSON, whose settings must match); the other side is a ladder of
no-memory models trained on exactly the demo's tokens with the demo control's schedule:
  1x  the `tiny` shape (the same model as the demo's row (a): a consistency check)
  2x  `tiny` with 8 layers instead of 4          (2.0x non-embedding parameters)
  4x  `tiny` with d_model 128, 8 heads, MLP 256  (4.0x non-embedding parameters)
Each is asked the demo's questions (trained people: text + memory splits; held-out people) with no memory.

    python experiments/effective_size.py [--quick] [--demo-json experiments/results/demo.json]

Training resumes from `<--work>/<rung>/` (checkpoints), so a killed run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HelpFormatter, machine, plt as pyplot, png_path, save_figure, seed_all, write_json  # noqa: E402

from mini_m3 import Memory3  # noqa: E402
from mini_m3.config import Memory3Config  # noqa: E402
from mini_m3.demo import DemoSettings, control_train_config, demo_questions, run_alltoken_demo  # noqa: E402
from mini_m3.world_data import build_world_data, setup_world  # noqa: E402
from mini_m3.evaluate import qa_eval  # noqa: E402
from mini_m3.train import train  # noqa: E402

RUNGS = {"1x": {}, "2x": dict(n_layers=8), "4x": dict(d_model=128, n_heads=8, n_kv_heads=4, mlp_width=256)}
# the demo settings that decide the data, the model shape and the training budget: they must match the demo JSON
MATCH = ("seed", "preset", "n_people", "vocab_size", "n_docs", "chunks_per_sequence", "batch_size", "warmup_steps",
         "continual_steps", "mix", "eval_phrasing", "lr", "eval_questions")


def check_demo(demo: dict, s: DemoSettings) -> None:
    want, have = (json.loads(json.dumps(x)) for x in (asdict(s), demo["settings"]))  # tuples -> lists, as in JSON
    bad = {k: (have.get(k), want[k]) for k in MATCH if have.get(k) != want[k]}
    if bad:
        raise SystemExit(f"the demo JSON was run with other settings (theirs, ours): {bad}; "
                         "rerun the demo or pass --run-demo")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="the demo's --quick settings (for tests)")
    p.add_argument("--out", default="experiments/results/effective_size.json",
                   help="result JSON (a PNG is drawn next to it)")
    p.add_argument("--work", default="runs/effective_size", help="checkpoints of each rung (a rerun resumes them)")
    p.add_argument("--demo-json", default="experiments/results/demo.json",
                   help="the Memory3 side: results.json of `mini-m3 demo --all-tokens` at the same settings")
    p.add_argument("--run-demo", action="store_true", help="run the demo into <--work>/demo instead of reading it")
    p.add_argument("--rungs", default=",".join(RUNGS),
                   help="which no-memory sizes to train (1x is the demo's own control: skip it to save time)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-rung lines")
    a = p.parse_args(argv)
    s = DemoSettings.quick() if a.quick else DemoSettings()
    out = Path(a.out)
    work = Path(a.work)
    if a.run_demo:
        demo = run_alltoken_demo(work / "demo", s, progress=not a.quiet)
        demo_source = str(work / "demo" / "results.json")
    else:
        demo = json.loads(Path(a.demo_json).read_text())
        demo_source = a.demo_json
    check_demo(demo, s)

    seed_all(s.seed)
    torch.set_num_threads(1)
    w = setup_world(s)
    data = build_world_data(w.world, w.tokenizer, s, w.cfg.chunk_length, w.retriever, w.reference_tokens,
                            not a.quiet)
    items = dict(zip(("trained", "heldout"), demo_questions(w.world, s)))  # the demo's own questions
    tc = control_train_config(s, quiet=a.quiet, threads=1)  # the demo control's schedule
    base = Memory3(w.cfg).num_parameters()
    rungs = {}
    for name in a.rungs.split(","):
        cfg = Memory3Config.from_dict({**w.cfg.to_dict(), **RUNGS[name]})
        torch.manual_seed(s.seed)
        model = Memory3(cfg)
        t0 = time.perf_counter()
        r = train(model, data, tc, out_dir=work / name, tokenizer=w.tokenizer, resume=True)
        log = [json.loads(line) for line in (work / name / "warmup.jsonl").read_text().splitlines() if line]
        qa = {split: qa_eval(model, w.tokenizer, its, mode="none") for split, its in items.items()}
        rungs[name] = {"overrides": RUNGS[name], "non_embedding_parameters": model.num_parameters(),
                       "size_ratio": model.num_parameters() / base,
                       "qa": {k: v["accuracy"] for k, v in qa.items()},
                       "answer_loglik": {k: v["answer_loglik"] for k, v in qa.items()},
                       "final_loss": log[-1]["loss"], "step_time": r["step_time"] if r["steps_run"] > 3 else None,
                       "seconds_this_run": time.perf_counter() - t0}
        if not a.quiet:
            print(name, rungs[name]["qa"], f"params {model.num_parameters()}", flush=True)

    results = {
        "memory3": {"non_embedding_parameters": demo["parameters"]["non_embedding"],
                    "qa": {k: demo["qa"][k]["memory"] for k in ("trained", "heldout")},
                    "qa_memory_off": {k: demo["qa"][k]["memory_off"] for k in ("trained", "heldout")},
                    "demo_no_memory_model": {k: demo["qa"][k]["no_memory_model"] for k in ("trained", "heldout")},
                    "demo_no_memory_model_final_loss": demo["final_loss"]["no_memory_model"],
                    "source": demo_source},
        "no_memory": rungs, "settings": asdict(s), "train_config": asdict(tc), "seed": s.seed,
        "machine": machine(1),
    }
    write_json(out, results, seed=s.seed)
    plot(results, png_path(out))
    return 0


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    rungs = dict(results["no_memory"])
    m = results["memory3"]
    if "1x" not in rungs:  # the demo's own no-memory control is the 1x rung (tests check they are the same run)
        rungs = {"1x (demo's a)": {"non_embedding_parameters": m["non_embedding_parameters"],
                                   "qa": m["demo_no_memory_model"]}, **rungs}
    for split, style in (("trained", "o-"), ("heldout", "s--")):
        xs = [r["non_embedding_parameters"] for r in rungs.values()]
        ax.plot(xs, [r["qa"][split] for r in rungs.values()], style, color="C0" if split == "trained" else "C7",
                label=f"no-memory models, {split} people")
        ax.plot([m["non_embedding_parameters"]], [m["qa"][split]], "*" if split == "trained" else "P", ms=13,
                color="C3" if split == "trained" else "C1", label=f"Memory3 + memory, {split} people")
    for name, r in rungs.items():
        ax.annotate(name, (r["non_embedding_parameters"], r["qa"]["trained"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xscale("log"); ax.set_xlabel("non-embedding parameters"); ax.set_ylabel("QA exact match")
    ax.set_ylim(0, 1); ax.grid(alpha=.3); ax.legend(fontsize=7)
    ax.set_title("Effective size: Memory3 (tiny) vs larger no-memory models, same tokens", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
