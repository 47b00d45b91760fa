"""§3.3 / Table 16: the paper's own codec, "OPQ20x80-Residual2x14-PQ8x10", on a trained model's memories (issue 16).

The paper's composite quantizer needs head dim 80. `mini-m3 demo --all-tokens --preset tiny-d80` trains the
all-token demo's model at that head dim and builds its VQ bank with the paper's factory string (the default codec
at d_h 80). This script reads that demo's folder and measures what the codec does to the memories it stores: bytes per memory raw (bf16) and
VQ, the relative squared error ||x - x̂||² / ||x||² and the cosine of keys and values over every stored vector
(the codec is trained on the bank it stores, as the paper's), and, from the demo's results.json, held-out and
trained QA exact match and answer log-likelihood read from the raw (bf16) bank and from the VQ bank.

    mini-m3 demo --all-tokens --preset tiny-d80 --out runs/demo_d80
    python experiments/paper_codec.py --demo runs/demo_d80
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, parse_args, write_json  # noqa: E402


def _extra(p):
    p.add_argument("--demo", required=True, help="output folder of `mini-m3 demo --all-tokens --preset tiny-d80` "
                   "(models, banks, results.json)")
    p.set_defaults(out=str(RESULTS / "paper_codec.json"))


def error_stats(x: np.ndarray, x_hat: np.ndarray) -> dict:
    """The codec's own error measures (`quantize._error_stats`: mse, relative_mse = ||x - x̂||² / ||x||², mean
    cosine) of rows of x (n, d) against their reconstructions, and how many dims hold 99.9 % of x's energy."""
    from mini_m3.memory.quantize import _error_stats
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    # how many of the d dimensions the vectors really use: a d_model-64 model's 80-dim heads are projections of a
    # 64-dim residual stream (keys then rotated by RoPE), an easier target than the paper's d_model 3,200
    sv = np.linalg.svd(x[:: max(1, len(x) // 20000)], compute_uv=False) ** 2
    dims = int(np.searchsorted(np.cumsum(sv) / sv.sum(), 0.999) + 1)
    return {**_error_stats(x, x_hat), "vectors": int(x.shape[0]), "dims_for_99.9pct_energy": dims}


def main(argv=None) -> dict:
    a = parse_args("paper_codec", argv, __doc__, _extra)
    from mini_m3.checkpoint import load_pretrained
    from mini_m3.memory.bank import MemoryBank
    from mini_m3.memory.quantize import PAPER_FACTORY, VectorQuantizer

    demo = Path(a.demo)
    model, tok = load_pretrained(demo / "memory3_model")
    if model.cfg.head_dim != 80:
        raise SystemExit(f"{demo}: head dim {model.cfg.head_dim}; the paper's codec needs 80 (--preset tiny-d80)")
    raw = MemoryBank.open(demo / "bank_raw", model, tok)
    vq = MemoryBank.open(demo / "bank_vq", model, tok)
    if vq.quantizer is None:
        raise SystemExit(f"{demo / 'bank_vq'} is not a VQ bank")
    stats = {"keys": ([], []), "values": ([], [])}
    first = {"keys": [], "values": []}  # raw vectors of (last memory layer, memory head 0), by reference
    for s in range(0, len(raw), 256):
        ids = list(range(s, min(len(raw), s + 256)))
        m_raw, m_vq = raw.get(ids), vq.get(ids)
        mask = m_raw.mask.numpy()  # (N, L_mem, H_mem, k) real slots
        for kind in stats:
            x, x_hat = getattr(m_raw, kind).float().numpy(), getattr(m_vq, kind).float().numpy()
            stats[kind][0].append(x[mask])
            stats[kind][1].append(x_hat[mask])
            first[kind] += [x[i, -1, 0][mask[i, -1, 0]] for i in range(len(ids))]
    err = {k: error_stats(np.concatenate(v[0]), np.concatenate(v[1])) for k, v in stats.items()}
    # the bank's codec is trained on the vectors it stores (as the paper's is); 2 x 16,384 residual centroids on
    # ~84k vectors per group may partly memorise them, so one group's codec is also trained on the first half of
    # the references and measured on the second half (memories it never saw). The group is in the last memory
    # layer: layer 0's values are a function of the token id alone (at most vocab-size distinct vectors)
    held_out = {}
    for kind, rows in first.items():
        half = len(rows) // 2
        train_x, test_x = np.concatenate(rows[:half]), np.concatenate(rows[half:])
        q = VectorQuantizer(PAPER_FACTORY, 80).train(train_x, seed=a.seed)
        held_out[kind] = {"train_half": error_stats(train_x, q.decode(q.encode(train_x))),
                          "held_out_half": error_stats(test_x, q.decode(q.encode(test_x)))}
    demo_res = json.loads((demo / "results.json").read_text())
    result = {
        "demo": str(demo), "demo_argv": demo_res.get("argv") or demo_res.get("provenance", {}).get("argv"),
        "demo_commit": demo_res.get("provenance", {}).get("commit"),
        "factory": vq.quantizer.factory, "is_paper_factory": vq.quantizer.factory == PAPER_FACTORY,
        "code_bytes_per_vector": vq.quantizer.code_size, "memory_format": model.cfg.memory_format,
        "references": len(raw), "bytes_per_memory": {"raw": raw.bytes_per_memory(), "vq": vq.bytes_per_memory()},
        "reconstruction": err,
        "codec_on_unseen_memories": {"group": f"memory layer {model.cfg.memory_layers[-1]}, memory head 0",
                                     "references_per_half": len(raw) // 2, **held_out},
        "qa": {split: {k: demo_res["qa"][split][k] for k in ("memory", "memory_vq", "memory_off")}
               for split in ("heldout", "trained")},
        "answer_loglik": {split: {k: demo_res["answer_loglik"][split][k] for k in ("memory", "memory_vq", "memory_off")}
                          for split in ("heldout", "trained")},
    }
    write_json(a.out, result, seed=a.seed)
    qa = result["qa"]
    print(f"codec {vq.quantizer.factory} ({vq.quantizer.code_size} B per vector); bytes per memory raw "
          f"{result['bytes_per_memory']['raw']['stored']}, VQ {result['bytes_per_memory']['vq']['stored']}")
    for kind, e in err.items():
        print(f"{kind}: relative squared error {e['relative_mse']:.4f}, cosine {e['cosine']:.4f} "
              f"over {e['vectors']} vectors ({e['dims_for_99.9pct_energy']} of 80 dims hold 99.9 % of the energy)")
    for kind, h in held_out.items():
        print(f"{kind}, one group's codec trained on half the references: relative squared error "
              f"{h['train_half']['relative_mse']:.4f} on that half, "
              f"{h['held_out_half']['relative_mse']:.4f} on the other half")
    for split, r in qa.items():
        ll = result["answer_loglik"][split]
        print(f"QA {split}: raw memory {r['memory']:.3f}, paper-VQ memory {r['memory_vq']:.3f}, memory off "
              f"{r['memory_off']:.3f} (answer log-likelihood {ll['memory']:.3f} / {ll['memory_vq']:.3f} / "
              f"{ll['memory_off']:.3f})")
    return result


if __name__ == "__main__":
    main()
