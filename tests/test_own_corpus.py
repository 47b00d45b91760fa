"""Issue 18: one's own corpus - `train --text-dir` holds documents out, `evaluate --text-dir` measures them.

One tiny end-to-end run (module fixture): 30 generated documents, each with made-up facts and one made-up word of
its own; `train` (tiny preset, a few steps), `build-bank` with and without the held-out documents' references, and
`evaluate --text-dir` with a control model.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from mini_m3.checkpoint import load_pretrained
from mini_m3.cli import main

NAMES = ["Alice", "Bruno", "Chen", "Dara", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas"]
PLACES = ["the north", "the old town", "the valley", "the coast", "the hills", "the island"]
THINGS = ["bridge", "library", "harbor", "tower", "garden", "market", "school", "station"]


def made_up_word(rng: random.Random) -> str:
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(4))


def document(rng: random.Random, word: str) -> str:
    c = rng.choice
    forms = [lambda: f"The {word} of {c(NAMES)} was built in {rng.randint(1500, 1999)} near {c(PLACES)}.",
             lambda: f"{c(NAMES)} said that the {c(THINGS)} in {c(PLACES)} was older than the {word}.",
             lambda: f"Every spring the {word} is painted by {c(NAMES)} and {c(NAMES)}.",
             lambda: f"In {c(PLACES)}, a {c(THINGS)} stands next to the {word} and a {c(THINGS)}."]
    return " ".join(c(forms)() for _ in range(rng.randint(14, 22)))


def write_corpus(d: Path, n: int = 30, seed: int = 0) -> dict[str, str]:
    """n documents doc000.txt ...; returns {file name: its made-up word}."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    words = {}
    for i in range(n):
        words[f"doc{i:03d}.txt"] = word = made_up_word(rng)
        (d / f"doc{i:03d}.txt").write_text(document(rng, word), encoding="utf-8")
    return words


def run(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv("TQDM_DISABLE", "1")
        code = main([str(x) for x in argv])
    return code, out.getvalue(), err.getvalue()


TRAIN_ARGS = ["--preset", "tiny", "--vocab-size", "2000", "--chunks-per-sequence", "2", "--batch-size", "2",
              "--warmup-steps", "4", "--continual-steps", "4", "--checkpoint-every", "4", "--quiet",
              "--threads", "1", "--heldout-fraction", "0.2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_corpus")
    words = write_corpus(root / "texts")
    out = root / "run"
    code, stdout, stderr = run(["train", "--text-dir", root / "texts", "--out", out, *TRAIN_ARGS,
                                "--eval-every", "2", "--control"])
    assert code == 0, stderr
    banks = {}
    for name, extra in (("without", []), ("with", ["--heldout-references"])):
        banks[name] = root / f"bank_{name}"
        code, _, stderr = run(["build-bank", "--model", out / "model", "--text-dir", root / "texts", "--out",
                               banks[name], "--quiet", "--threads", "1", "--heldout-fraction", "0.2", *extra])
        assert code == 0, stderr
    return dict(root=root, words=words, out=out, banks=banks, train_stdout=stdout)


def heldout_names(corpus) -> set[str]:
    return {json.loads(l)["doc_id"] for l in (corpus["out"] / "data" / "heldout.jsonl").read_text().splitlines()}


def test_heldout_documents_are_written_and_reported(corpus):
    report = json.loads((corpus["out"] / "data" / "report.json").read_text())
    held = heldout_names(corpus)
    assert 0 < report["heldout_documents"] == len(held) < 30
    assert report["settings"]["heldout_fraction"] == 0.2
    assert "held out: " in corpus["train_stdout"] and f"{len(held)} documents" in corpus["train_stdout"]
    # chosen by the doc-id hash: exactly the documents is_heldout_document names
    from mini_m3.data.pipeline import is_heldout_document
    chosen = {d for d in held if is_heldout_document(d, 0.2, seed=0)}
    assert chosen == held
    assert report["training_documents"] == 30 - len(held)


def test_tokenizer_and_training_text_never_see_heldout_documents(corpus):
    _, tok = load_pretrained(corpus["out"] / "model")
    stream = np.load(corpus["out"] / "data" / "train_tokens.npy").astype(np.int64).tolist()
    text = " ".join(map(str, stream)) + " "
    held = {Path(d).name for d in heldout_names(corpus)}
    assert held
    for name, word in corpus["words"].items():
        ids = tok.encode(" " + word)
        in_stream = " " + " ".join(map(str, ids)) + " " in " " + text
        if name in held:  # never merged into a token, and its tokens never in the training text
            assert len(ids) > 1 and not in_stream, (name, word, ids)
        else:  # the positive control: a training document's word is one token, found in the stream
            assert len(ids) == 1 and in_stream, (name, word, ids)


def test_train_logs_heldout_loss_and_trains_the_control(corpus):
    out = corpus["out"]
    for log, steps in ((out / "warmup" / "warmup.jsonl", 4), (out / "continual" / "continual.jsonl", 4),
                       (out / "control" / "warmup" / "warmup.jsonl", 8)):
        recs = [json.loads(l) for l in log.read_text().splitlines() if l]
        assert [r["step"] for r in recs] == list(range(steps))
        logged = [r for r in recs if "heldout_loss_memory" in r]
        assert [r["step"] for r in logged] == list(range(1, steps, 2))  # every 2 steps
        for r in logged:
            assert math.isfinite(r["heldout_loss_memory"]) and math.isfinite(r["heldout_loss_none"])
    model, tok = load_pretrained(out / "model")
    control, ctok = load_pretrained(out / "control_model")
    assert ctok.fingerprint() == tok.fingerprint()
    # a model of its own: the same shape, other weights (8 steps without memory)
    assert control.cfg == model.cfg
    assert any((p - q).abs().max() > 0 for p, q in zip(model.parameters(), control.parameters()))


def test_evaluate_text_dir_reports_losses(corpus, tmp_path):
    result = tmp_path / "eval.json"
    code, stdout, stderr = run(["evaluate", "--model", corpus["out"] / "model", "--bank", corpus["banks"]["with"],
                                "--text-dir", corpus["out"], "--control-model", corpus["out"] / "control_model",
                                "--out", result, "--quiet", "--threads", "1", "--heldout-fraction", "0.2"])
    assert code == 0, stderr
    r = json.loads(result.read_text())
    assert (tmp_path / "eval.png").stat().st_size > 0
    assert set(r["overall"]) == {"memory", "none", "rag", "control"}
    held = heldout_names(corpus)
    assert {d["doc_id"] for d in r["documents"]} == held and r["heldout_documents"] == len(held)
    assert r["bank_holds_heldout_references"] is True
    for mode, v in r["overall"].items():
        assert math.isfinite(v["loss"]) and v["loss"] > 0 and v["perplexity"] == pytest.approx(math.exp(v["loss"]))
        # overall = token-weighted mean of the documents
        per_doc = sum(d[mode]["loss"] * d[mode]["tokens"] for d in r["documents"]) / v["tokens"]
        assert v["loss"] == pytest.approx(per_doc)
    assert r["overall"]["memory"]["loss"] != r["overall"]["none"]["loss"]
    rt = r["retrieval"]
    assert rt["leakage_threshold"] == pytest.approx(2 / 3) and rt["memories_per_chunk"] == 5
    # the bank holds these very documents: the filter must have removed some of their own chunks' references
    assert rt["references_removed_by_leakage_filter"] > 0
    assert 0 < rt["chunks_with_memory"] < rt["chunks"]
    for d in r["documents"]:
        assert d["references_per_chunk"][0] == []  # chunk 0 has no preceding text to retrieve with
    assert "memory: loss" in stdout and "control: loss" in stdout


def test_evaluate_reports_bank_without_heldout_references(corpus, tmp_path):
    removed = {}
    for name in ("without", "with"):
        result = tmp_path / f"eval_{name}.json"
        code, _, stderr = run(["evaluate", "--model", corpus["out"] / "model", "--bank", corpus["banks"][name],
                               "--text-dir", corpus["out"] / "data", "--out", result, "--quiet", "--threads", "1"])
        assert code == 0, stderr
        r = json.loads(result.read_text())
        assert r["bank_holds_heldout_references"] is (name == "with")
        assert set(r["overall"]) == {"memory", "none", "rag"}  # no --control-model, no control
        removed[name] = r["retrieval"]["references_removed_by_leakage_filter"]
    # the held-out documents' own references are what the filter mostly catches
    assert removed["without"] < removed["with"]


def test_evaluate_refuses_bank_with_another_heldout_split(corpus, tmp_path):
    code, _, stderr = run(["evaluate", "--model", corpus["out"] / "model", "--bank", corpus["banks"]["with"],
                           "--text-dir", corpus["root"] / "texts", "--heldout-fraction", "0.5", "--out",
                           tmp_path / "e.json", "--quiet"])
    assert code == 2 and "another held-out split" in stderr and "--heldout-fraction" in stderr
    assert not (tmp_path / "e.json").exists()


def test_evaluate_world_qa_refuses_text_dir_model(corpus):
    code, stdout, stderr = run(["evaluate", "--model", corpus["out"] / "model", "--n", "5", "--n-people", "20",
                                "--mode", "none", "--quiet"])
    assert code == 2 and "not on the knowledge" in stderr and "--text-dir" in stderr
    assert "accuracy" not in stdout


@pytest.mark.filterwarnings("ignore:No artists with labels:UserWarning")  # 0 steps: an empty loss plot
def test_reference_fraction_flag_and_dropped_documents_named(tmp_path):
    texts = tmp_path / "texts"
    write_corpus(texts, n=12)
    (texts / "short.txt").write_text("Too short to keep.", encoding="utf-8")
    report = None
    for frac in (0.0, 1.0):
        out = tmp_path / f"b{frac}"
        code, stdout, stderr = run(["train", "--text-dir", texts, "--out", out, *TRAIN_ARGS,
                                    "--reference-fraction", str(frac), "--warmup-steps", "0",
                                    "--continual-steps", "0"])
        report = json.loads((out / "data" / "report.json").read_text())
        assert report["settings"]["reference_fraction"] == frac
        assert f"--reference-fraction {frac}" in stdout
        assert [Path(d["doc_id"]).name for d in report["dropped_documents"]] == ["short.txt"]
        assert report["dropped_documents"][0]["reason"].startswith("rule ")
        assert "dropped " in stdout and "short.txt" in stdout
        if frac == 0.0:  # no knowledge base at all: a clear error, after the report
            assert code == 2 and "no knowledge-base references" in stderr
        else:
            assert code == 0, stderr
            assert report["reference_documents"] == report["training_documents"] == 12 - report["heldout_documents"]


def test_threads_honoured_by_evaluate_and_generate(corpus, monkeypatch, tmp_path):
    import torch
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    model = corpus["out"] / "model"
    assert run(["generate", "--model", model, "--mode", "none", "--max-new-tokens", "2", "--threads", "3",
                "Hello"])[0] == 0
    assert calls == [3]
    code, _, stderr = run(["evaluate", "--model", model, "--bank", corpus["banks"]["without"], "--text-dir",
                           corpus["out"], "--out", tmp_path / "e.json", "--quiet", "--threads", "5"])
    assert code == 0, stderr
    assert calls[1:] == [5]


def test_help_shows_defaults_for_every_flag(capsys):
    import argparse

    from mini_m3.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("train", "build-bank", "evaluate", "generate"):
        parser = sub.choices[command]
        assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter
        missing = [a.dest for a in parser._actions if not a.help and a.dest != "help"]
        assert not missing, f"{command}: no help text for {missing}"
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "(default: 0)" in capsys.readouterr().out  # --seed's default is shown


def test_bad_heldout_fraction_is_refused(tmp_path, capsys):
    from mini_m3.data.pipeline import run_pipeline
    write_corpus(tmp_path / "t", n=2)
    with pytest.raises(ValueError, match="heldout_fraction"):
        run_pipeline(tmp_path / "t", tmp_path / "o", heldout_fraction=1.5, progress=False)
    for bad in ("nan", "1.5", "-0.1"):
        with pytest.raises(SystemExit):
            main(["train", "--text-dir", str(tmp_path / "t"), "--heldout-fraction", bad])
        assert "--heldout-fraction: must be a number in [0, 1]" in capsys.readouterr().err


def test_world_qa_warns_on_a_tokenizer_foreign_to_the_world(corpus, tmp_path):
    import shutil
    moved = tmp_path / "elsewhere" / "model"  # no OUT/data/report.json beside it: not known to be a text-dir model
    shutil.copytree(corpus["out"] / "model", moved)
    code, stdout, stderr = run(["evaluate", "--model", moved, "--n", "3", "--n-people", "20", "--mode", "none",
                                "--quiet", "--threads", "1"])
    assert code == 0, stderr
    assert "warning:" in stderr and "tokens per word of the world's biographies" in stderr


def test_evaluate_names_a_damaged_bank_report(corpus, tmp_path):
    import shutil
    bank = tmp_path / "bank"
    shutil.copytree(corpus["banks"]["without"], bank)
    shutil.copytree(Path(str(corpus["banks"]["without"]) + ".data"), tmp_path / "bank.data")
    (tmp_path / "bank.data" / "report.json").write_text("{not json", encoding="utf-8")
    code, _, stderr = run(["evaluate", "--model", corpus["out"] / "model", "--bank", bank, "--text-dir",
                           corpus["out"], "--out", tmp_path / "e.json", "--quiet"])
    assert code == 2 and "report.json" in stderr and not (tmp_path / "e.json").exists()


@pytest.mark.filterwarnings("ignore:No artists with labels:UserWarning")
def test_many_dropped_documents_are_printed_up_to_a_limit(tmp_path, monkeypatch):
    import mini_m3.cli as cli
    monkeypatch.setattr(cli, "SHOW_DROPPED", 2)
    texts = tmp_path / "texts"
    write_corpus(texts, n=12)
    for i in range(4):
        (texts / f"short{i}.txt").write_text(f"Too short {i}.", encoding="utf-8")
    code, stdout, _ = run(["train", "--text-dir", texts, "--out", tmp_path / "o", *TRAIN_ARGS, "--warmup-steps",
                           "0", "--continual-steps", "0"])
    report = json.loads((tmp_path / "o" / "data" / "report.json").read_text())
    assert sorted(Path(d["doc_id"]).name for d in report["dropped_documents"]) == [f"short{i}.txt" for i in range(4)]
    assert stdout.count("\ndropped ") == 2 and "... and 2 more dropped documents" in stdout


def test_rerun_without_heldout_split_leaves_no_stale_heldout_file(tmp_path):
    from mini_m3.data.pipeline import read_heldout, run_pipeline
    write_corpus(tmp_path / "t", n=10)
    run_pipeline(tmp_path / "t", tmp_path / "o", vocab_size=300, heldout_fraction=0.5, progress=False)
    assert read_heldout(tmp_path / "o")
    run_pipeline(tmp_path / "t", tmp_path / "o", vocab_size=300, heldout_fraction=0.0, progress=False)
    assert read_heldout(tmp_path / "o") == [] and not (tmp_path / "o" / "heldout.jsonl").exists()


def judged_losses(log: Path, judged: str) -> list[tuple[int, float]]:
    recs = [json.loads(l) for l in log.read_text().splitlines() if l]
    return [(r["step"], r[judged]) for r in recs if judged in r]


def test_best_model_is_kept_over_both_stages(corpus):
    """The best of the two-stage run: warmup judged without memory, continual with; the control without."""
    out = corpus["out"]
    best = json.loads((out / "best.json").read_text())
    assert set(best) == {"best_model", "control_best_model"}
    for name, logs in (("best_model", [("warmup", "heldout_loss_none"), ("continual", "heldout_loss_memory")]),
                       ("control_best_model", [("control/warmup", "heldout_loss_none")])):
        evals = [(loss, Path(d).name, step) for d, judged in logs
                 for step, loss in judged_losses(out / d / f"{Path(d).name}.jsonl", judged)]
        loss, stage, step = min(evals)
        r = best[name]
        assert (r["loss"], r["stage"], r["step"]) == (loss, stage, step)
        assert r["judged_by"] == dict(logs)[stage if name == "best_model" else "control/warmup"]
        assert r[r["judged_by"]] == loss
        model, tok = load_pretrained(out / name)
        assert tok.fingerprint() == load_pretrained(out / "model")[1].fingerprint()
    assert "lowest held-out loss" in corpus["train_stdout"]


def heldout_loss_without_memory(out: Path, model, tok) -> float:
    """The held-out loss as `train --eval-every` computes it without memory (the references are not read)."""
    import torch

    from mini_m3.data.pipeline import read_heldout
    from mini_m3.train import ChunkedData, TrainConfig, evaluate_loss
    T = 2 * model.cfg.chunk_length  # --chunks-per-sequence 2
    s = [t for d in read_heldout(out / "data") for t in [tok.bos_id] + tok.encode(d["text"]) + [tok.eos_id]]
    n = (len(s) - 1) // T
    s = torch.tensor(s[:n * T + 1])
    data = ChunkedData(s[:-1].view(n, T), s[1:].view(n, T), torch.full((n, 2), -1), [])
    return evaluate_loss(model, data, TrainConfig(batch_size=2), with_memory=False)


def test_best_model_is_the_heldout_minimum_survives_a_resume_and_needs_eval_every(tmp_path):
    import shutil

    import torch
    # many steps at a high learning rate on 27 documents: the held-out loss falls, then rises (overfitting)
    write_corpus(tmp_path / "texts")
    out = tmp_path / "run"
    argv = ["train", "--text-dir", tmp_path / "texts", "--out", out, *TRAIN_ARGS, "--warmup-steps", "40",
            "--continual-steps", "0", "--lr", "1e-2", "--eval-every", "4"]
    code, _, stderr = run(argv)
    assert code == 0, stderr
    evals = judged_losses(out / "warmup" / "warmup.jsonl", "heldout_loss_none")
    assert len(evals) == 10
    step, loss = min(evals, key=lambda e: e[1])
    assert step != evals[-1][0] and loss < evals[-1][1] - 0.5  # the last model is not the best
    best = json.loads((out / "best.json").read_text())["best_model"]
    assert (best["step"], best["stage"], best["loss"]) == (step, "warmup", loss)
    model, tok = load_pretrained(out / "best_model")
    assert heldout_loss_without_memory(out, model, tok) == pytest.approx(loss, abs=1e-5)
    final, _ = load_pretrained(out / "model")
    assert heldout_loss_without_memory(out, final, tok) == pytest.approx(evals[-1][1], abs=1e-5)
    weights = (out / "best_model" / "model.safetensors").read_bytes()

    # killed after step 36's checkpoint: the resumed run redoes steps 36..39 (a worse held-out loss at 39)
    # and must keep the best model of before the kill
    (out / "warmup" / "latest").write_text("step-0000036")
    code, _, stderr = run(argv)
    assert code == 0, stderr
    assert judged_losses(out / "warmup" / "warmup.jsonl", "heldout_loss_none") == evals
    assert json.loads((out / "best.json").read_text())["best_model"] == best
    assert (out / "best_model" / "model.safetensors").read_bytes() == weights

    # a fresh run in the same OUT (no checkpoint to resume): the older run's best is not this model's best
    shutil.rmtree(out / "warmup")
    code, _, stderr = run([*argv, "--warmup-steps", "1", "--eval-every", "1"])  # the last flag wins
    assert code == 0, stderr
    [(step, loss)] = judged_losses(out / "warmup" / "warmup.jsonl", "heldout_loss_none")
    assert loss > best["loss"]
    assert json.loads((out / "best.json").read_text())["best_model"]["loss"] == loss
    weights = (out / "best_model" / "model.safetensors").read_bytes()
    one_step = load_pretrained(out / "model")[0].state_dict()
    assert all(torch.equal(v, one_step[k]) for k, v in load_pretrained(out / "best_model")[0].state_dict().items())

    (out / "best.json").write_text("{not json", encoding="utf-8")  # damaged: named, before any training
    code, _, stderr = run(argv)
    assert code == 2 and "best.json" in stderr
    assert (out / "best_model" / "model.safetensors").read_bytes() == weights

    # without --eval-every no model is judged, so none is kept
    out = tmp_path / "no_eval"
    code, stdout, stderr = run(["train", "--text-dir", tmp_path / "texts", "--out", out, *TRAIN_ARGS,
                                "--warmup-steps", "2", "--continual-steps", "2", "--control"])
    assert code == 0, stderr
    assert (out / "model").is_dir() and (out / "control_model").is_dir()
    assert not any((out / p).exists() for p in ("best.json", "best_model", "control_best_model"))
    assert "lowest held-out loss" not in stdout

