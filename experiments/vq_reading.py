"""§3.3 / Table 16: vector-quantized memories on a model that reads the paper's format: bytes against QA (issue 16).

The paper finds that VQ to 8.75 % of the bytes costs nothing (Table 16). Here the model is a reading run's (by
default the shipped flagship, notebooks/assets/memory3_demo: `mini-m3 flagship --seed 1`, top-8 tokens per KV head
of 16 dimensions, 5 memories per chunk). The script builds its bank of every person raw (bf16) and with each codec
(faiss factory strings, one codebook per key/value, memory layer and head, trained on the first
`--vq-train-references` references' memories, as `MemoryBank.build` does), and asks the run's own questions with
each bank: held-out people (bank only) and trained people. It also measures each codec's round trip on the stored
vectors of the first 512 references (relative squared error ||x - x̂||² / ||x||², mean cosine). Writes
`experiments/results/vq_reading.json` and a plot beside it.

    python experiments/vq_reading.py --threads 2
    python experiments/vq_reading.py --model runs/flagship_s0/model --codecs PQ4x8np PQ8x8np --out /tmp/vq.json
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import parse_args, plt, png_path, save_figure, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CODECS = ["PQ4x8np", "PQ8x8np", "PQ16x8np", "SQ8"]  # at d_h 16: 4, 8, 16 and 16 bytes per vector (bf16: 32)
SPLITS = ("heldout", "trained")


def _extra(p):
    p.add_argument("--model", default=str(ROOT / "notebooks" / "assets" / "memory3_demo"),
                   help="a reading run's model directory (`reading.load_reading_run`): the shipped flagship by default")
    p.add_argument("--codecs", nargs="+", default=CODECS, help="faiss factory strings, one bank each")
    p.add_argument("--questions", type=int, default=None, help="questions per split (None: the run's own count)")
    p.add_argument("--vq-train-references", type=int, default=4096,
                   help="references whose memories train each codec (MemoryBank.build)")


def round_trip(raw, vq, n: int = 512) -> dict:
    """Relative squared error and mean cosine of the VQ bank's stored keys and values against the raw bank's."""
    from mini_m3.memory.quantize import _error_stats
    ids = list(range(min(n, len(raw))))
    m_raw, m_vq = raw.get(ids), vq.get(ids)
    mask = m_raw.mask.numpy()
    out = {}
    for kind in ("keys", "values"):
        x = getattr(m_raw, kind).float().numpy()[mask].astype(np.float64)
        x_hat = getattr(m_vq, kind).float().numpy()[mask].astype(np.float64)
        out[kind] = _error_stats(x, x_hat)
    return out


def main(argv=None) -> dict:
    a = parse_args("vq_reading", argv, __doc__, _extra)
    import torch

    from mini_m3.evaluate import qa_eval
    from mini_m3.provenance import fixed_numerics
    from mini_m3.reading import load_reading_run

    with fixed_numerics(a.seed, a.threads), tempfile.TemporaryDirectory() as tmp:
        run = load_reading_run(a.model)
        n = a.questions or (40 if a.quick else run.settings.eval_questions)
        codecs = a.codecs[:1] if a.quick else a.codecs
        items = {k: v for k, v in run.questions(n).items() if k in SPLITS}
        raw = run.build_bank(Path(tmp) / "raw", progress=not a.quiet)
        qa = {"raw (bf16)": {k: qa_eval(run.model, run.tokenizer, v, mode="memory", bank=raw)["accuracy"]
                             for k, v in items.items()}}
        qa["memory off"] = {k: qa_eval(run.model, run.tokenizer, v, mode="none")["accuracy"] for k, v in items.items()}
        rows = [{"codec": "raw (bf16)", "bytes_per_memory": raw.bytes_per_memory()["stored"], "qa": qa["raw (bf16)"]}]
        for codec in codecs:
            vq = run.build_bank(Path(tmp) / codec, quantizer=codec, progress=not a.quiet,
                                vq_train_references=min(a.vq_train_references, 1280 if a.quick else 10**9))
            rows.append({"codec": codec, "code_bytes_per_vector": vq.quantizer.code_size,
                         "bytes_per_memory": vq.bytes_per_memory()["stored"],
                         "qa": {k: qa_eval(run.model, run.tokenizer, v, mode="memory", bank=vq)["accuracy"]
                                for k, v in items.items()},
                         "round_trip": round_trip(raw, vq)})
            if not a.quiet:
                print(rows[-1]["codec"], rows[-1]["bytes_per_memory"], rows[-1]["qa"])
        result = {"model": str(a.model), "run_seed": run.settings.seed, "memory_format": run.model.cfg.memory_format,
                  "questions_per_split": n, "memory_off": qa["memory off"], "rows": rows,
                  "torch_threads": torch.get_num_threads()}
    out = write_json(a.out, result, seed=a.seed)
    plot(result, png_path(out))
    print(f"{'codec':12s} {'bytes/memory':>12s} " + " ".join(f"{s:>8s}" for s in SPLITS))
    for r in rows:
        print(f"{r['codec']:12s} {r['bytes_per_memory']:12d} " + " ".join(f"{r['qa'][s]:8.3f}" for s in SPLITS))
    print(f"{'memory off':12s} {'':12s} " + " ".join(f"{result['memory_off'][s]:8.3f}" for s in SPLITS))
    return result


def plot(r: dict, path: Path) -> None:
    p = plt()
    fig, ax = p.subplots(figsize=(6, 3.6))
    for s, marker in zip(SPLITS, "os"):
        xs = [row["bytes_per_memory"] for row in r["rows"]]
        ax.plot(xs, [row["qa"][s] for row in r["rows"]], marker, label=f"{s} people")
        for row in r["rows"]:
            ax.annotate(row["codec"], (row["bytes_per_memory"], row["qa"][s]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(r["memory_off"][s], ls=":", lw=0.8, color="C0" if s == "heldout" else "C1")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per memory (log scale)")
    ax.set_ylabel("QA exact match")
    ax.set_ylim(0, 1)
    ax.set_title(f"VQ on a reading model's memories ({r['questions_per_split']} questions per split)", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
