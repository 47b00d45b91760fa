"""CLI user errors (issue 19): bad input gives `mini-m3 CMD: error: ...` on one line and exit code 2, never a traceback.

Covers hostile or malformed files (JSONL without `text`, deeply nested JSON, an int where a list is expected, a folder
where a file is expected), numeric arguments (NaN, inf, negative, zero), a `.txt` file whose NAME is not UTF-8, the
`build-bank --out X.data` folder collision, and the §4 pipeline's memory on one large file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mini_m3 import Memory3, Memory3Config, Tokenizer
from mini_m3.checkpoint import load_pretrained, save_pretrained
from mini_m3.cli import main
from mini_m3.inference import generate
from mini_m3.memory.bank import MemoryBank

pytestmark = pytest.mark.filterwarnings("ignore:skipping .*not valid UTF-8:UserWarning")

DEEP = "[" * 100_000 + "]" * 100_000  # json.loads recurses once per level: RecursionError without a depth check
WORDS = ("the a of and to in was is river market teacher garden bridge library farmer harbor window village letter "
         "train kitchen doctor mountain school painter forest station baker old quiet busy small bright cold green "
         "narrow famous wooden early tired").split()


def prose(rng: random.Random, n_words: int) -> str:
    """Text that passes the rule filters (40-word vocabulary: ~0.4 distinct per 100 words, ~5 bits entropy)."""
    return " ".join(rng.choices(WORDS, k=n_words)) + "."


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # --quiet sets it; monkeypatch undoes it after each test


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    texts = [prose(random.Random(i), 80) for i in range(20)]
    tok = Tokenizer.train(texts, 300)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "model"
    save_pretrained(Memory3(Memory3Config.from_name("tiny")), path, tok)
    return path


@pytest.fixture
def text_dir(tmp_path) -> Path:
    d = tmp_path / "texts"
    d.mkdir()
    for i in range(8):
        (d / f"doc{i}.txt").write_text(prose(random.Random(100 + i), 150), encoding="utf-8")
    return d


def cli(capsys, *argv) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr); an argparse error is SystemExit(2)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, command: str, *needles: str, usage: bool = False) -> str:
    """Exit code 2 and one error line naming what was wrong (argparse also prints its usage above it)."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [l for l in lines if l.startswith(f"mini-m3 {command}: error: ")]
    assert len(errors) == 1 and (usage or len(lines) == 1), err
    for needle in needles:
        assert needle in errors[0], err
    return errors[0]


def copy_model(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


# ---- files ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, needle", [
    (b'{"text": "Ada was born in London."}\n{"txt": "no text field"}\n', "'text'"),
    (b'{"text": "fine"}\n[1, 2]\n', "'text'"),
    (b'{"text": "fine"}\n{"text": 5}\n', "'text'"),
    (b'{"text": "fine"}\n{"text": "truncated\n', "not valid JSON"),
    (b'{"text": "fine"}\n{"text": "\xff\xfe"}\n', "UTF-8"),
    (b'{"text": "fine"}\n' + DEEP.encode() + b"\n", "nested deeper"),
])
def test_bad_references_jsonl_names_file_and_line(capsys, model_dir, tmp_path, content, needle):
    refs = tmp_path / "refs.jsonl"
    refs.write_bytes(content)
    code, _, err = cli(capsys, "build-bank", "--model", model_dir, "--references", refs, "--out", tmp_path / "bank",
                       "--quiet", "--threads", "1")
    assert_user_error(code, err, "build-bank", f"{refs}:2", needle)
    assert not (tmp_path / "bank").exists()


@pytest.mark.parametrize("field, value", [("memory_layers", 1), ("memory_heads", 0), ("reference_prefix_ids", 3)])
def test_config_with_an_int_for_a_list_is_refused(capsys, model_dir, tmp_path, field, value):
    model = copy_model(model_dir, tmp_path)
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    cfg[field] = value
    (model / "config.json").write_text(json.dumps(cfg), encoding="utf-8")  # inf is written as Infinity
    code, _, err = cli(capsys, "generate", "--model", model, "--mode", "none", "hello")
    assert_user_error(code, err, "generate", "config.json", field)


@pytest.mark.parametrize("field, value", [("memory_layers", 1), ("memory_layers", [True]),
                                          ("reference_prefix_ids", [1, False]), ("rope_base", float("inf"))])
def test_config_validation_names_the_field(field, value):
    text = json.dumps({**Memory3Config.from_name("tiny").to_dict(), field: value})  # inf/nan: Infinity/NaN
    with pytest.raises(ValueError, match=f"Memory3Config.{field}="):
        Memory3Config.from_json(text)


@pytest.mark.parametrize("file", ["config.json", "tokenizer.json"])
def test_deeply_nested_model_files_are_refused(capsys, model_dir, tmp_path, file):
    model = copy_model(model_dir, tmp_path)
    (model / file).write_text('{"x": ' + DEEP + "}", encoding="utf-8")
    code, _, err = cli(capsys, "generate", "--model", model, "--mode", "none", "hello")
    assert_user_error(code, err, "generate", file, "nested deeper")


def test_deeply_nested_bank_manifest_is_one_line(capsys, model_dir, tmp_path):
    """A hostile bank manifest is refused before json parses it, in one line that names the file."""
    (tmp_path / "bank").mkdir()
    (tmp_path / "bank" / "manifest.json").write_text('{"x": ' + DEEP + "}", encoding="utf-8")
    code, _, err = cli(capsys, "generate", "--model", model_dir, "--bank", tmp_path / "bank", "hello")
    assert_user_error(code, err, "generate", "nested")
    assert "manifest.json" in err


def test_parse_json_counts_brackets_outside_strings_only():
    from mini_m3.config import parse_json
    text = json.dumps({"text": "[" * 1000 + "{" * 1000, "ids": [[1, 2], [3]]})
    assert parse_json(text, "x")["ids"] == [[1, 2], [3]]
    with pytest.raises(ValueError, match="x: JSON nested deeper than 3 levels"):
        parse_json('{"a": [[[1]]]}', "x", max_depth=3)


def test_wrong_kind_of_path(capsys, model_dir, tmp_path, text_dir):
    """A folder where a file is expected, and a file where a folder is expected: one line naming the path."""
    for file in ("config.json", "tokenizer.json"):
        model = Path(shutil.copytree(model_dir, tmp_path / f"m-{file}"))
        (model / file).unlink()
        (model / file).mkdir()
        code, _, err = cli(capsys, "generate", "--model", model, "--mode", "none", "hello")
        assert_user_error(code, err, "generate", str(model / file))
    code, _, err = cli(capsys, "build-bank", "--model", model_dir, "--references", text_dir, "--out",
                       tmp_path / "b", "--quiet")
    assert_user_error(code, err, "build-bank", str(text_dir))
    a_file = text_dir / "doc0.txt"
    for argv in (["train", "--text-dir", a_file, "--out", tmp_path / "t"],
                 ["train", "--text-dir", text_dir, "--out", a_file],
                 ["build-bank", "--model", a_file, "--text-dir", text_dir, "--out", tmp_path / "b"],
                 ["generate", "--model", model_dir, "--bank", a_file, "hello"]):
        code, _, err = cli(capsys, *argv, "--quiet")
        assert_user_error(code, err, argv[0], str(a_file))


# ---- numeric arguments ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, flag", [
    (["generate", "--temperature", "nan"], "--temperature"),
    (["generate", "--temperature", "inf"], "--temperature"),
    (["generate", "--temperature", "-1"], "--temperature"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["evaluate", "--n", "0"], "--n"),
    (["evaluate", "--n-people", "-3"], "--n-people"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--warmup-steps", "-1"], "--warmup-steps"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--chunks-per-sequence", "0"], "--chunks-per-sequence"),
    (["train", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["sft", "--steps", "0"], "--steps"),
    (["sft", "--batch-size", "two"], "--batch-size"),
    (["dpo", "--beta", "inf"], "--beta"),
    (["build-bank", "--threads", "0"], "--threads"),
])
def test_bad_numeric_argument_is_one_usage_error(capsys, tmp_path, argv, flag):
    needs = {"generate": ["--model", tmp_path / "m", "hello"], "evaluate": ["--model", tmp_path / "m"],
             "train": ["--text-dir", tmp_path / "t"], "sft": ["--model", tmp_path / "m"],
             "dpo": ["--model", tmp_path / "m"], "build-bank": ["--model", tmp_path / "m", "--references", "r",
                                                                "--out", tmp_path / "b"]}
    code, _, err = cli(capsys, *argv, *needs[argv[0]])
    line = assert_user_error(code, err, argv[0], f"argument {flag}:", repr(argv[-1]), usage=True)
    assert "must be" in line


@pytest.mark.parametrize("flags", [["--bf16"], ["--meta-init"], ["--micro-batch", "2"], ["--stop-at", "3"],
                                   ["--bf16", "--stop-at", "3"]])
def test_train_flags_for_torchrun_are_one_error_in_one_process(capsys, tmp_path, flags):
    """FSDP2's flags need several processes: in one process `train` refuses them in one line, before any data."""
    code, _, err = cli(capsys, "train", "--world", "20", "--out", tmp_path / "o", "--preset", "tiny", *flags)
    line = assert_user_error(code, err, "train", "only under torchrun", *[f for f in flags if f.startswith("--")])
    assert "one process" in line and not (tmp_path / "o").exists()


def test_train_eval_every_needs_the_held_out_documents(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "--world", "20", "--out", tmp_path / "o", "--eval-every", "5")
    assert_user_error(code, err, "train", "--eval-every needs --text-dir")
    assert not (tmp_path / "o").exists()


def test_generate_refuses_nan_temperature(model_dir):
    model, tok = load_pretrained(model_dir)
    for t in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match="temperature"):
            generate(model, tok, "hello", mode="none", max_new_tokens=2, temperature=t)


# ---- the §4 pipeline (build-bank --text-dir, train --text-dir) --------------------------------------------------


def test_text_file_with_non_utf8_name_is_skipped_and_named(capsys, model_dir, tmp_path, text_dir):
    bad = os.path.join(os.fsencode(text_dir), b"bad\xffname.txt")
    with open(bad, "w", encoding="utf-8") as f:
        f.write(prose(random.Random(7), 150))
    code, out, err = cli(capsys, "build-bank", "--model", model_dir, "--text-dir", text_dir, "--out",
                         tmp_path / "bank", "--quiet", "--threads", "1")
    assert code == 0, err
    assert "bad\\xffname.txt: file name is not valid UTF-8" in out
    report = json.loads((tmp_path / "bank.data" / "report.json").read_text(encoding="utf-8"))
    assert report["documents_in"] == 8 and [Path(s["path"]).name for s in report["skipped_files"]] == [
        "bad\\xffname.txt"]


def test_build_bank_out_ending_in_data_does_not_collide(capsys, model_dir, tmp_path, text_dir):
    out = tmp_path / "X.data"
    code, _, err = cli(capsys, "build-bank", "--model", model_dir, "--text-dir", text_dir, "--out", out,
                       "--quiet", "--threads", "1")
    assert code == 0, err
    assert (tmp_path / "X.data.data" / "references.jsonl").exists()  # the pipeline's folder is beside the bank
    model, tok = load_pretrained(model_dir)
    assert len(MemoryBank.open(out, model, tok)) > 0


def test_pipeline_error_is_one_line(capsys, model_dir, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.txt").write_bytes(b"\xff\xfe\xfa")
    (d / "b.txt").write_text("too short", encoding="utf-8")
    code, _, err = cli(capsys, "build-bank", "--model", model_dir, "--text-dir", d, "--out", tmp_path / "bank",
                       "--quiet")
    assert_user_error(code, err, "build-bank", "survived filtering", "1 files skipped", "'min_words': 1")


def test_long_texts_tokenize_in_pieces_exactly():
    """Cuts fall where the byte-level pre-tokenizer splits anyway: the same ids, and the same trained tokenizer."""
    from mini_m3.data.pipeline import encode_in_pieces, text_pieces
    rng = random.Random(0)
    alphabet = list("ab cd  ef\n\n's.,!?-12 34\t") + ["é", "中", "。", "  ", "\u00a0", "\u3000", "😀", "\x1c"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 1000))) for _ in range(60)]
    tok = Tokenizer.train(texts, 400)
    for size in (1, 50):
        pieces = [list(text_pieces(t, size)) for t in texts]
        assert ["".join(p) for p in pieces] == texts and max(len(p) for p in pieces) > 5
        assert [[i for p in ps for i in tok.encode(p)] for ps in pieces] == tok.encode_batch(texts)
        assert [[i for r in tok.encode_references(ps) for i in r] for ps in pieces] == tok.encode_references(texts)
    assert Tokenizer.train((p for ps in pieces for p in ps), 400).fingerprint() == tok.fingerprint()
    arrays = encode_in_pieces(tok.encode_references, texts, np.uint16)
    assert [a.tolist() for a in arrays] == tok.encode_references(texts)


def test_pipeline_memory_on_one_large_file(tmp_path):
    """One 1.5 MB document: the old pipeline's peak RSS rose ~330 MB (the HF tokenizer's working memory for the
    whole text; 2.2 GB for 10 MB); tokenized in pieces it rises ~80 MB (dedup and the rules keep per-document word
    lists). Measured in a fresh process."""
    d = tmp_path / "texts"
    d.mkdir()
    (d / "big.txt").write_text(prose(random.Random(0), 250_000), encoding="utf-8")
    assert (d / "big.txt").stat().st_size > 1_500_000
    code = ("import resource, sys\n"
            "from mini_m3.data.pipeline import run_pipeline\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "r = run_pipeline(sys.argv[1], sys.argv[2], vocab_size=300, reference_fraction=0.0, progress=False)\n"
            "print(r.kept, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    res = subprocess.run([sys.executable, "-c", code, str(d), str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    kept, grew_mb = map(int, res.stdout.split())
    assert kept == 1 and grew_mb < 200, f"peak RSS grew by {grew_mb} MB"
