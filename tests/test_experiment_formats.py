"""§3.3 the memory format is the model's, in the experiment scripts and notebooks that train, write or read memories:
each model is created with the format it trains in, and a deliberate other format goes through
`with_memory_format`."""
import ast
import json
from pathlib import Path

import pytest
import torch

from conftest import load_experiment, tiny_model
from mini_m3 import Memory3Config
from mini_m3.checkpoint import save_weights
from mini_m3.train import ChunkedData, TrainConfig, pack_documents

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["experiments/two_stage.py", "experiments/reading_transition.py", "experiments/diagnose_reading.py",
           "experiments/probe_memory_reading.py", "experiments/ablations.py", "experiments/alignment.py",
           "mini_m3/distributed.py"]
NOTEBOOKS = ["notebooks/04_explicit_memory_tour.ipynb", "notebooks/05_two_stage_pretraining.ipynb"]


def _sources():
    for f in SCRIPTS:
        yield f, (ROOT / f).read_text()
    for f in NOTEBOOKS:
        for i, cell in enumerate(json.loads((ROOT / f).read_text())["cells"]):
            if cell["cell_type"] == "code":
                yield f"{f} cell {i}", "".join(cell["source"])


def test_no_script_or_notebook_names_a_memory_format_outside_the_model():
    """Training, banks and encoding read the format from the model's config; passing selector= or tokens_per_head=
    to them is how a script trained in one format and built banks in another (with_memory_format is the way)."""
    found = []
    for where, src in _sources():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) != "with_memory_format":
                found += [f"{where}:{node.lineno} {kw.arg}=" for kw in node.keywords
                          if kw.arg in ("selector", "tokens_per_head")]
    assert found == []


@pytest.fixture(scope="module")
def ablations():
    return load_experiment("ablations")


def test_every_ablation_variant_trains_in_the_format_its_config_records(ablations):
    """The demo's config says "all" and one memory per chunk; the variants train the paper's top-8 by attention
    unless their knobs say otherwise, and their configs say so (memories per chunk stay the demo's)."""
    base = Memory3Config.from_name("tiny", memory_selector="all", memories_per_chunk=1)
    groups = ablations.variants(base)
    for group, vs in groups.items():
        for label, cfg_over, knobs, _ in vs:
            fmt = ablations.variant_config(base, cfg_over, knobs).memory_format
            selector = label if group == "selector" else "all" if (group, label) == ("tokens_per_head", "all") \
                else "attention"
            k = 128 if selector == "all" else int(label) if group == "tokens_per_head" else 8
            assert fmt == {"selector": selector, "tokens_per_head": k, "memories_per_chunk": 1}, (group, label)
    assert ablations.variant_config(base, {"memory_heads": (0,)}, {}).memory_heads == (0,)


def _chunked(tok, world, n_docs: int) -> ChunkedData:
    """QA documents, one per chunk, each chunk reading some reference (which one does not matter here)."""
    docs = world.training_documents(n_docs, seed=0, mix={"qa": 1.0})
    tokens, targets = pack_documents(tok.encode_batch([d.text for d in docs]), 64, 1, bos_id=tok.bos_id,
                                     eos_id=tok.eos_id, pad_id=tok.pad_id)
    chunk_refs = torch.arange(len(tokens))[:, None] % len(world.people)
    return ChunkedData(tokens, targets, chunk_refs, tok.encode_references(world.references()))


def test_an_ablation_variant_trains_and_is_evaluated_in_its_own_format(tmp_path, ablations, world, tok):
    """One variant (selector "exp", from a warmup in the demo's "all" format) end to end through `run_variant`:
    continual training, the held-out LM loss and a bank built and read in the variant's format."""
    base = Memory3Config.from_name("tiny", memory_selector="all", memories_per_chunk=1)
    save_weights(tiny_model(0, memory_selector="all", memories_per_chunk=1), tmp_path / "warm.safetensors")
    tok.save(tmp_path / "tokenizer.json")
    data = _chunked(tok, world, 16)
    cfg = ablations.variant_config(base, {}, {"selector": "exp"})
    tc = TrainConfig(stage="continual", steps=2, batch_size=4, warmup_steps=0, lr=1e-3, quiet=True, threads=1)
    job = {"key": "exp", "cfg": cfg.to_dict(), "tc": tc.__dict__, "warm": str(tmp_path / "warm.safetensors"),
           "tokenizer": str(tmp_path / "tokenizer.json"), "data": data, "held": data, "refs": world.references(),
           "items": world.eval_questions("heldout", 4, seed=0), "evals": [{}]}
    r = ablations.run_variant(job)
    assert len(r["evals"]) == 1 and 0 <= r["evals"][0]["heldout_qa"] <= 1 and r["evals"][0]["heldout_lm_loss"] > 0

