"""Reproducibility (§7 numbers that can be rerun): fixed numerics give bit-identical training; results record provenance."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mini_m3.demo as demo
import mini_m3.provenance as prov
from mini_m3 import Memory3, Memory3Config
from mini_m3.provenance import fixed_numerics, provenance
from mini_m3.train import ChunkedData, TrainConfig, train

VERSIONS = {"python", "torch", "numpy", "faiss", "tokenizers", "safetensors"}


@pytest.fixture(scope="module")
def tiny():
    """A tiny config and 16 one-chunk sequences of random tokens, each chunk with a random reference."""
    g = torch.Generator().manual_seed(0)
    cfg = Memory3Config.from_name("tiny", vocab_size=256)
    stream = torch.randint(4, 256, (16, cfg.chunk_length + 1), generator=g)
    refs = [[1, 3] + torch.randint(4, 256, (40,), generator=g).tolist() for _ in range(8)]
    data = ChunkedData(stream[:, :-1].contiguous(), stream[:, 1:].contiguous(),
                       torch.randint(0, 8, (16, 1), generator=g), refs)
    return cfg, data


def two_stage_losses(cfg, data) -> list[float]:
    torch.manual_seed(0)
    model = Memory3(cfg)
    losses = []
    for stage in ("warmup", "continual"):
        tc = TrainConfig(stage=stage, steps=3, batch_size=4, lr=3e-3, warmup_steps=1, selector="all", quiet=True,
                         threads=1)
        losses += train(model, data, tc)["losses"]
    return losses


def test_two_short_trainings_give_bit_identical_losses(tiny):
    cfg, data = tiny
    runs = []
    for ambient_threads in (2, 1):  # whatever threads, RNG state and mode the process was in before
        torch.set_num_threads(ambient_threads)
        torch.rand(7)
        with fixed_numerics(0, 1):
            assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
            runs.append(two_stage_losses(cfg, data))
        assert torch.get_num_threads() == ambient_threads and not torch.are_deterministic_algorithms_enabled()
    assert runs[0] == runs[1] and len(runs[0]) == 6  # bit for bit, the memory stage included


def test_demo_control_trains_with_fixed_numerics(tiny, tmp_path, monkeypatch):
    """The no-memory control (run in a second process by the demo) seeds, fixes its threads and runs deterministic
    algorithms itself: two runs started from different process states log the same losses bit for bit."""
    cfg, data = tiny
    seen, real_train = [], demo.train

    def spy(*a, **k):
        seen.append((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()))
        return real_train(*a, **k)
    monkeypatch.setattr(demo, "train", spy)
    s = demo.DemoSettings.quick(warmup_steps=2, continual_steps=2, batch_size=4)
    tc = demo.control_train_config(s, quiet=True, threads=1)
    for i, ambient_threads in enumerate((2, 1)):
        torch.set_num_threads(ambient_threads)
        torch.rand(i + 1)
        demo._train_control(cfg.to_dict(), data, tc, str(tmp_path / f"run{i}"), s.seed)
    assert seen == [(1, True), (1, True)]
    logs = [[json.loads(line)["loss"] for line in (tmp_path / f"run{i}/warmup.jsonl").read_text().splitlines()]
            for i in range(2)]
    assert logs[0] == logs[1] and len(logs[0]) == 4
    weights = [load_file(tmp_path / f"run{i}/final.safetensors") for i in range(2)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_provenance_records_versions_argv_commit_seed():
    p = provenance(7, argv=["mini-m3", "demo"])
    assert p["seed"] == 7 and p["argv"] == ["mini-m3", "demo"]
    assert VERSIONS <= set(p["versions"]) and p["versions"]["torch"] == torch.__version__
    assert p["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert p["commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", p["commit"])
    json.dumps(p)  # all of it goes into a results JSON
    if shutil.which("git") and (prov._REPO / ".git").exists():  # this checkout: its HEAD
        head = subprocess.run(["git", "-C", str(prov._REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert p["commit"] == head.stdout.strip() and isinstance(p["dirty"], bool)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_commit_is_unknown_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(prov, "_REPO", tmp_path)  # no repository at all
    assert prov.git_commit() == ("unknown", None)
    # an installed copy inside some other repository (site-packages of a venv in a checkout) is not that checkout
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "venv/site-packages").mkdir(parents=True)
    monkeypatch.setattr(prov, "_REPO", tmp_path / "venv/site-packages")
    assert prov.git_commit() == ("unknown", None)


def test_bad_seed_or_threads_are_refused():
    with pytest.raises(ValueError, match="seed"):
        provenance("0")
    with pytest.raises(ValueError, match="threads"):
        with fixed_numerics(0, 0):
            pass


def test_experiment_results_record_provenance(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    try:
        from _common import write_json
    finally:
        sys.path.pop(0)
    obj = {"x": 1}
    saved = json.loads(write_json(tmp_path / "r.json", obj, seed=3).read_text())
    assert saved == obj  # what a script returns is what it wrote
    assert saved["provenance"]["seed"] == 3 and VERSIONS <= set(saved["provenance"]["versions"])
    assert saved["provenance"]["argv"] == sys.argv and "commit" in saved["provenance"]
    with pytest.raises(TypeError):
        write_json(tmp_path / "r2.json", {"x": 1})  # no seed, no results file
    assert not (tmp_path / "r2.json").exists()


def test_experiment_results_name_the_commit_the_script_started_from(tmp_path, monkeypatch):
    """A commit landing during a long run is not recorded as the code that ran: the commit and dirty flag are the
    checkout's when `_common` was imported (the script's start), not when it writes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    try:
        import _common
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(_common, "STARTED_AT", ("0" * 40, False))
    saved = json.loads(_common.write_json(tmp_path / "r.json", {}, seed=0).read_text())
    assert (saved["provenance"]["commit"], saved["provenance"]["dirty"]) == ("0" * 40, False)


def test_demo_table_says_what_the_numbers_depend_on():
    qa = {k: 0.5 for k in demo.NAMES}
    r = {"qa": {"trained": qa, "heldout": qa}, "qa_heldout_paraphrase": {"phrasing": "heldout", "memory": 0.1,
         "retrieval_top1": 0.9}, "tokens_per_s": {"memory": 1, "none": 1, "rag": 1},
         "bytes_per_memory": {"raw": 8, "vq": 1}, "step_time": {"warmup": 0.1, "continual": 0.2},
         "wall_seconds": 1, "seed": 0, "threads": {"train": 1, "other": 2}, "provenance": provenance(0)}
    last = demo.format_table(r).splitlines()[-1]
    v = r["provenance"]["versions"]
    assert f"torch {v['torch']} ({r['provenance']['cpu_capability']} kernels, 1 training thread(s))" in last
    assert f"tokenizers {v['tokenizers']}" in last and f"commit {r['provenance']['commit'][:7]}" in last
