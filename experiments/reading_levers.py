"""Issue 15: which levers make a mini model read memory in the paper's format (top-8 tokens, 5 memories)?

One run = `mini_m3.reading.run_reading` with the settings given here; each run writes OUT/results.json (argv, commit,
seed, versions). `experiments/results/reading_levers.md` keeps the table of runs, failures included.

    python experiments/reading_levers.py --out runs/base --preset small --continual-steps 2000
    python experiments/reading_levers.py --out runs/deep --model n_layers=8 --curriculum-steps 300
    python experiments/reading_levers.py table runs/*/results.json     # the markdown table of runs
    python experiments/reading_levers.py formats OUT.json runs/a runs/b  # each model read in 4 memory formats
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from mini_m3.reading import ReadingSettings, run_reading


def parse_model(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, _, v = it.partition("=")
        out[k] = json.loads(v) if v[:1] in "0123456789-[{tf" else v
    return out


def table(paths: list[str]) -> str:
    """One markdown row per results.json: the levers of the run, then memory / off for every axis. (Runs before
    name_share / value_share existed used 4 / 8.)"""
    from mini_m3.reading import AXES
    rows = ["| run | world (people per name / value, vocab) | model, memory format | steps: warmup + 1-memory "
            "curriculum + main | " + " | ".join(AXES) + " |", "|---|---|---|---|" + "---|" * len(AXES)]
    for path in paths:
        r = json.loads(open(path).read())
        s, c = r["settings"], r["config"]
        model = (f"{c['n_layers']}L d{c['d_model']} kv{c['n_kv_heads']}, memory layers {c['memory_layers']}, "
                 f"{r['memory_settings']['selector']}/{r['memory_settings']['tokens_per_head']}/"
                 f"{r['memory_settings']['memories_per_chunk']}")
        cells = [f"{r['axes'][a]['memory']:.3f} / {r['axes'][a]['memory_off']:.3f}" for a in AXES]
        world = f"{s.get('name_share', 4)} / {s.get('value_share', 8)}, {s['vocab_size']}"
        init = f" (from `{s['init_model']}`)" if s.get("init_model") else ""
        rows.append(f"| `{path}` | {world} | {model} | {s['warmup_steps']} + {s['curriculum_steps']} + "
                    f"{s['continual_steps']}{init} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


FORMATS = (("all", 1), ("all", 5), ("attention", 1), ("attention", 5))


def formats(run_dirs: list[str], out: str, n: int = 200) -> dict:
    """Which half of the paper's format breaks reading: each run's model read in all four combinations of
    {all tokens, top-8} x {1, 5 memories} on the held-out axis (its bank rebuilt in each format through
    `with_memory_format`, a deliberate ablation). All runs must share the world settings of the first."""
    import tempfile

    import torch

    from mini_m3.checkpoint import load_pretrained
    from mini_m3.evaluate import qa_eval
    from mini_m3.memory.bank import MemoryBank
    from mini_m3.memory.retrieve import Retriever
    from mini_m3.reading import build_reading_data, reading_questions
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_json

    settings = json.loads((Path(run_dirs[0]) / "results.json").read_text())["settings"]
    s = ReadingSettings(**{**settings, "progress": False})
    world, others, tok, cfg, refs, data, docs = build_reading_data(s)
    items = reading_questions(world, others, n, s.seed)["heldout"]
    result = {"question_set": "heldout", "n": n, "runs": {}}
    for run in run_dirs:
        model, run_tok = load_pretrained(Path(run) / "model")
        assert run_tok.fingerprint() == tok.fingerprint(), f"{run}: another tokenizer than {run_dirs[0]}"
        row = {}
        for sel, k in FORMATS:
            m = model.with_memory_format(selector=sel, tokens_per_head=8 if sel == "attention" else None,
                                         memories_per_chunk=k)
            with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
                bank = MemoryBank.build(Path(tmp) / "bank", m, tok, refs, retriever=Retriever(), progress=False)
                row[f"{sel}/{k}"] = qa_eval(m, tok, items, mode="memory", bank=bank)["accuracy"]
            print(run, sel, k, f"{row[f'{sel}/{k}']:.3f}", flush=True)
        result["runs"][run] = {"trained_in": model.cfg.memory_format, "heldout_qa": row}
    write_json(out, result, seed=s.seed)
    return result


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        print(table(argv[1:]))
        return
    if argv[:1] == ["formats"]:  # formats OUT.json RUN_DIR [RUN_DIR ...]
        formats(argv[2:], argv[1])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", nargs="*", default=[], help="Memory3Config overrides, e.g. n_layers=8 memory_tokens_per_head=8")
    p.add_argument("--quiet", action="store_true")
    for f in fields(ReadingSettings):
        if f.name in ("model", "progress"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a = p.parse_args(argv)
    kw = {f.name: getattr(a, f.name) for f in fields(ReadingSettings) if f.name not in ("model", "progress")}
    s = ReadingSettings(**kw, model=parse_model(a.model), progress=not a.quiet)
    run_reading(a.out, s, argv=["experiments/reading_levers.py", *argv])


if __name__ == "__main__":
    main()
