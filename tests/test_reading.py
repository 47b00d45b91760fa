"""The reading harness (mini_m3.reading): the paper's memory format end to end, every axis reported."""

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mini_m3.checkpoint import load_pretrained
from mini_m3.evaluate import qa_eval
from mini_m3.memory.bank import MemoryBank
from mini_m3.provenance import fixed_numerics
from mini_m3.reading import (AXES, ReadingSettings, build_reading_data, by_attribute, evaluate_axes, load_reading_run,
                             flagship_settings, run_reading, texts_sha256, write_reading_run)

ROOT = Path(__file__).resolve().parents[1]
FLAGSHIP = ROOT / "notebooks" / "assets" / "memory3_demo"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("reading")
    s = ReadingSettings(preset="tiny", n_people=200, n_docs=600, warmup_steps=4, continual_steps=4, curriculum_steps=2,
                        eval_questions=8, batch_size=8, threads=1, progress=False, eval_every=2)
    return out, s, run_reading(out, s, argv=["test"])


def test_run_reading_reports_every_axis_in_the_models_format(quick):
    out, s, r = quick
    assert set(r["axes"]) == set(AXES)
    for axis in r["axes"].values():
        assert axis["n"] == 8 and 0 <= axis["memory"] <= 1 and 0 <= axis["memory_off"] <= 1
        assert 0 <= axis["retrieval_top1"] <= axis["retrieval_top5"] <= 1
    assert r["memory_settings"] == {"selector": "attention", "tokens_per_head": 8, "memories_per_chunk": 5}
    assert r["argv"] == ["test"] and r["provenance"]["seed"] == 0 and r["seed"] == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["axes"] == r["axes"] and set(saved["final_loss"]) == {"warmup", "curriculum", "continual"}
    log = [json.loads(l) for l in (out / "continual" / "continual.jsonl").read_text().splitlines()]
    assert any("qa_heldout" in rec for rec in log)  # the held-out check ran during training


def test_the_saved_model_and_bank_carry_the_papers_format(quick):
    out, s, r = quick
    model, tok = load_pretrained(out / "model")
    assert model.cfg.memory_format == r["memory_settings"]
    bank = MemoryBank.open(out / "bank", model, tok)
    assert len(bank) == 200 + 100  # every person, then the other-style people added after training
    other = model.with_memory_format(selector="all")
    with pytest.raises(Exception, match="format"):
        MemoryBank.open(out / "bank", other, tok)


def test_a_saved_run_loads_with_its_world_and_evaluates_to_its_own_numbers(quick, tmp_path):
    """load_reading_run regenerates the run's people and bank texts from its settings (the run's fingerprint); a
    bank built from them and the run's own questions give the run's numbers exactly."""
    out, s, r = quick
    run = load_reading_run(out / "model")
    assert texts_sha256(run.references) == r["references_sha256"] and run.settings.seed == s.seed
    assert run.model.cfg.memory_format == r["memory_settings"] and len(run.others) == 100
    with fixed_numerics(s.seed, s.threads):
        bank = run.build_bank(tmp_path / "bank")
        assert evaluate_axes(run.model, run.tokenizer, bank, run.questions()) == r["axes"]


def test_a_reading_run_file_is_checked_before_use(quick, tmp_path):
    out, s, r = quick
    m = tmp_path / "m"
    shutil.copytree(out / "model", m)
    with pytest.raises(FileNotFoundError, match="reading_run.json"):  # no settings beside or in it
        load_reading_run(m)
    write_reading_run(m, s, r["references_sha256"], results="somewhere.json")
    assert load_reading_run(m).references == load_reading_run(out / "model").references
    write_reading_run(m, s, "0" * 64)
    with pytest.raises(ValueError, match="world regenerated from its settings is not"):
        load_reading_run(m)
    write_reading_run(m, dataclasses.replace(s, model={"n_layers": 3}), r["references_sha256"])
    with pytest.raises(ValueError, match="config is not the one its settings"):
        load_reading_run(m)
    good = json.loads((m / "reading_run.json").read_text())
    for bad in ({**good, "version": 2}, {**good, "settings": {**good["settings"], "colour": 1}}, "[1, 2", "[1, 2]",
                {k: v for k, v in good.items() if k != "settings"}):
        (m / "reading_run.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
        with pytest.raises(ValueError, match="is not a reading run's settings"):
            load_reading_run(m)


def test_training_chunks_read_five_retrieved_memories_own_first():
    s = ReadingSettings(preset="tiny", n_people=200, n_docs=300, progress=False)
    world, others, tok, cfg, refs, data, docs = build_reading_data(s)
    assert data.chunk_refs.shape == (300, 1, 5)
    own = torch.tensor([d.person for d in docs])
    assert (data.chunk_refs[:, 0, 0] == own).float().mean() > 0.9  # retrieval finds the person asked about
    held = {p.pid for p in world.people_in("heldout")}
    used = set(data.chunk_refs.flatten().tolist())
    assert not held & used and len(used) > 150  # held-out biographies are never read in training, not even as distractors
    assert max(len(t) for t in tok.encode_references(refs)) <= cfg.reference_length


def test_a_run_continues_from_a_previous_runs_model_and_refuses_other_settings(quick, tmp_path):
    out, s, r = quick
    more = dataclasses.replace(s, warmup_steps=0, curriculum_steps=0, continual_steps=2, eval_every=0,
                               init_model=str(out / "model"))
    r2 = run_reading(tmp_path / "more", more)
    assert set(r2["final_loss"]) == {"continual"}
    first = load_pretrained(out / "model")[0].state_dict()
    after = load_pretrained(tmp_path / "more" / "model")[0].state_dict()
    assert any(not torch.equal(first[k], after[k]) for k in first)  # it trained on from there
    with pytest.raises(ValueError, match="another model config or tokenizer"):
        run_reading(tmp_path / "other", dataclasses.replace(more, seed=1))


def test_a_run_may_continue_in_another_memory_format(quick, tmp_path):
    """The format curriculum: weights trained in one format continue in another; the saved model records the new."""
    out, s, r = quick
    more = dataclasses.replace(s, warmup_steps=0, curriculum_steps=0, continual_steps=1, eval_every=0,
                               init_model=str(out / "model"), model={"memory_selector": "all", "memories_per_chunk": 1})
    r2 = run_reading(tmp_path / "all1", more)
    assert r2["memory_settings"] == {"selector": "all", "tokens_per_head": 128, "memories_per_chunk": 1}
    with pytest.raises(ValueError, match="another model config"):
        run_reading(tmp_path / "wide", dataclasses.replace(more, model={"n_layers": 2}))


def test_a_run_may_continue_with_more_memory_layers(quick, tmp_path):
    """A layer that was not a memory layer becomes one: the weights carry over (memory layers add no parameters)
    and the saved model's memory layers are the new ones."""
    out, s, r = quick
    before = load_pretrained(out / "model")[0]
    layers = sorted({*before.cfg.memory_layers, before.cfg.n_layers - 1})
    assert len(layers) == len(before.cfg.memory_layers) + 1
    more = dataclasses.replace(s, warmup_steps=0, curriculum_steps=0, continual_steps=1, eval_every=0,
                               init_model=str(out / "model"), model={"memory_layers": layers})
    run_reading(tmp_path / "deeper", more)
    after = load_pretrained(tmp_path / "deeper" / "model")[0]
    assert list(after.cfg.memory_layers) == layers
    assert after.state_dict().keys() == before.state_dict().keys()
    learned = dataclasses.replace(more, continual_steps=1, model={"memory_selector": "learned",
                                                                    "memory_selection_queries": 2})
    run_reading(tmp_path / "learned", learned)  # learned queries added to the same memory layers: allowed
    with pytest.raises(ValueError, match="learned selection queries: its memory layers cannot change"):
        run_reading(tmp_path / "learned_deeper", dataclasses.replace(
            learned, init_model=str(tmp_path / "learned" / "model"),
            model={**learned.model, "memory_layers": layers}))


@pytest.mark.parametrize("memory_grad", [True, False])
def test_a_format_chain_in_one_run_equals_its_continuation_runs(quick, tmp_path, memory_grad):
    """`stages`: a later stage in another format, in the same run, trains exactly as a continuation run would (its
    own optimizer and schedule, the run's memory_grad); the saved model keeps the settings' format."""
    out, s, r = quick
    base = dataclasses.replace(s, warmup_steps=0, curriculum_steps=0, continual_steps=1, eval_every=0,
                               init_model=str(out / "model"), memory_grad=memory_grad)
    stage = {"steps": 2, "selector": "all", "memories_per_chunk": 1, "lr": 5e-4}
    chain = run_reading(tmp_path / "chain", dataclasses.replace(base, stages=[stage]))
    assert set(chain["final_loss"]) == {"continual", "stage1"} and chain["memory_settings"] == r["memory_settings"]
    log = [json.loads(l) for l in (tmp_path / "chain" / "stage1" / "continual.jsonl").read_text().splitlines()]
    assert log[0]["lr"] == 5e-4  # no LR warmup; the WSD decay in its last steps
    run_reading(tmp_path / "b1", base)
    run_reading(tmp_path / "b2", dataclasses.replace(
        base, continual_steps=2, lr=5e-4, init_model=str(tmp_path / "b1" / "model"),
        model={**base.model, "memory_selector": "all", "memories_per_chunk": 1}))
    a = load_pretrained(tmp_path / "chain" / "model")[0].state_dict()
    b = load_pretrained(tmp_path / "b2" / "model")[0].state_dict()
    before = load_pretrained(out / "model")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], before[k]) for k in a)


def test_bad_stages_are_refused_before_any_work(quick, tmp_path):
    out, s, r = quick
    for bad in ([{"step": 3}], [{"steps": 0}], [{"steps": 2, "selector": "best"}], [{"steps": 2, "lr": -1}], ["x"]):
        with pytest.raises(ValueError, match="a stage is a dict"):
            dataclasses.replace(s, stages=bad)
    with pytest.raises(ValueError, match="reads 6 memories per chunk"):
        run_reading(tmp_path / "six", dataclasses.replace(s, stages=[{"steps": 1, "memories_per_chunk": 6}]))
    assert not (tmp_path / "six").exists() or not any((tmp_path / "six").iterdir())


def test_by_attribute_splits_exact_match_and_answer_pieces():
    items = [SimpleNamespace(attribute=a) for a in ("major", "major", "birth_date", "employer")]
    result = {"correct": [True, False, False, False],
              "pieces": [[True, True], [True, False], [False, True, True, True], [True]]}
    got = by_attribute(items, result)
    assert got == {"birth_date": {"n": 1, "exact_match": 0.0, "first_piece": 0.0, "later_pieces": 1.0},
                   "employer": {"n": 1, "exact_match": 0.0, "first_piece": 1.0, "later_pieces": None},
                   "major": {"n": 2, "exact_match": 0.5, "first_piece": 1.0, "later_pieces": 0.5}}


def test_every_axis_is_split_by_attribute_consistently(quick):
    out, s, r = quick
    for axis in r["axes"].values():
        for mode in ("memory", "memory_off"):
            per = axis["by_attribute"][mode]
            assert sum(v["n"] for v in per.values()) == axis["n"]
            assert sum(v["n"] * v["exact_match"] for v in per.values()) == pytest.approx(axis[mode] * axis["n"])
            assert all(v["exact_match"] <= v["first_piece"] for v in per.values())


def test_the_flagship_command_runs_its_chain_and_saves_the_papers_format(tmp_path):
    """`mini-m3 flagship --quick`: the flagship's whole chain (warmup, 1-memory curriculum, the paper's format with
    shared memories, the later stages) on a small world; the model is saved and evaluated in the paper's format."""
    from mini_m3.cli import main
    assert main(["flagship", "--quick", "--quiet", "--threads", "1", "--out", str(tmp_path / "f")]) == 0
    r = json.loads((tmp_path / "f" / "results.json").read_text())
    full = flagship_settings()
    assert r["memory_settings"] == {"selector": "attention", "tokens_per_head": 8, "memories_per_chunk": 5}
    assert set(r["final_loss"]) == {"warmup", "curriculum", "continual"} | {f"stage{k}" for k in
                                                                          range(1, len(full.stages) + 1)}
    assert r["argv"][:2] == ["mini-m3", "flagship"] and r["settings"]["shared_memories"]
    assert r["settings"]["wordings"] == "base"  # the default; --wordings names the lever
    from mini_m3.cli import build_parser
    assert build_parser().parse_args(["flagship", "--wordings", "compositional"]).wordings == "compositional"
    assert [{k: v for k, v in st.items() if k != "steps"} for st in r["settings"]["stages"]] == \
        [{k: v for k, v in st.items() if k != "steps"} for st in full.stages]  # the quick chain is the full one's
    assert load_pretrained(tmp_path / "f" / "model")[0].cfg.memory_format == r["memory_settings"]


@pytest.mark.slow
def test_the_shipped_flagship_is_the_commands_model_and_reads_held_out_people(tmp_path):
    """notebooks/assets/memory3_demo: trained by `mini-m3 flagship` (its settings, the paper's format), its world
    regenerates (load_reading_run checks the fingerprint), and on its run's 200 held-out questions it answers what
    the run recorded (within 2 questions: the run used 2 threads) and memory off does not."""
    run = load_reading_run(FLAGSHIP)
    assert run.model.cfg.memory_format == {"selector": "attention", "tokens_per_head": 8, "memories_per_chunk": 5}
    assert dataclasses.replace(run.settings, progress=True) == flagship_settings(run.settings.seed)
    recorded = json.loads((ROOT / json.loads((FLAGSHIP / "reading_run.json").read_text())["results"]).read_text())
    assert {**recorded["settings"], "progress": True} == dataclasses.asdict(flagship_settings(run.settings.seed))
    items = run.questions()["heldout"]
    with fixed_numerics(run.settings.seed, 1):
        bank = run.build_bank(tmp_path / "bank")
        mem = qa_eval(run.model, run.tokenizer, items, mode="memory", bank=bank)["accuracy"]
        off = qa_eval(run.model, run.tokenizer, items, mode="none")["accuracy"]
    assert abs(mem - recorded["axes"]["heldout"]["memory"]) <= 0.01
    assert off <= 0.05 and mem >= off + 0.2


def test_cli_sft_then_dpo_on_a_reading_run(quick, tmp_path, capsys):
    """`mini-m3 sft --model` on a reading run (the flagship's kind): its world comes with it, its bank is built when
    --bank is not given, and the tuned model saves the run's settings file, so `dpo` loads it with its world."""
    from mini_m3.cli import main
    out, s, r = quick
    from mini_m3.reading import is_reading_run
    assert is_reading_run(out / "model") and not is_reading_run(tmp_path)  # results.json beside, or nothing
    common = ["--batch-size", "4", "--quiet", "--threads", "1", "--probe-questions", "2"]
    assert main(["sft", "--model", str(out / "model"), "--steps", "2", "--n-examples", "8",
                 "--out", str(tmp_path / "sft"), *common]) == 0
    assert "building the bank" in capsys.readouterr().out
    tuned = load_reading_run(tmp_path / "sft" / "model")  # the same world, checked by its fingerprint
    assert texts_sha256(tuned.references) == r["references_sha256"]
    assert json.loads((tmp_path / "sft" / "model" / "reading_run.json").read_text())["tuning"] == "sft"
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary["probe"]["memory"]["known"]["n"] == 2  # held-out people of the run's world, in its answer style
    assert main(["dpo", "--model", str(tmp_path / "sft" / "model"), "--bank", str(tmp_path / "sft" / "bank"),
                 "--steps", "2", "--n-pairs", "8", "--out", str(tmp_path / "dpo"), *common]) == 0
    assert (tmp_path / "dpo" / "model" / "reading_run.json").exists()
    capsys.readouterr()
    other = MemoryBank.build(tmp_path / "other", tuned.model, tuned.tokenizer, tuned.references[:5], progress=False)
    assert main(["dpo", "--model", str(tmp_path / "sft" / "model"), "--bank", str(other.path), "--steps", "1",
                 "--out", str(tmp_path / "x"), *common]) == 2  # a bank of other texts is refused before any work
    assert "does not hold the biographies of the reading run" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
