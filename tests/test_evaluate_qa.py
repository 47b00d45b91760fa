"""§7 evaluation of facts a user brings (issue 15 item 4): `mini-m3 evaluate --qa FILE.jsonl` asks each question in
the model's QA prompt with memory, memory off and RAG, and writes exact match, the model's memory format and
retrieval top-1; a bad line is one error naming file:line."""
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mini_m3 import Memory3, Memory3Config, Tokenizer
from mini_m3.checkpoint import save_pretrained
from mini_m3.data.world import qa_prompt
from mini_m3.evaluate import UserQuestion, qa_eval
from mini_m3.memory.bank import MemoryBank
from mini_m3.train import ChunkedData, TrainConfig, pack_documents, train
from test_cli_errors import assert_user_error, cli

NAMES = [a + b for a in ("Bor", "Kal", "Miv", "Tes", "Dun", "Rao", "Pel", "Wix")
         for b in ("ani", "ock", "uze", "erl", "ima", "ost")]
KEYS = "red blue green gold silver black white amber coral ivory olive pearl".split()
N_TRAINED = 36  # people 0..35 are in the training text; 36..47 exist only in the bank


def question(name: str) -> str:
    return f"Which key does {name} keep?"


@pytest.fixture(scope="module")
def reading(tmp_path_factory):
    """A tiny model (16-token chunks and references) trained for 150 continual steps (~6 s) to answer "Which key
    does NAME keep?" from the one memory its chunk reads, on 36 of 48 people; saved with its tokenizer, and a bank
    of all 48 references built by `build-bank --references`. Measured (seed 0): held-out people 11/12 with memory,
    0/12 with memory off, retrieval top-1 12/12. (tests/test_train.py's secret-copying model has no tokenizer or
    QA prompt, so it cannot be asked through the CLI.)"""
    rng = random.Random(0)
    names = list(NAMES)
    rng.shuffle(names)
    people = [(n, rng.choice(KEYS)) for n in names]
    refs = [f"{n} keeps the {k} key." for n, k in people]
    qa_text = [f"{qa_prompt(question(n))} {k}" for n, k in people]
    tok = Tokenizer.train((refs + qa_text) * 3, 400)
    docs = tok.encode_batch(qa_text[:N_TRAINED])
    tokens, targets = pack_documents(docs, 16, 1, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    data = ChunkedData(tokens, targets, torch.arange(N_TRAINED)[:, None], tok.encode_references(refs))
    torch.manual_seed(0)
    cfg = Memory3Config.from_name("tiny", memories_per_chunk=1, chunk_length=16, reference_length=16, max_seq_len=32)
    model = Memory3(cfg)
    train(model, data, TrainConfig(stage="continual", steps=150, batch_size=16, lr=1e-2, warmup_steps=10, quiet=True))
    root = tmp_path_factory.mktemp("reading")
    save_pretrained(model.eval(), root / "model", tok)
    (root / "refs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in refs))
    assert cli_ok("build-bank", "--model", root / "model", "--references", root / "refs.jsonl", "--out", root / "bank")
    return SimpleNamespace(root=root, model=model, tok=tok, people=people, refs=refs)


def cli_ok(*argv) -> bool:
    from mini_m3.cli import main
    return main([str(a) for a in argv] + ["--quiet", "--threads", "1"]) == 0


def write_qa(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def evaluate(reading, qa: Path, out: Path, model: Path | None = None) -> dict:
    assert cli_ok("evaluate", "--model", model or reading.root / "model", "--bank", reading.root / "bank",
                  "--qa", qa, "--out", out)
    return json.loads(out.read_text())


def test_evaluate_qa_on_a_model_trained_to_read_memory_beats_memory_off(reading, tmp_path):
    """People who exist only in the bank: the model answers from memory, not from its weights."""
    rows = [{"question": question(n), "answer": k, "reference": i}
            for i, (n, k) in enumerate(reading.people) if i >= N_TRAINED]
    r = evaluate(reading, write_qa(tmp_path / "qa.jsonl", rows), tmp_path / "r.json")
    em = r["exact_match"]
    assert em["memory"] >= em["memory_off"] + 0.5, em  # measured 0.917 vs 0.0
    assert r["retrieval_top1"] >= 0.9


def test_evaluate_qa_writes_a_consistent_result(reading, tmp_path, capsys):
    rows = [{"question": question(n), "answer": k, "reference": i} for i, (n, k) in enumerate(reading.people)]
    qa, out = write_qa(tmp_path / "qa.jsonl", rows), tmp_path / "sub" / "r.json"
    capsys.readouterr()
    r = evaluate(reading, qa, out)
    printed = capsys.readouterr().out
    assert {"n", "exact_match", "memory_settings", "retrieval_top1", "retrieval_top1_definition", "provenance",
            "argv", "questions"} <= set(r)
    assert r["n"] == len(rows) == len(r["questions"])
    assert r["memory_settings"] == reading.model.cfg.memory_format == {"selector": "attention", "tokens_per_head": 8,
                                                                       "memories_per_chunk": 1}
    for mode in ("memory", "memory_off", "rag"):
        assert r["exact_match"][mode] == pytest.approx(sum(q[mode] for q in r["questions"]) / len(rows))
        assert mode in printed
    assert r["retrieval_top1"] == pytest.approx(sum(q["top1"] == q["reference"] for q in r["questions"]) / len(rows))
    assert "'reference'" in r["retrieval_top1_definition"]
    assert r["argv"][:2] == ["mini-m3", "evaluate"] and str(qa) in r["argv"]
    assert r["provenance"]["seed"] == 0 and r["provenance"]["argv"] == r["argv"]
    assert "retrieval top-1" in printed and str(out) in printed
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # written atomically: no temporary file left
    # without "reference": a hit is a top-1 text that contains the answer
    r = evaluate(reading, write_qa(tmp_path / "qa2.jsonl", [{"question": q["question"], "answer": q["answer"]}
                                                            for q in rows]), tmp_path / "r2.json")
    hits = [q["top1"] >= 0 and q["answer"] in reading.refs[q["top1"]] for q in r["questions"]]
    assert r["retrieval_top1"] == pytest.approx(sum(hits) / len(hits)) and "contains the answer" in \
        r["retrieval_top1_definition"]


def test_evaluate_qa_reads_memories_per_chunk_from_the_model_and_fits_rag_into_the_context(reading, tmp_path):
    """A model saved with 3 memories per chunk (the same weights and memory format, so the bank opens) reads 3;
    RAG's 3 reference texts do not fit its 32-token context, so the lowest-ranked are left out (before, qa_eval
    raised "a QA row ... exceeds max_seq_len")."""
    save_pretrained(reading.model.with_memory_format(memories_per_chunk=3), tmp_path / "m3", reading.tok)
    rows = [{"question": question(n), "answer": k} for n, k in reading.people[:8]]
    r = evaluate(reading, write_qa(tmp_path / "qa.jsonl", rows), tmp_path / "r.json", model=tmp_path / "m3")
    assert r["memory_settings"]["memories_per_chunk"] == 3 and r["memories_read"] == 3
    assert 0 < r["rag_references_read"] < 3
    bank = MemoryBank.open(reading.root / "bank", reading.model, reading.tok)
    items = [UserQuestion(q["question"], q["answer"]) for q in rows]
    res = qa_eval(reading.model, reading.tok, items, mode="rag", bank=bank, memories_per_chunk=3)
    assert res["n"] == len(rows) and 0 < res["rag_references_read"] < 3


GOOD = {"question": "Which key does Borani keep?", "answer": "red"}


@pytest.mark.parametrize("lines, line, needle", [
    ([GOOD, '{"question": "Which key", "answer": '], 2, "not valid JSON"),
    ([GOOD, {"question": "Which key?"}], 2, "field 'answer' must be a non-empty string, got missing"),
    ([{"question": "  ", "answer": "red"}], 1, "field 'question' must be a non-empty string"),
    ([GOOD, GOOD, {"question": "Which key?", "answer": 5}], 3, "field 'answer' must be a non-empty string, got int"),
    ([{**GOOD, "reference": True}], 1, "'reference' must be an integer >= 0"),
    ([{**GOOD, "reference": -1}], 1, "'reference' must be an integer >= 0"),
    ([{**GOOD, "reference": "3"}], 1, "'reference' must be an integer >= 0"),
    ([{**GOOD, "refrence": 3}], 1, "unknown field(s) ['refrence']"),
    ([{**GOOD, "reference": 0}, GOOD], 2, "'reference' is given on some lines only"),
    ([GOOD, [1, 2]], 2, "expected a JSON object"),
    ([{"question": "Which key?", "answer": "red\nblue"}], 1, "spans several lines"),
    ([GOOD, b'{"question": "\xff", "answer": "a"}'], 2, "not valid UTF-8"),
    ([{**GOOD, "reference": 48}], 1, "reference 48 is not in the bank of 48 references"),
    ([{"question": "Which key does " + "Borani " * 40 + "keep?", "answer": "red"}], 1, "max_seq_len=32"),
])
def test_a_bad_qa_line_is_one_error_naming_file_and_line(reading, tmp_path, capsys, lines, line, needle):
    qa = tmp_path / "qa.jsonl"
    qa.write_bytes(b"".join((l if isinstance(l, bytes) else (l if isinstance(l, str) else json.dumps(l)).encode())
                            + b"\n" for l in lines))
    code, _, err = cli(capsys, "evaluate", "--model", reading.root / "model", "--bank", reading.root / "bank",
                       "--qa", qa, "--out", tmp_path / "r.json", "--quiet")
    assert_user_error(code, err, "evaluate", f"{qa}:{line}", needle)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_a_qa_file_without_questions_is_an_error(reading, tmp_path, capsys, content):
    qa = tmp_path / "qa.jsonl"
    qa.write_bytes(content)
    code, _, err = cli(capsys, "evaluate", "--model", reading.root / "model", "--bank", reading.root / "bank",
                       "--qa", qa, "--quiet")
    assert_user_error(code, err, "evaluate", f"{qa} holds no questions")


def test_qa_needs_a_bank_and_excludes_text_dir(reading, tmp_path, capsys):
    qa = write_qa(tmp_path / "qa.jsonl", [GOOD])
    code, _, err = cli(capsys, "evaluate", "--model", reading.root / "model", "--qa", qa, "--quiet")
    assert_user_error(code, err, "evaluate", "--qa needs --bank")
    code, _, err = cli(capsys, "evaluate", "--model", reading.root / "model", "--bank", reading.root / "bank",
                       "--qa", qa, "--text-dir", tmp_path)
    assert_user_error(code, err, "evaluate", "not allowed with argument", usage=True)


def test_qa_eval_pieces_are_teacher_forced_token_hits_that_exact_match_implies(reading):
    """"pieces": one bool per answer token; an exact match has every piece right, and with memory off (the model
    cannot know held-out keys) the first piece is mostly wrong."""
    bank = MemoryBank.open(reading.root / "bank", reading.model, reading.tok)
    items = [UserQuestion(question(n), k) for n, k in reading.people]
    for mode in ("memory", "none"):
        r = qa_eval(reading.model, reading.tok, items, mode=mode, bank=bank)
        assert [len(p) for p in r["pieces"]] == [len(reading.tok.encode(" " + it.answer)) for it in items]
        assert all(all(p) for p, ok in zip(r["pieces"], r["correct"]) if ok)
        first = [p[0] for p in r["pieces"][N_TRAINED:]]  # held-out people
        assert (sum(first) >= 10) if mode == "memory" else (sum(first) <= 4), (mode, first)
