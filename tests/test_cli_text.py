"""`mini-m3 train --text-dir` and `mini-m3 build-bank --text-dir` on a plain folder of UTF-8 text.

One tiny end-to-end run (module fixture, ~5 s): ~40 generated English documents plus one file that is not
UTF-8 and one empty file. Bad files must be reported and skipped, never fatal; user errors (an empty folder,
a sequence longer than the model's context) must give exit code 2 and a message, not a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path

import pytest

from mini_m3.checkpoint import load_pretrained
from mini_m3.cli import main
from mini_m3.memory.bank import MemoryBank

pytestmark = pytest.mark.filterwarnings("ignore:skipping .*not valid UTF-8:UserWarning")

# ---- a seeded generator of plain English documents -----------------------------------------------------
# Small word lists and sentence templates: function words repeat as in real prose, so the documents pass the
# rule filters (>= 50 words, windowed unique-word fraction ~0.55 <= 0.90, entropy ~5 bits >= 3.0), and
# random choices make every document different enough for MinHash dedup to keep all of them.
NAMES = ["Alice", "Bruno", "Chen", "Dara", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Luca"]
ADJ = ["old", "quiet", "busy", "small", "bright", "cold", "green", "narrow", "famous", "wooden", "early", "tired"]
NOUN = ["river", "market", "teacher", "garden", "bridge", "library", "farmer", "harbor", "window", "village",
        "letter", "train", "kitchen", "doctor", "mountain", "school", "painter", "forest", "station", "baker"]
VERB = ["visited", "painted", "crossed", "watched", "cleaned", "opened", "found", "described", "followed",
        "repaired", "remembered", "sold"]
PLACE = ["the north", "the old town", "the valley", "the coast", "the city", "the hills", "the island"]
TIME = ["in the morning", "after lunch", "every spring", "last winter", "at night", "on Sunday"]


def sentence(rng: random.Random) -> str:
    c = rng.choice
    forms = [
        lambda: f"{c(NAMES)} {c(VERB)} the {c(ADJ)} {c(NOUN)} {c(TIME)}.",
        lambda: f"The {c(NOUN)} near {c(PLACE)} was {c(ADJ)} and {c(ADJ)}.",
        lambda: f"In {c(PLACE)}, a {c(ADJ)} {c(NOUN)} {c(VERB)} a {c(NOUN)}.",
        lambda: f"{c(NAMES)} said that the {c(NOUN)} had {c(VERB)} the {c(NOUN)} {c(TIME)}.",
        lambda: f"When {c(NAMES)} came to {c(PLACE)}, the {c(NOUN)} was {c(ADJ)}.",
    ]
    return c(forms)()


def document(rng: random.Random, lo: int = 60, hi: int = 200) -> str:
    target, out, n = rng.randint(lo, hi), [], 0
    while n < target:
        out.append(sentence(rng))
        n += len(out[-1].split())
    return " ".join(out)


def write_corpus(d: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"doc{i:03d}.txt").write_text(document(rng), encoding="utf-8")
    return d


def run(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr); the env var --quiet sets is undone afterwards."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv("TQDM_DISABLE", "1")
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


TRAIN_ARGS = ["--preset", "tiny", "--vocab-size", "512", "--chunks-per-sequence", "2", "--batch-size", "2",
              "--warmup-steps", "3", "--continual-steps", "3", "--checkpoint-every", "3", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_text")
    text_dir = write_corpus(root / "texts")
    (text_dir / "bad.txt").write_bytes(b"\xff\xfe\xfa\xfb not utf-8 at all \xc3\x28")
    (text_dir / "empty.txt").write_bytes(b"")
    out = root / "run"
    code, stdout, stderr = run(["train", "--text-dir", str(text_dir), "--out", str(out), *TRAIN_ARGS])
    return dict(root=root, text_dir=text_dir, out=out, code=code, stdout=stdout, stderr=stderr)


def test_train_on_text_dir(trained):
    out = trained["out"]
    assert trained["code"] == 0, trained["stderr"]
    stdout = trained["stdout"]
    # the bad file is reported (count in the table, and by name) and skipped; the empty file is simply no document
    assert "files skipped" in stdout and "bad.txt" in stdout and "UTF-8" in stdout
    report = json.loads((out / "data" / "report.json").read_text(encoding="utf-8"))
    assert [Path(s["path"]).name for s in report["skipped_files"]] == ["bad.txt"]
    assert report["documents_in"] == 40 and report["kept"] == 40 and report["references"] > 0
    # the model loads, and its vocabulary covers the tokenizer's
    model, tok = load_pretrained(out / "model")
    assert tok is not None and tok.vocab_size <= model.cfg.vocab_size == 512
    assert model.cfg.name == "tiny"
    # both stages logged every step
    for stage in ("warmup", "continual"):
        lines = [json.loads(l) for l in (out / stage / f"{stage}.jsonl").read_text().splitlines() if l]
        assert [r["step"] for r in lines] == [0, 1, 2]
        assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in lines)  # finite, not NaN
        assert (out / stage / "latest").exists()
    assert (out / "loss.png").stat().st_size > 0


def test_build_bank_from_text_dir(trained):
    bank_dir = trained["root"] / "bank"
    code, stdout, stderr = run(["build-bank", "--model", str(trained["out"] / "model"),
                                "--text-dir", str(trained["text_dir"]), "--out", str(bank_dir), "--quiet",
                                "--threads", "1"])
    assert code == 0, stderr
    assert "bad.txt" in stdout
    model, tok = load_pretrained(trained["out"] / "model")
    bank = MemoryBank.open(bank_dir, model, tok)
    # same seed as train -> the same knowledge-base subset; English text re-tokenizes exactly, so 1:1
    n_refs = json.loads((trained["out"] / "data" / "report.json").read_text())["references"]
    assert len(bank) == n_refs > 0
    mem = bank.get([0, len(bank) - 1])
    assert len(mem) == 2


def test_build_bank_splits_references_that_retokenize_longer(trained, tmp_path):
    """Greek text under an English tokenizer is mostly single-byte tokens, so 128-token chunks cut two-byte
    letters; the decoded U+FFFD re-tokenizes to 3 tokens, and the text would exceed 128. It is split, not refused."""
    rng = random.Random(1)
    words = ["καλημέρα", "θάλασσα", "βιβλίο", "σπίτι", "ήλιος", "νερό", "δρόμος", "παιδί", "φίλος", "πόλη", "και",
             "το", "η", "ο", "στο", "με"]
    greek = tmp_path / "greek"
    greek.mkdir()
    for i in range(8):
        (greek / f"g{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(rng.randint(80, 160))) + ".",
                                         encoding="utf-8")
    bank_dir = tmp_path / "bank"
    code, stdout, stderr = run(["build-bank", "--model", str(trained["out"] / "model"), "--text-dir", str(greek),
                                "--out", str(bank_dir), "--quiet", "--threads", "1"])
    assert code == 0, stderr
    model, tok = load_pretrained(trained["out"] / "model")
    bank = MemoryBank.open(bank_dir, model, tok)
    refs = [json.loads(l) for l in (tmp_path / "bank.data" / "references.jsonl").read_text("utf-8").splitlines()]
    assert any(len(tok.encode(r["text"])) > model.cfg.reference_length for r in refs)  # the case is exercised
    assert len(bank) > len(refs) and "split" in stdout
    assert all(len(tok.encode(t)) <= model.cfg.reference_length for t in bank.texts)
    assert "".join(bank.texts) == "".join(r["text"] for r in refs)  # split, nothing lost


def test_empty_folder_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, stderr = run(["train", "--text-dir", str(empty), "--out", str(tmp_path / "o"), *TRAIN_ARGS])
    assert code == 2
    assert "no .txt files" in stderr and "Traceback" not in stderr


def test_folder_of_only_bad_files_is_a_clear_error(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.txt").write_bytes(b"\xff\xfe\xfa")
    (d / "b.txt").write_bytes(b"")
    code, _, stderr = run(["train", "--text-dir", str(d), "--out", str(tmp_path / "o"), *TRAIN_ARGS])
    assert code == 2 and "survived filtering" in stderr


def test_sequence_longer_than_context_fails_before_the_pipeline(tmp_path, trained):
    args = [a if a != "2" or i != TRAIN_ARGS.index("--chunks-per-sequence") + 1 else "5"
            for i, a in enumerate(TRAIN_ARGS)]
    out = tmp_path / "o"
    code, _, stderr = run(["train", "--text-dir", str(trained["text_dir"]), "--out", str(out), *args])
    assert code == 2 and "max_seq_len=256" in stderr
    assert not (out / "data").exists()  # refused up front, nothing was filtered or written


def test_train_set_overrides_the_config_and_the_pipeline_follows(trained, tmp_path):
    """`--set reference_length=48 chunk_length=32`: the saved model has them, the pipeline cut references of at
    most 48 tokens, and build-bank (reading the model) keeps them whole."""
    out = tmp_path / "run"
    args = [a for a in TRAIN_ARGS]
    args[args.index("--warmup-steps") + 1] = args[args.index("--continual-steps") + 1] = "1"
    code, _, stderr = run(["train", "--text-dir", str(trained["text_dir"]), "--out", str(out), *args,
                           "--set", "reference_length=48", "--set", "chunk_length=32"])
    assert code == 0, stderr
    model, tok = load_pretrained(out / "model")
    assert (model.cfg.reference_length, model.cfg.chunk_length) == (48, 32)
    refs = [json.loads(l) for l in (out / "data" / "references.jsonl").read_text().splitlines() if l]
    assert refs and max(len(r["token_ids"]) for r in refs) <= 48 and max(len(r["token_ids"]) for r in refs) > 32
    n_default = json.loads((trained["out"] / "data" / "report.json").read_text())["references"]
    assert len(refs) > n_default  # shorter references: more of them from the same documents


@pytest.mark.parametrize("item, says", [("no_such_field=3", "not a Memory3Config field"),
                                        ("chunk_length", "expected KEY=VALUE"),
                                        ("chunk_length=abc", "chunk_length"),
                                        ("name=x", "not a Memory3Config field")])
def test_train_set_refuses_bad_overrides_before_the_pipeline(tmp_path, item, says):
    code, stdout, stderr = run(["train", "--text-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
                                *TRAIN_ARGS, "--set", item])
    assert code == 2 and says in stderr and "Traceback" not in stderr
    assert not (tmp_path / "o").exists()  # refused before anything was written
