"""experiments/gpu_check.py (issue 20) runs end to end on the CPU (`--quick --device cpu`, the tiny shape): the JSON
has every section, the correctness checks pass, a failing check or section is recorded without stopping the others,
and the time budget skips what does not fit."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import load_experiment, shifted_chunk_loop

SECTIONS = ("correctness", "prefill", "decode", "train")


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


def run(tmp_path, *extra, mod=None) -> tuple[dict, dict]:
    out = tmp_path / "gpu_check.json"
    mod = mod or load_experiment("gpu_check")
    res = mod.main(["--quick", "--device", "cpu", "--out", str(out), "--quiet", *extra])
    return res, json.loads(out.read_text())


def test_quick_cpu_run_writes_every_section(tmp_path):
    res, saved = run(tmp_path)
    assert set(res) == set(saved) and saved["complete"] and saved["quick"]
    assert (tmp_path / "gpu_check.png").exists()
    assert {"device_name", "torch", "cuda", "platform"} <= set(saved["machine"]) and saved["device"] == "cpu"
    assert {"commit", "argv", "seed", "versions"} <= set(saved["provenance"])
    s = saved["sections"]
    assert {k: s[k]["status"] for k in SECTIONS} == dict.fromkeys(SECTIONS, "ok"), s
    c = s["correctness"]
    assert c["all_passed"] and set(c["checks"]) == {
        "fp32_device_equals_cpu", "bf16_cast_within_1e-2", "bf16_autocast_within_1e-2",
        "fused_prefill_equals_chunk_loop", "memory_read_equals_plain_eq4"}
    assert all(v["passed"] for v in c["checks"].values())
    rows = s["prefill"]["rows"]
    assert [r["context"] for r in rows] == [128, 256]
    assert all(r["fused_s"] > 0 and r["loop_s"] > 0 and r["no_memory_s"] > 0 for r in rows)
    d = s["decode"]
    assert set(d["tokens_per_s"]) == {"memory", "memory_nocache", "none", "rag"} and d["rounds_measured"] == 1
    assert set(d["ratios"]) == {"batch_1", "batch_2"} and d["bank"]["vq_factory"].startswith("PQ")
    assert d["ratios"]["batch_2"]["memory_over_rag"] == d["tokens_per_s"]["memory"]["2"] / d["tokens_per_s"]["rag"]["2"]
    t = s["train"]
    assert set(t["per_stage"]) == {"warmup", "continual"}
    assert all(v["loss_finite"] and 0 < v["mfu"] and v["tokens_per_s"] > 0 for v in t["per_stage"].values())
    assert t["recipe_2p4b"]["assumed_mfu"] == 0.4 and "mfu" in t["recipe_2p4b"]["measured"]
    assert set(saved["targets"]) == {"memory_over_none", "memory_over_rag", "memory_tokens_per_s", "mfu_warmup"}
    assert all(isinstance(v["met"], bool) for v in saved["targets"].values())


def test_a_failing_check_and_a_failing_section_are_recorded(tmp_path, monkeypatch):
    """The per-chunk loop made wrong by 1e-2: its check fails (and says so); the decode section raises: recorded with
    its error, and the train section after it still runs."""
    mod = load_experiment("gpu_check")
    real = mod.prefill_chunk_loop
    wrong = shifted_chunk_loop(real)

    def broken(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(mod, "prefill_chunk_loop", wrong)
    monkeypatch.setattr(mod, "check_decode", broken)
    _, saved = run(tmp_path, mod=mod)
    s = saved["sections"]
    checks = s["correctness"]["checks"]
    assert not checks["fused_prefill_equals_chunk_loop"]["passed"] and not s["correctness"]["all_passed"]
    assert checks["memory_read_equals_plain_eq4"]["passed"]
    assert s["decode"]["status"] == "failed" and "simulated" in s["decode"]["error"]
    assert s["prefill"]["status"] == s["train"]["status"] == "ok" and saved["complete"]
    assert "memory_over_none" not in saved["targets"]


def test_budget_skips_what_does_not_fit(tmp_path):
    _, saved = run(tmp_path, "--budget-s", "0")
    assert {saved["sections"][k]["status"] for k in SECTIONS} == {"skipped"}
    assert [s["section"] for s in saved["skipped"]] == list(SECTIONS) and saved["targets"] == {}


def test_unusable_device_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="gpu_check: --device: 'float8' is not a device name"):
        load_experiment("gpu_check").main(["--quick", "--device", "float8", "--out", str(tmp_path / "x.json")])
