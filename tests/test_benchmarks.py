"""The benchmark scripts in experiments/ run end to end (--quick) and write the JSON keys the README uses.

All four quick runs take ~42 s together on the 2-core dev box (bank 19 s, train 9 s, decode 7 s, prefill 6 s),
under the 60 s budget, so none is marked slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_experiment as load, shifted_chunk_loop


def run(name: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    res = load(name).main(["--quick", "--out", str(out), "--quiet"])
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").exists()
    assert set(res) == set(saved)
    assert {"machine", "quick"} <= set(saved) and saved["quick"] is True
    assert {"platform", "torch", "cpu_count", "loadavg_1_5_15"} <= set(saved["machine"])
    return saved


def test_bench_prefill(tmp_path):
    r = run("bench_prefill", tmp_path)
    assert r["equality_checked"] == [256, 512]  # fused == loop was asserted at every length before timing
    assert r["fused_over_loop"] > 0 and r["fused_over_loop_length"] == 512
    assert {"fused_s", "loop_s", "loop_over_fused"} <= set(r["per_length"][0])


def test_bench_prefill_equality_check_fires(tmp_path, monkeypatch):
    mod = load("bench_prefill")
    real = mod.prefill_chunk_loop
    wrong = shifted_chunk_loop(real)
    monkeypatch.setattr(mod, "prefill_chunk_loop", wrong)
    with pytest.raises(AssertionError):
        mod.main(["--quick", "--out", str(tmp_path / "x.json"), "--quiet"])


def test_bench_decode(tmp_path):
    r = run("bench_decode", tmp_path)
    assert {"memory_over_none", "memory_over_rag", "tokens_per_s", "profile_top"} <= set(r)
    assert {"memory", "none", "rag", "memory_nocache"} == set(r["tokens_per_s"])
    assert r["profile_top"]["by_own_time"]
    # the headline bank holds references of the paper's length; the biography bank is reported beside it
    chunks, bios = r["by_reference_set"]["chunks_128"], r["by_reference_set"]["biographies"]
    assert 100 < chunks["mean_reference_tokens"] and chunks["max_reference_tokens"] <= 128
    assert bios["mean_reference_tokens"] < chunks["mean_reference_tokens"]
    assert r["memory_over_rag"] == chunks["ratios_per_batch"]["batch_4"]["memory_over_rag"]
    assert r["timing_breakdown"]["rag"]["prompt_tokens_incl_rag_refs"] > 5 * 100


def test_bench_train(tmp_path):
    r = run("bench_train", tmp_path)
    assert {"continual_over_warmup", "flops_fraction", "matmul_flops_per_s"} <= set(r)
    assert 0 < r["flops_fraction"] < 2
    # the paper's memory setting, and the LM head counted on target positions only (QA documents leave padding)
    assert r["config"]["memories_per_chunk"] == 5 and r["sequence_tokens"] == 256
    assert 0 < r["target_tokens_per_step"] < r["batch_size"] * r["sequence_tokens"]


def test_bench_bank(tmp_path):
    r = run("bench_bank", tmp_path)
    flat = [x for x in r["retrieval"] if x["index"] == "Flat"]
    assert flat and all(x["recall_at_5"] == 1.0 for x in flat)
    assert r["bytes_per_memory"]["vq_stored"] < r["bytes_per_memory"]["raw_stored"]
    assert r["bank"]["raw"]["get_cached_memories_per_s"] > 0


def test_stream_hit_rate_follows_the_packed_stream():
    """chunk_reference_hit counts a chunk's reference as a hit when its person has text in that chunk."""
    import torch
    from mini_m3.train import pack_stream
    hit_rate = load("ablations").stream_hit_rate
    docs, people = [[5] * 6, [6] * 2, [7] * 10, [8] * 3, [9] * 9], [10, 11, 12, 13, 14]
    tokens, _, documents = pack_stream(docs, 8, bos_id=1, eos_id=2, with_documents=True)  # rows of 8 + 1
    assert tokens.shape == documents.shape == (4, 8)
    # documents take [0, 8) [8, 12) [12, 24) [24, 29) [29, 40); rows [0, 9) [9, 18) [18, 27) [27, 36), chunks of 4
    truth = [[10, 10], [11, 12], [12, 13], [13, 14]]
    assert hit_rate(documents, people, torch.tensor(truth), 4) == 1.0
    wrong = torch.tensor([[11, 11], [10, 13], [14, 10], [12, -1]])  # e.g. doc 1 starts at 8, after chunk (0, 1)
    assert hit_rate(documents, people, wrong, 4) == 0.0


@pytest.mark.slow
def test_ablations_quick(tmp_path):
    """Two ablation groups end to end, in two worker processes: each variant continues from the same warmup and
    is evaluated; variants that are the same training run are trained once."""
    out = tmp_path / "ablations.json"
    script = Path(__file__).resolve().parents[1] / "experiments" / "ablations.py"
    subprocess.run([sys.executable, str(script), "--quick", "--jobs", "2", "--only", "memory_heads,vq",
                    "--out", str(out), "--quiet"], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = json.loads(out.read_text())
    assert set(r["groups"]) == {"memory_heads", "vq"} and set(r["groups"]["vq"]) == {"off", "on"}
    for res in r["groups"].values():
        for v in res.values():
            assert 0 <= v["heldout_qa"] <= 1 and v["heldout_lm_loss"] > 0 and v["final_train_loss"] > 0
    heads, vq = r["groups"]["memory_heads"], r["groups"]["vq"]
    # the paper's setting is one training run shared by memory_heads=all and both VQ arms; only the bank differs
    assert heads["all"]["run"] == vq["off"]["run"] == vq["on"]["run"] != heads["1"]["run"]
    assert heads["all"]["heldout_qa"] == vq["off"]["heldout_qa"]
    assert out.with_suffix(".png").exists()

    # --merge: the retrieval-interval group joins the file; the stored VQ variants are reused, not retrained
    subprocess.run([sys.executable, str(script), "--quick", "--only", "retrieval_interval,vq", "--merge",
                    "--out", str(out), "--quiet"], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    m = json.loads(out.read_text())
    assert m["groups"]["memory_heads"] == heads and m["groups"]["vq"] == vq
    assert m["merged_runs"][0]["trained"] == 3 and m["merged_runs"][0]["reused"] >= 2
    interval = m["groups"]["retrieval_interval"]
    assert set(interval) == {"32", "64", "128"} and len({v["run"] for v in interval.values()}) == 3
    for c, v in interval.items():
        assert v["layout"] == "stream" and v["chunk_length"] == int(c) and 0 <= v["chunk_reference_hit"] <= 1
    # a file made with other settings is refused, and left as it was
    before = out.read_text()
    bad = subprocess.run([sys.executable, str(script), "--quick", "--only", "vq", "--merge", "--seed", "1",
                          "--out", str(out), "--quiet"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert bad.returncode != 0 and "other settings" in bad.stderr and out.read_text() == before
    # --replot redraws the figure (every group, one curve per training run) from the file alone
    out.with_suffix(".png").unlink()
    assert load("ablations").main(["--replot", "--out", str(out)]) == 0 and out.with_suffix(".png").exists()


@pytest.mark.slow
def test_effective_size_quick(tmp_path):
    """The no-memory ladder trains on the demo's tokens: its 1x rung is the demo's own control, step for step."""
    out = tmp_path / "effective_size.json"
    assert load("effective_size").main(["--quick", "--run-demo", "--rungs", "1x,2x", "--out", str(out),
                                        "--work", str(tmp_path / "work"), "--quiet"]) == 0
    r = json.loads(out.read_text())
    one, two = r["no_memory"]["1x"], r["no_memory"]["2x"]
    assert one["size_ratio"] == 1.0 and 1.9 < two["size_ratio"] < 2.1
    assert one["final_loss"] == pytest.approx(r["memory3"]["demo_no_memory_model_final_loss"], abs=1e-6)
    assert one["qa"] == r["memory3"]["demo_no_memory_model"]
    assert out.with_suffix(".png").exists()
