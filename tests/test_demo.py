"""The main job end to end: `mini-m3 demo --quick` writes the results table other tools read."""
import json

import pytest

from mini_m3.cli import main


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--out", str(out), "--threads", "1"]) == 0
    r = json.loads((out / "results.json").read_text())
    for split in ("trained", "heldout"):
        assert set(r["qa"][split]) == {"no_memory_model", "memory", "memory_off", "memory_vq", "rag"}
        assert all(0.0 <= v <= 1.0 for v in r["qa"][split].values())
    assert set(r["tokens_per_s"]) == {"memory", "none", "rag"} and min(r["tokens_per_s"].values()) > 0
    assert r["bytes_per_memory"]["vq"] * 8 <= r["bytes_per_memory"]["raw"]
    assert r["step_time"]["warmup"] > 0 and r["step_time"]["continual"] > 0
    assert r["seed"] == 0 and r["config"]["name"] == "tiny" and r["config"]["memories_per_chunk"] == 1
    assert 0.0 <= r["qa_heldout_5_memories"]["memory"] <= 1.0
    assert (out / "results.png").stat().st_size > 0
    # training took effect: the loss fell well below its start (ln 2048 = 7.6), and the continual stage lowered it
    assert r["final_loss"]["memory3_continual"] < min(5.0, r["final_loss"]["memory3_warmup"] - 1.0)
    # What the quick demo shows (seed 0, measured: 40 continual steps are too few to answer any question, so
    # exact match is 0 everywhere; the answer log-likelihoods, e.g. trained: memory -5.601, memory off -5.586,
    # VQ memory -5.600, RAG -5.625; held out: no-memory model -5.98, memory off -6.10):
    ll = r["answer_loglik"]
    for split in ("trained", "heldout"):
        assert r["retrieval_hit_rate"][split]["top1"] >= 0.8  # the bank finds the asked person's biography
        effect = abs(ll[split]["memory"] - ll[split]["memory_off"])
        assert effect > 3e-3  # memory mode reads the retrieved memory (|effect| ~0.015)
        assert abs(ll[split]["memory_vq"] - ll[split]["memory"]) < effect / 4  # VQ memory reads like raw (~3e-4)
        assert abs(ll[split]["rag"] - ll[split]["memory_off"]) > 3e-3  # RAG puts the references in the prompt
    for model in ("no_memory_model", "memory_off"):  # people seen in training are known better (gap ~0.5)
        assert ll["trained"][model] > ll["heldout"][model] + 0.2


def test_smoke_command(capsys):
    assert main(["smoke"]) == 0
    assert "references used" in capsys.readouterr().out


def test_cli_reports_bad_input_cleanly(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "hello"]) == 2
    assert "error" in capsys.readouterr().err
