"""Ablations of the explicit-memory design choices (§3.3, §3.6, §8) on the knowledge world.

One no-memory warmup is trained once; every variant then continues from a copy of that checkpoint with the
same data, seed and step count, changing one knob of the memory design:

  tokens_per_head  1, 2, 4, 8 (paper), 16, all         memory_layers  first half (paper), middle 25-75 %, all
  selector         attention (paper), exp, random,       memory_heads  1, all KV heads (paper)
                   first, all
  memories_per_chunk 1, 3, 5 (paper), 7  (read at evaluation: with one chunk per sequence, training reads one)
  vq               off, on (evaluation-time only)
  retrieval_interval 32, 64 (paper), 128 tokens per chunk, each chunk retrieving (and reading) one reference

Variants that are the same training run (the paper's setting appears in five groups) are trained once, and the
evaluation-time knobs reuse the paper-setting model. For each variant we report the final training loss, the
held-out LM loss on QA documents about held-out people with memory, and exact match and answer log-likelihood on
held-out people (memory mode), also every `--eval-every` steps, because reading memory appears as a phase
transition (experiments/README.md) and the step where it appears is what a knob changes most.

The retrieval interval changes the data layout, so its group trains on its own layout: the same documents back
to back (`pack_stream`) in 128-token sequences, batch 16 (the 2,048 tokens per step of the other groups, without
their padding), cut into chunks of 32, 64 or 128 tokens. Each chunk retrieves one reference from its own text, so
a short interval retrieves more often, from less text (a chunk may hold only part of a question), and a long one
leaves several people in a chunk with one memory between them. `chunk_reference_hit` is the fraction of chunks
whose reference is about a person the chunk's text is about. The group continues from the same warmup as the
others (one document per chunk); evaluation is the same for every group.

With `--merge`, the groups run now replace theirs in an existing `--out` file made with the same settings, and a
variant already there (same training run and evaluation knobs) is reused instead of trained again.

    python experiments/ablations.py [--quick] [--jobs 2] [--only GROUP,...] [--merge] [--replot]
                                    [--out experiments/results/ablations.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HelpFormatter, machine, plt as pyplot, png_path, save_figure, write_json  # noqa: E402

from mini_m3 import Memory3, Memory3Config, MemoryBank, Tokenizer  # noqa: E402
from mini_m3.checkpoint import load_weights, save_weights  # noqa: E402
from mini_m3.data.world import format_qa  # noqa: E402
from mini_m3.demo import DemoSettings  # noqa: E402
from mini_m3.world_data import build_world_data, setup_world  # noqa: E402
from mini_m3.evaluate import qa_eval  # noqa: E402
from mini_m3.train import ChunkedData, TrainConfig, evaluate_loss, pack_stream, train, two_stage_configs  # noqa: E402

# the paper's setting: top-8 by attention received, chunks of one document each (the layout of the other groups);
# the selector and tokens per head of a variant are its model's memory format (`variant_config`)
PAPER = {"selector": "attention", "tokens_per_head": None, "layout": "chunk"}
STREAM_LENGTH = 128  # sequence length of the retrieval-interval group's layout


def variants(cfg: Memory3Config) -> dict[str, list[tuple[str, dict, dict, dict]]]:
    """group -> [(label, config overrides, training knobs, evaluation-time knobs)]"""
    L = cfg.n_layers
    middle = tuple(range(L // 4, max(L // 4 + 1, (3 * L + 3) // 4)))
    return {
        "tokens_per_head": [(str(k), {}, {"tokens_per_head": k if k != cfg.memory_tokens_per_head else None}, {})
                            for k in (1, 2, 4, 8, 16)] + [("all", {}, {"selector": "all"}, {})],
        "selector": [(s, {}, {"selector": s}, {}) for s in ("attention", "exp", "random", "first", "all")],
        "memory_layers": [("first half", {}, {}, {}), (f"middle {list(middle)}", {"memory_layers": middle}, {}, {}),
                          ("all", {"memory_layers": tuple(range(L))}, {}, {})],
        "memory_heads": [("1", {"memory_heads": (0,)}, {}, {}), ("all", {}, {}, {})],
        "memories_per_chunk": [(str(n), {}, {}, {"memories_per_chunk": n}) for n in (1, 3, 5, 7)],
        "vq": [("off", {}, {}, {}), ("on", {}, {}, {"quantizer": "default"})],
        "retrieval_interval": [(str(c), {"chunk_length": c}, {"layout": "stream"}, {}) for c in (32, 64, 128)],
    }


def variant_config(base: Memory3Config, cfg_over: dict, knobs: dict) -> Memory3Config:
    """The model config of a variant: `base` with its overrides, in the memory format the variant trains in and its
    banks hold (the paper's top-k by attention unless its knobs name another selector or tokens per head). The format
    is the model's, so neither its TrainConfig nor its banks name one."""
    return base.replace(**cfg_over, memory_selector=knobs.get("selector", PAPER["selector"]),
                        memory_tokens_per_head=knobs.get("tokens_per_head") or base.memory_tokens_per_head)


def stream_hit_rate(documents: torch.Tensor, doc_people: list, chunk_refs: torch.Tensor, chunk_length: int) -> float:
    """Fraction of chunks (with a reference) whose reference is about a person with text in the chunk.
    documents: (N, T) index of the document of each token (`pack_stream(..., with_documents=True)`);
    reference id == person id in the world."""
    hits, total = 0, 0
    for s, row in enumerate(documents.view(documents.shape[0], -1, chunk_length).tolist()):
        for c, chunk in enumerate(row):
            r = int(chunk_refs[s, c])
            if r >= 0:
                total += 1
                hits += r in {doc_people[d] for d in chunk}
    return hits / max(total, 1)


def run_key(cfg_over: dict, knobs: dict) -> str:
    """Variants with the same key are the same training run. The default layout is left out of the key, so the
    keys of chunk-layout runs are those of result files written before the layout knob existed (`--merge`)."""
    run = {k: knobs.get(k, PAPER[k]) for k in PAPER}
    if run["layout"] == PAPER["layout"]:
        del run["layout"]
    return json.dumps({"cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(cfg_over.items())},
                       **run}, sort_keys=True)


def eval_key(key: str, ev: dict) -> str:
    return key + "|" + json.dumps(ev, sort_keys=True)


def stored_variants(path: Path, settings: dict, groups: dict) -> tuple[dict, dict]:
    """(the stored results file, {eval_key: stored entry}) for `--merge`; refuses a file with other settings."""
    old = json.loads(path.read_text())
    if old.get("settings") != json.loads(json.dumps(settings)):
        diff = {k: (old.get("settings", {}).get(k), v) for k, v in json.loads(json.dumps(settings)).items()
                if old.get("settings", {}).get(k) != v}
        raise SystemExit(f"--merge: {path} was made with other settings (stored, now): {diff}")
    found = {}
    for group, entries in old.get("groups", {}).items():
        known = {label: (c, k, e) for label, c, k, e in groups.get(group, [])}
        for label, entry in entries.items():
            if label in known and run_key(*known[label][:2]) == entry.get("run"):
                found[eval_key(entry["run"], known[label][2])] = entry
    return old, found


def evaluate(model, tok, refs, items, held, tc, seed, evals: list[dict]) -> list[dict]:
    """Held-out LM loss (with memory) and QA for each evaluation-time setting in `evals`."""
    lm = evaluate_loss(model, held, tc, max_batches=8)
    out = []
    for ev in evals:
        with tempfile.TemporaryDirectory() as d:
            bank = MemoryBank.build(d, model, tok, refs, quantizer=ev.get("quantizer"), overwrite=True,
                                    progress=False, seed=seed)
            qa = qa_eval(model, tok, items, mode="memory", bank=bank, memories_per_chunk=ev.get("memories_per_chunk"))
        out.append({"heldout_lm_loss": lm, "heldout_qa": qa["accuracy"], "heldout_answer_loglik": qa["answer_loglik"]})
    return out


def run_variant(job: dict) -> dict:
    """One training run (in this process or a worker): continue from the warmup, evaluate on the way and at the end."""
    torch.set_num_threads(1)
    tok = Tokenizer.load(job["tokenizer"])
    model = Memory3(Memory3Config.from_dict(job["cfg"]))
    load_weights(model, job["warm"])
    tc = TrainConfig(**job["tc"])
    refs, items, held, seed = job["refs"], job["items"], job["held"], tc.seed
    curve = []

    def on_eval(m, step):
        curve.append({"step": step + 1, **evaluate(m, tok, refs, items, held, tc, seed, [{}])[0]})
        return {}
    t0 = time.perf_counter()
    r = train(model, job["data"], tc, eval_fn=on_eval if tc.eval_every else None)
    final = evaluate(model, tok, refs, items, held, tc, seed, job["evals"])
    return {"final_train_loss": r["final_loss"], "curve": curve, "evals": final,
            "seconds": time.perf_counter() - t0, "key": job["key"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a short run of the same code (DemoSettings.quick; 10 warmup and 5 continual steps, no curve)")
    p.add_argument("--out", default="experiments/results/ablations.json",
                   help="result JSON (a PNG is drawn next to it)")
    p.add_argument("--only", default=None, help="comma-separated groups to run (None: every group)")
    p.add_argument("--seed", type=int, default=0, help="DemoSettings seed: world, data, initialisation, questions")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="steps of the shared no-memory warmup (None: 10 with --quick, else DemoSettings' 300)")
    p.add_argument("--continual-steps", type=int, default=None,
                   help="continual (memory) steps of each variant (None: 5 with --quick, else 2000)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="QA curve every N continual steps (0: off; None: 0 with --quick, else 500)")
    p.add_argument("--mix", default="qa=1", help="training documents (qa only: the fastest route to reading)")
    p.add_argument("--questions", type=int, default=200, help="held-out questions per evaluation")
    p.add_argument("--jobs", type=int, default=1, help="training runs in parallel, one thread each")
    p.add_argument("--merge", action="store_true", help="update --out in place, reusing the variants it holds")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG of an existing --out file")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-variant lines")
    a = p.parse_args(argv)
    if a.replot:
        plot(json.loads(Path(a.out).read_text()), png_path(Path(a.out)))
        return 0
    torch.set_num_threads(1)
    mix = tuple((k, float(v)) for k, v in (kv.split("=") for kv in a.mix.split(",")))
    s = DemoSettings.quick(seed=a.seed, mix=mix) if a.quick else DemoSettings(seed=a.seed, mix=mix)
    W = a.warmup_steps if a.warmup_steps is not None else (10 if a.quick else s.warmup_steps)
    C = a.continual_steps if a.continual_steps is not None else (5 if a.quick else 2000)
    every = a.eval_every if a.eval_every is not None else (0 if a.quick else 500)
    if W < 1 or C < 1:
        raise SystemExit(f"--warmup-steps={W}, --continual-steps={C}: every variant continues one warmup, so both "
                         f"stages need at least one step")
    w = setup_world(s)
    world, tok, base_cfg, refs = w.world, w.tokenizer, w.cfg, w.references
    docs = world.training_documents(s.n_docs, seed=s.seed, mix=dict(s.mix))
    data = build_world_data(world, tok, s, base_cfg.chunk_length, w.retriever, w.reference_tokens, not a.quiet,
                            docs=docs)
    # held-out LM data: QA documents (training format) about held-out people, who never appear in training
    heldout_people = world.people_in("heldout")
    held_docs = []
    for i, d in enumerate(world.training_documents(64, seed=s.seed + 7, mix={"qa": 1.0})):
        person = heldout_people[i % len(heldout_people)]
        lines = [format_qa(*world.qa(person, attr)) for attr in d.detail.split(",")]
        held_docs.append(type(d)("\n".join(lines), person.pid, "qa", d.detail))
    held = build_world_data(world, tok, s, base_cfg.chunk_length, w.retriever, w.reference_tokens, False,
                            docs=held_docs)
    items = world.eval_questions("heldout", min(s.eval_questions, a.questions), seed=s.seed, phrasing=s.eval_phrasing)
    settings = {**s.__dict__, "warmup_steps": W, "continual_steps": C, "eval_every": every, "questions": len(items)}
    groups = variants(base_cfg)
    if a.only:
        unknown = set(a.only.split(",")) - set(groups)
        if unknown:
            raise SystemExit(f"--only: unknown groups {sorted(unknown)}; known: {sorted(groups)}")
        groups = {g: v for g, v in groups.items() if g in a.only.split(",")}
    out = Path(a.out)
    old, stored = stored_variants(out, settings, variants(base_cfg)) if a.merge and out.exists() else (None, {})

    stream_cache: dict[int, tuple] = {}

    def layout(knobs: dict, chunk_length: int) -> tuple[ChunkedData, ChunkedData, int, dict]:
        """(training data, held-out LM data, batch size, facts about the layout) of a variant."""
        if knobs.get("layout", PAPER["layout"]) == "chunk":
            return data, held, s.batch_size, {}
        if chunk_length not in stream_cache:
            kw = dict(stream_length=STREAM_LENGTH)
            d = build_world_data(world, tok, s, chunk_length, w.retriever, w.reference_tokens, False, docs=docs, **kw)
            h = build_world_data(world, tok, s, chunk_length, w.retriever, w.reference_tokens, False,
                                 docs=held_docs, **kw)
            tokens, _, documents = pack_stream(tok.encode_batch([x.text for x in docs]), STREAM_LENGTH,
                                               bos_id=tok.bos_id, eos_id=tok.eos_id, with_documents=True)
            assert torch.equal(tokens, d.tokens)  # the layout build_world_data made
            hit = stream_hit_rate(documents, [x.person for x in docs], d.chunk_refs, chunk_length)
            facts = {"layout": "stream", "sequence_length": STREAM_LENGTH, "chunk_length": chunk_length,
                     "chunk_reference_hit": hit, "chunks_with_reference": float((d.chunk_refs >= 0).float().mean())}
            stream_cache[chunk_length] = (d, h, s.batch_size * base_cfg.chunk_length // STREAM_LENGTH, facts)
        return stream_cache[chunk_length]

    torch.manual_seed(s.seed)
    warm = Memory3(base_cfg)
    warm_tc, cont_tc = two_stage_configs(W, C, batch_size=s.batch_size, lr=s.lr, seed=s.seed, quiet=a.quiet, threads=1)
    train(warm, data, warm_tc)
    with tempfile.TemporaryDirectory() as tmp:
        save_weights(warm, Path(tmp) / "warm.safetensors")
        tok.save(Path(tmp) / "tokenizer.json")
        jobs: dict[str, dict] = {}  # one per distinct training run, with every evaluation-time setting it serves
        for vs in groups.values():
            for _, cfg_over, knobs, ev in vs:
                key = run_key(cfg_over, knobs)
                if eval_key(key, ev) in stored:
                    continue
                if key not in jobs:
                    cfg = variant_config(base_cfg, cfg_over, knobs)
                    d, h, bs, _ = layout(knobs, cfg.chunk_length)
                    tc = dataclasses.replace(cont_tc, eval_every=every, batch_size=bs)
                    jobs[key] = {"key": key, "cfg": cfg.to_dict(), "tc": tc.__dict__,
                                 "warm": str(Path(tmp) / "warm.safetensors"), "tokenizer": str(Path(tmp) / "tokenizer.json"),
                                 "data": d, "held": h, "refs": refs, "items": items, "evals": []}
                if ev not in jobs[key]["evals"]:
                    jobs[key]["evals"].append(ev)
        if not a.quiet:
            print(f"{sum(len(v) for v in groups.values())} variants = {len(jobs)} training runs of {C} steps"
                  f" ({len(stored)} stored variants reusable)", flush=True)
        if a.jobs > 1:
            with torch.multiprocessing.get_context("spawn").Pool(a.jobs) as pool:
                done = {r["key"]: r for r in pool.imap_unordered(run_variant, jobs.values())}
        else:
            done = {k: run_variant(j) for k, j in jobs.items()}

    results = old or {"settings": settings, "machine": machine(1), "groups": {}}
    if old:
        # which groups this run (re)made, on which machine; "machine" stays that of the first run
        results.setdefault("merged_runs", []).append({"groups": list(groups), "machine": machine(1),
                                                      "trained": len(jobs), "reused": len(stored)})
    for group, vs in groups.items():
        results["groups"][group] = {}
        for label, cfg_over, knobs, ev in vs:
            key = run_key(cfg_over, knobs)
            if eval_key(key, ev) in stored:
                results["groups"][group][label] = stored[eval_key(key, ev)]
            else:
                r = done[key]
                results["groups"][group][label] = {"final_train_loss": r["final_train_loss"],
                                                   **r["evals"][jobs[key]["evals"].index(ev)],
                                                   "curve": r["curve"], "seconds": r["seconds"], "run": key,
                                                   **layout(knobs, base_cfg.replace(**cfg_over).chunk_length)[3]}
            if not a.quiet:
                print(group, label, {k: v for k, v in results["groups"][group][label].items() if k != "curve"},
                      flush=True)
    write_json(out, results, seed=s.seed)
    plot(results, png_path(out))
    return 0


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    groups = results["groups"]
    runs: dict[str, tuple[list[str], list]] = {}
    for g, res in groups.items():
        for k, v in res.items():
            if v["curve"]:
                runs.setdefault(v["run"], ([], v["curve"]))[0].append(f"{g}={k}")
    paper = run_key({}, {})
    curves = {run: ("paper setting" if run == paper else " = ".join(labels), curve)
              for run, (labels, curve) in runs.items()}
    rows = 2 if curves else 1
    fig, axes = plt.subplots(rows, len(groups), figsize=(3.0 * len(groups), 3.0 * rows), squeeze=False)
    for ax, (group, res) in zip(axes[0], groups.items()):
        labels = list(res)
        ax.bar(range(len(labels)), [res[k]["heldout_qa"] for k in labels], color="C0")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(group, fontsize=9)
        ax.set_ylim(0, 1.08)
        for i, k in enumerate(labels):
            ax.text(i, res[k]["heldout_qa"], f"{res[k]['heldout_qa']:.2f}\nLM {res[k]['heldout_lm_loss']:.2f}",
                    ha="center", va="bottom", fontsize=5.5)
    axes[0][0].set_ylabel("held-out QA, memory (final)")
    if curves:
        gs = axes[1][0].get_gridspec()
        for ax in axes[1]:
            ax.remove()
        ax = fig.add_subplot(gs[1, :])
        for name, curve in sorted(curves.values(), key=lambda nc: nc[0]):
            ax.plot([c["step"] for c in curve], [c["heldout_qa"] for c in curve], "o-", ms=3, lw=1, label=name)
        ax.set_xlabel("continual step"); ax.set_ylabel("held-out QA, memory"); ax.set_ylim(0, 1); ax.grid(alpha=.3)
        ax.legend(fontsize=6, ncol=4)
    st = results["settings"]
    fig.suptitle(f"ablations: {st['continual_steps']} continual steps after {st['warmup_steps']} warmup steps, "
                 f"{st['preset']}, mix {dict(st['mix'])}, seed {st['seed']}", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
