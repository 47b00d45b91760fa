"""§3.3 the memory format is the model's, in the experiment scripts and notebooks that train, write or read memories:
each model is created with the format it trains in, a deliberate other format goes through `with_memory_format`,
and `experiments/alignment.py` rebuilds (and says so) a demo bank this mini_m3 cannot read."""
import ast
import json
from pathlib import Path

import pytest
import torch

from conftest import load_experiment, tiny_model
from mini_m3 import Memory3Config, MemoryBank
from mini_m3.checkpoint import save_pretrained, save_weights
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


@pytest.fixture(scope="module")
def alignment():
    return load_experiment("alignment")


@pytest.fixture
def demo(tmp_path, tok, refs):
    """A demo directory as `mini-m3 demo --all-tokens` writes it: a model trained in "all", one memory per chunk, and its bank."""
    model = tiny_model(0, memory_selector="all", memories_per_chunk=1)
    save_pretrained(model, tmp_path / "demo" / "memory3_model", tok)
    MemoryBank.build(tmp_path / "demo" / "bank_raw", model, tok, refs, progress=False)
    return tmp_path / "demo", model


SETTINGS = {"selector": "all", "tokens_per_head": None, "memories_per_chunk": 1}


def test_alignment_rebuilds_a_demo_bank_of_an_older_version_and_says_so(tmp_path, alignment, demo, tok, refs, capsys):
    demo_dir, model = demo
    bank, why = alignment.demo_bank(demo_dir, model, tok, refs, tmp_path / "work", 0, False)
    assert why is None and bank.path == demo_dir / "bank_raw" and not (tmp_path / "work").exists()  # it can
    manifest = demo_dir / "bank_raw" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["version"] = 3  # a bank written before the memory format was checked
    manifest.write_text(json.dumps(m))
    files = lambda: {p: p.read_bytes() for p in sorted((demo_dir / "bank_raw").rglob("*")) if p.is_file()}
    before = files()
    bank, why = alignment.demo_bank(demo_dir, model, tok, refs, tmp_path / "work", 0, False)
    assert "bank format version 3 is not supported" in why
    out = capsys.readouterr().out
    assert "NOTE: the demo's bank cannot be used, so it is built again" in out and str(tmp_path / "work") in out
    assert bank.path == tmp_path / "work" / "bank_raw" and list(bank.texts) == refs
    assert (bank.manifest["selector"], bank.manifest["tokens_per_head"]) == ("all", 128)
    assert files() == before  # the demo's files as they were


def test_alignment_reads_an_old_demo_model_in_the_format_it_was_trained_in(tmp_path, alignment, tok, capsys):
    """An older mini_m3 saved no selector (config.json version 1, which loads as "attention"); the demo's settings
    say the model was trained in "all"."""
    save_pretrained(tiny_model(0, memories_per_chunk=1), tmp_path / "old", tok)
    v1 = json.loads((tmp_path / "old" / "config.json").read_text())
    del v1["memory_selector"]
    (tmp_path / "old" / "config.json").write_text(json.dumps({**v1, "version": 1}))
    model, _ = alignment.demo_model(tmp_path / "old", SETTINGS)
    assert model.cfg.memory_format == {"selector": "all", "tokens_per_head": 128, "memories_per_chunk": 1}
    assert "predates the memory format field" in capsys.readouterr().out
    # a current config that disagrees with the demo's settings is an error, not a guess
    save_pretrained(tiny_model(0, memory_selector="first", memories_per_chunk=1), tmp_path / "new", tok)
    with pytest.raises(SystemExit, match=r"config\.json says memory format .*'first'.* the demo's settings say"):
        alignment.demo_model(tmp_path / "new", SETTINGS)
