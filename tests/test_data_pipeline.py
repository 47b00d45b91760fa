"""Tests for the §4.2-§4.4 data pipeline: text input, MinHash dedup, rule filters, quality filter, run_pipeline."""

from __future__ import annotations

import json
import os
import random
import stat
import string
import warnings
from pathlib import Path

import numpy as np
import pytest

from mini_m3.data import pipeline as pipeline_module
from mini_m3.data.dedup import MinHashDeduplicator, jaccard, optimal_lsh_params, shingles
from mini_m3.data.filters import DEFAULT_RULES, DocStats, RuleFilter, apply_rules
from mini_m3.data.pipeline import (forbidden_pairs, is_reference_document, leakage_ok, load_train_sequences,
                                   read_references, run_pipeline)
from mini_m3.data.quality import LogisticQualityScorer, evaluate, heuristic_grade, roc_auc, select_by_quality
from mini_m3.data.text import TextCorpus, chunk_references, iter_documents, training_sequences, words
import mini_m3.memory.overlap as eq6
from mini_m3.tokenizer import Tokenizer

# ---- synthetic text -------------------------------------------------------------------------


def random_word(rng: random.Random, lo: int = 3, hi: int = 9) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


_RNG = random.Random(1234)
NOUNS = sorted({random_word(_RNG, 4, 8) for _ in range(400)})
VERBS = sorted({random_word(_RNG, 4, 8) + "ed" for _ in range(80)})
ADJS = sorted({random_word(_RNG, 3, 7) for _ in range(80)})


def sentence(rng: random.Random) -> str:
    n1, n2, n3 = rng.sample(NOUNS, 3)
    verb, adj = rng.choice(VERBS), rng.choice(ADJS)
    return rng.choice([
        f"The {adj} {n1} {verb} the {n2} near the {n3}.",
        f"In the morning, a {n1} {verb} an {adj} {n2} with the {n3}.",
        f"Because the {n1} was {adj}, the {n2} {verb} it for the {n3}.",
    ])


def good_doc(rng: random.Random, n_sentences: int = 10) -> str:
    return " ".join(sentence(rng) for _ in range(n_sentences))


def salad_doc(rng: random.Random, n_sentences: int = 10) -> str:
    """The same words as a good document, shuffled, without punctuation."""
    tokens = good_doc(rng, n_sentences).replace(".", "").replace(",", "").split()
    rng.shuffle(tokens)
    return " ".join(tokens)


def spam_doc(rng: random.Random) -> str:
    return " ".join(rng.choice(["buy", "now", "cheap", "deal", "click", "here"]) for _ in range(80)) + " !!!"


def list_doc(rng: random.Random) -> str:
    return ", ".join(f"{rng.choice(NOUNS)}{rng.randint(0, 99)}" for _ in range(60))


# ---- text.py ---------------------------------------------------------------------------------


def test_iter_documents_reports_bad_utf8_and_reads_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second document", encoding="utf-8")
    (tmp_path / "a.txt").write_text("\ufefffirst document\r\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("para one\n\n\npara two", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait \xff\xfe")  # latin-1, not UTF-8
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    skipped = []
    with pytest.warns(UserWarning, match="bad.txt"):
        docs = list(iter_documents(tmp_path, errors=skipped))
    assert [d.doc_id for d in docs] == ["a.txt", "b.txt", "sub/c.txt"]
    assert docs[0].text == "first document"  # BOM and CRLF handled
    assert len(skipped) == 1 and skipped[0].path.endswith("bad.txt") and "UTF-8" in skipped[0].reason

    paragraphs = list(iter_documents(tmp_path / "sub", split_paragraphs=True))
    assert [(d.doc_id, d.text) for d in paragraphs] == [("c.txt#0", "para one"), ("c.txt#1", "para two")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [d.doc_id for d in iter_documents(tmp_path, recursive=False)] == ["a.txt", "b.txt"]


def test_iter_documents_errors(tmp_path):
    with pytest.raises(ValueError, match="no .txt files"):
        iter_documents(tmp_path)  # empty folder: raised at call time, not at first next()
    (tmp_path / "readme.md").write_text("not text input")
    with pytest.raises(ValueError, match="no .txt files"):
        iter_documents(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing-folder"):
        iter_documents(tmp_path / "missing-folder")


def test_chunk_references_cover_document_in_order():
    ids = list(range(1000, 1000 + 300))
    chunks = chunk_references(ids, 128)
    assert [len(c) for c in chunks] == [128, 128, 44]
    assert sum(chunks, []) == ids
    assert chunk_references([], 128) == []
    assert chunk_references([5], 128) == [[5]]


def test_training_sequences_fixed_length_and_deterministic():
    docs = [[10] * 5, [11] * 300, [12] * 7]
    seqs = list(training_sequences(docs, 64))
    stream = [1, *docs[0], 2, 1, *docs[1], 2, 1, *docs[2], 2]
    assert all(len(s) == 64 for s in seqs)
    assert len(seqs) == len(stream) // 64
    assert sum(seqs, []) == stream[:len(seqs) * 64]
    assert seqs == list(training_sequences(iter(docs), 64))


def test_text_corpus_from_dir(tmp_path):
    rng = random.Random(0)
    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text(good_doc(rng, 12 + 4 * i), encoding="utf-8")
    (tmp_path / "broken.txt").write_bytes(b"\x80\x81\x82 not utf8")
    with pytest.warns(UserWarning):
        corpus = TextCorpus.from_dir(tmp_path, vocab_size=400, seq_len=64)
    assert len(corpus.documents) == 6 and len(corpus.skipped) == 1
    assert all(1 <= len(r) <= 128 for r in corpus.reference_token_ids)
    assert len(corpus.references) == len(corpus.reference_token_ids) == len(corpus.reference_doc_ids)
    for doc in corpus.documents:  # each document's references are its reference tokens, in order
        refs = [r for r, d in zip(corpus.reference_token_ids, corpus.reference_doc_ids) if d == doc.doc_id]
        assert sum(refs, []) == corpus.tokenizer.encode_reference(doc.text)
    assert corpus.training_sequences and all(len(s) == 64 for s in corpus.training_sequences)


def test_words_count_cjk_characters():
    assert words("Don't stop, state-of-the-art!") == ["don't", "stop", "state-of-the-art"]
    assert words("今天天气很好 ok") == ["今", "天", "天", "气", "很", "好", "ok"]


# ---- dedup.py --------------------------------------------------------------------------------


def _planted_corpus(n_distinct=200, n_dups=30, n_related=30, seed=0):
    """Distinct random-word documents, near-duplicates of some (3 words changed: Jaccard about 0.9)
    and related-but-distinct variants of others (14 words changed: Jaccard about 0.6, which LSH
    often proposes as candidates and verification must reject). Returns docs and planted pairs."""
    rng = random.Random(seed)
    vocab = sorted({random_word(rng) for _ in range(5000)})
    originals = [[rng.choice(vocab) for _ in range(rng.randint(250, 350))] for _ in range(n_distinct)]
    docs = [(f"orig{i}", " ".join(w)) for i, w in enumerate(originals)]
    planted = set()
    chosen = rng.sample(range(n_distinct), n_dups + n_related)
    for k, i in enumerate(chosen):
        copy = list(originals[i])
        for pos in rng.sample(range(len(copy)), 3 if k < n_dups else 14):
            copy[pos] = rng.choice(vocab)
        if k < n_dups:
            docs.append((f"dup{k}", " ".join(copy)))
            planted.add((f"dup{k}", f"orig{i}"))
        else:
            docs.append((f"related{k}", " ".join(copy)))
    return docs, planted


def test_minhash_finds_all_planted_near_duplicates_and_invents_none():
    docs, planted = _planted_corpus()
    by_id = dict(docs)
    for dup, orig in planted:
        assert 0.85 <= jaccard(by_id[dup], by_id[orig]) <= 0.95  # the plant is what we claim
    dedup = MinHashDeduplicator(threshold=0.8, num_perm=128, shingle_size=5, seed=0)
    candidates_checked = 0
    for doc_id, text in docs:
        keys = dedup._band_keys(dedup.signature(text))
        candidates_checked += any(key in band for band, key in zip(dedup._buckets, keys))
        dedup.add(doc_id, text)
    found = {(dropped, kept) for dropped, kept, _ in dedup.dropped_pairs}
    assert found == planted  # recall 1 and precision 1
    assert dedup.num_kept == 200 + 30  # the related documents are kept
    assert candidates_checked > len(planted)  # some related docs were LSH candidates, rejected by verification
    assert all(0.8 <= estimate <= 1.0 for *_, estimate in dedup.dropped_pairs)


def test_minhash_streaming_order_semantics():
    rng = random.Random(3)
    a = " ".join(random_word(rng) for _ in range(200))
    near_a = a.replace(a.split()[100], "changedword", 1)
    b = " ".join(random_word(rng) for _ in range(200))
    dedup = MinHashDeduplicator()
    assert dedup.add("a", a) is None  # first seen is kept
    assert dedup.add("b", b) is None
    assert dedup.add("a2", near_a) == "a"  # later near-duplicate is dropped, pointing at the kept one
    assert dedup.add("a3", a) == "a"  # dropped docs are not indexed: matches kept "a", not "a2"
    assert [p[:2] for p in dedup.dropped_pairs] == [("a2", "a"), ("a3", "a")]
    reversed_order = MinHashDeduplicator()
    assert reversed_order.add("a2", near_a) is None and reversed_order.add("a", a) == "a2"


def test_jaccard_exact_and_shingles():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert jaccard("a b c d e f", "a b c d e g") == pytest.approx(1 / 3)  # {abcde, bcdef} vs {abcde, bcdeg}
    assert jaccard("same text here", "same text here") == 1.0
    assert shingles("tiny") == {"tiny"}  # fewer than 5 words and chars: one shingle
    assert shingles("one two", 5) == {"one t", "ne tw", "e two"}  # short text: character shingles


def test_lsh_params_match_datasketch_recipe():
    assert optimal_lsh_params(0.8, 128) == (9, 13)  # datasketch MinHashLSH(threshold=0.8, num_perm=128): b=9, r=13
    dedup = MinHashDeduplicator(threshold=0.8, num_perm=128)  # verified candidates: weigh false negatives 0.9
    assert (dedup.bands, dedup.rows) == (14, 9) and dedup.bands * dedup.rows <= 128


# ---- filters.py --------------------------------------------------------------------------------


def _natural(n_words: int, seed: int = 0) -> str:
    tokens = good_doc(random.Random(seed), n_words // 4 + 5).split()[:n_words]
    return " ".join(tokens)


def test_each_rule_just_over_and_under_its_threshold():
    rules = {r.name: r for r in DEFAULT_RULES}

    assert apply_rules(_natural(50)) is None
    assert apply_rules(_natural(49)) == "min_words"

    ten = [w * 2 for w in ("abcde", "fghij", "klmno", "pqrst", "uvwxy", "zabcd", "efghi", "jklmn", "opqrs",
                           "tuvwx", "yzabc", "defgh", "ijklm", "nopqr", "stuvw", "xyzab", "cdefg", "hijkl",
                           "mnopq", "rstuv")]
    long_words = ten * 3  # 60 words, all 10 letters: mean exactly 10
    assert DocStats(" ".join(long_words)).mean_word_length == 10 and apply_rules(" ".join(long_words)) is None
    assert apply_rules(" ".join(long_words[:-1] + [long_words[-1] + "x"])) == "mean_word_length"

    fives = ["abcde", "fghij", "klmno", "pqrst", "uvwxy", "zabcd", "efghi", "jklmn", "opqrs", "tuvwx",
             "yzabc", "defgh", "ijklm", "nopqr", "stuvw", "xyzab", "cdefg", "hijkl", "mnopq", "rstuv"]
    letters = " ".join(fives * 3)  # 300 letters
    assert apply_rules(letters + " " + "#" * 700) == "non_alphabetic"  # 700 / 1000 = 70 %: dropped (>=)
    assert apply_rules(letters + " " + "#" * 699) is None  # 699 / 999 < 70 %: kept
    assert apply_rules(letters + " 1" * 700) == "non_alphabetic"  # digits are not alphabetic either
    assert rules["non_alphabetic"].violated(letters + " " + "#" * 700)

    vocab = [random_word(random.Random(i), 5, 5) + "x" for i in range(200)]
    assert len(set(vocab)) == 200
    salad_90 = vocab[:90] + vocab[:10]  # 100 words, 90 distinct -> 0.90: kept
    salad_91 = vocab[:91] + vocab[:9]  # 91 distinct -> 0.91: dropped
    assert DocStats(" ".join(salad_90)).unique_word_fraction == 0.90
    assert apply_rules(" ".join(salad_90)) is None
    assert apply_rules(" ".join(salad_91)) == "unique_word_fraction"

    eight = vocab[:8] * 8  # 8 equally frequent words: exactly 3.0 bits -> kept
    assert DocStats(" ".join(eight)).unigram_entropy == 3.0 and apply_rules(" ".join(eight)) is None
    skewed = eight[:-1] + [vocab[0]]  # one word more frequent: just under 3 bits
    assert 2.95 < DocStats(" ".join(skewed)).unigram_entropy < 3.0
    assert apply_rules(" ".join(skewed)) == "unigram_entropy"


def test_rule_order_and_counts():
    spam_short = "buy now " * 10  # 20 words: fails min_words AND unigram_entropy; the first rule counts
    assert apply_rules(spam_short) == "min_words"
    assert apply_rules(spam_short, [r for r in DEFAULT_RULES if r.name != "min_words"]) == "unigram_entropy"
    rng = random.Random(5)
    docs = [_natural(80, 1), _natural(80, 2), spam_short, "x " * 10, spam_doc(rng),
            " ".join(["abcdefghijklmnop"] * 60), "%%%% " * 200 + _natural(55, 3),
            " ".join(random_word(rng) for _ in range(120))]
    rule_filter = RuleFilter()
    outcomes = [rule_filter.check(d) for d in docs]
    assert outcomes == [None, None, "min_words", "min_words", "unigram_entropy", "mean_word_length",
                        "non_alphabetic", "unique_word_fraction"]
    assert rule_filter.dropped_by_rule == {"min_words": 2, "mean_word_length": 1, "non_alphabetic": 1,
                                           "unique_word_fraction": 1, "unigram_entropy": 1}
    assert rule_filter.kept == 2 and rule_filter.dropped == 6


def test_chinese_text_is_not_dropped_for_lack_of_spaces():
    chinese = ("记忆是人类学习的基础。研究人员发现，大脑把知识分成不同的部分，有的存在长期记忆里，"
               "有的只在短时间内使用。语言模型也有类似的问题：参数里的知识很贵，文本里的知识很便宜。"
               "所以我们把一部分知识放在外部的记忆里，需要的时候再读出来。")
    assert DocStats(chinese).n_words >= 50
    assert apply_rules(chinese) is None


# ---- quality.py --------------------------------------------------------------------------------


def _labelled_sample(n: int, seed: int):
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        if rng.random() < 0.5:
            texts.append(good_doc(rng, rng.randint(6, 14)))
            labels.append(1)
        else:
            texts.append(rng.choice([salad_doc, salad_doc, lambda r: spam_doc(r), lambda r: list_doc(r)])(rng))
            labels.append(0)
    return texts, labels


def test_quality_scorer_held_out_accuracy_and_persistence(tmp_path):
    train_texts, train_labels = _labelled_sample(300, seed=0)
    test_texts, test_labels = _labelled_sample(200, seed=1)
    scorer = LogisticQualityScorer(seed=0).fit(train_texts, train_labels, progress=False)
    metrics = evaluate(scorer, test_texts, test_labels)
    assert metrics["accuracy"] >= 0.9 and metrics["auc"] >= 0.95, metrics

    path = tmp_path / "scorer.json"
    scorer.save(path)
    assert np.array_equal(LogisticQualityScorer.load(path).score(test_texts), scorer.score(test_texts))
    assert not list(tmp_path.glob(".tmp*"))


def test_heuristic_grade_orders_good_above_junk():
    rng = random.Random(2)
    assert heuristic_grade(good_doc(rng)) >= 4
    assert heuristic_grade(spam_doc(rng)) == 0
    assert heuristic_grade(list_doc(rng)) <= 2
    assert heuristic_grade(salad_doc(rng)) < heuristic_grade(good_doc(rng))


class _FixedScorer:
    def __init__(self, table):
        self.table = table

    def score(self, texts):
        return np.array([self.table[t] for t in texts], dtype=float)


def test_select_by_quality_keeps_exactly_the_top_share():
    rng = np.random.default_rng(0)
    values = rng.permutation(1000).astype(float)
    texts = [f"doc{i}" for i in range(1000)]
    scorer = _FixedScorer(dict(zip(texts, values)))
    selection = select_by_quality(iter(texts), scorer, 0.3, batch_size=64, progress=False)
    assert selection.keep.sum() == 300
    assert set(np.flatnonzero(selection.keep)) == set(np.argsort(-values)[:300])
    assert selection.threshold == 700.0
    assert select_by_quality(texts, scorer, 0.0, progress=False).keep.sum() == 0
    assert select_by_quality(texts, scorer, 1.0, progress=False).keep.all()
    ties = _FixedScorer({t: 1.0 for t in texts[:10]})
    assert list(np.flatnonzero(select_by_quality(texts[:10], ties, 0.5, progress=False).keep)) == [0, 1, 2, 3, 4]


def test_roc_auc():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5


# ---- pipeline.py -------------------------------------------------------------------------------


def _write_corpus(folder: Path, seed: int = 0):
    """60 good documents, 5 near-duplicates of them, 4 junk documents (one per rule), 1 non-UTF-8 file.
    Returns the planted (duplicate, original) doc-id pairs."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    goods = [good_doc(rng, rng.randint(8, 30)) for _ in range(60)]
    for i, text in enumerate(goods):
        (folder / f"good_{i:03d}.txt").write_text(text, encoding="utf-8")
    planted = set()
    for k, i in enumerate(rng.sample(range(60), 5)):
        tokens = goods[i].split()
        tokens[len(tokens) // 2] = "altered"
        (folder / f"zz_dup_{k}.txt").write_text(" ".join(tokens), encoding="utf-8")
        planted.add((f"zz_dup_{k}.txt", f"good_{i:03d}.txt"))
    junk = {"min_words": "too short to be a document.", "unigram_entropy": spam_doc(rng),
            "mean_word_length": " ".join(["incomprehensibilities"] * 60),
            "unique_word_fraction": " ".join(random_word(rng) for _ in range(150))}
    (folder / "junk").mkdir()
    for name, text in junk.items():
        (folder / "junk" / f"{name}.txt").write_text(text, encoding="utf-8")
    (folder / "junk" / "latin1.txt").write_bytes("Ein schöner Tag in München, außerordentlich.".encode("latin-1"))
    return planted


def test_run_pipeline_end_to_end(tmp_path):
    planted = _write_corpus(tmp_path / "text")
    out = tmp_path / "out"
    old_umask = os.umask(0o022)
    try:
        with pytest.warns(UserWarning, match="latin1.txt"):
            report = run_pipeline(tmp_path / "text", out, vocab_size=512, seq_len=64, reference_fraction=0.5,
                                  progress=False)
    finally:
        os.umask(old_umask)
    # every output is readable by others under umask 022 (mkstemp's temp files were 0o600)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert report.documents_in == 69
    assert len(report.skipped_files) == 1 and "latin1.txt" in report.skipped_files[0]["path"]
    assert report.dropped_dedup == 5
    assert {(dropped, kept) for dropped, kept, _ in report.dedup_pairs} == planted
    assert report.dropped_by_rule == {"min_words": 1, "mean_word_length": 1, "non_alphabetic": 0,
                                      "unique_word_fraction": 1, "unigram_entropy": 1}
    assert report.dropped_quality == 0 and report.kept == 60
    assert report.documents_in == (report.dropped_dedup + sum(report.dropped_by_rule.values())
                                   + report.dropped_quality + report.kept)
    assert 0 < report.reference_documents < 60 and report.training_documents == 60  # KB is a subset of training

    assert sorted(p.name for p in out.iterdir()) == ["references.jsonl", "report.json", "tokenizer.json",
                                                     "train_tokens.npy"]  # no temp files left behind
    tokenizer = Tokenizer.load(out / "tokenizer.json")
    refs = list(read_references(out))
    assert len(refs) == report.references and [r["id"] for r in refs] == list(range(len(refs)))
    assert all(1 <= r["n_tokens"] == len(r["token_ids"]) <= 128 for r in refs)
    assert {r["doc_id"] for r in refs} == {d for d in {r["doc_id"] for r in refs}
                                          if is_reference_document(d, 0.5, seed=0)}
    tokens = np.load(out / "train_tokens.npy")
    assert tokens.dtype == np.uint16 and len(tokens) == report.tokens_train
    assert (tokens == tokenizer.bos_id).sum() == (tokens == tokenizer.eos_id).sum() == 60
    sequences = load_train_sequences(out)
    assert sequences.shape == (report.tokens_train // 64, 64) == (report.train_sequences, 64)
    saved = json.loads((out / "report.json").read_text())
    assert saved["kept"] == 60 and saved["settings"]["tokenizer_fingerprint"] == tokenizer.fingerprint()
    assert "dropped: rule min_words" in report.table()

    # references are chunks of the training text (the KB is a subset), and the leakage rule forbids
    # pairing a reference with the training text of its own document, but not with another document
    bos_positions = np.flatnonzero(tokens == tokenizer.bos_id)
    training_docs = [tokens[a + 1:b].tolist() for a, b in zip(bos_positions, list(bos_positions[1:]) + [len(tokens)])]
    ref = refs[0]
    own = training_docs[int(ref["doc_id"][len("good_"):][:3])]
    other = training_docs[(int(ref["doc_id"][len("good_"):][:3]) + 1) % 60]
    # a reference is its document's text tokenized as memory reads it (the first word after a space)
    assert tokenizer.encode_reference(tokenizer.decode(own))[:ref["n_tokens"]] == ref["token_ids"]
    assert not leakage_ok(own, ref["token_ids"]) and leakage_ok(other, ref["token_ids"])


def test_run_pipeline_options(tmp_path):
    _write_corpus(tmp_path / "text")
    tokenizer = Tokenizer.train([good_doc(random.Random(9), 40)], 300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        disjoint = run_pipeline(tmp_path / "text", tmp_path / "a", tokenizer=tokenizer, seq_len=64,
                                references_in_training=False, progress=False)
        filtered = run_pipeline(tmp_path / "text", tmp_path / "b", tokenizer=tokenizer, seq_len=64,
                                quality_keep_fraction=0.75, progress=False)
    assert disjoint.training_documents == disjoint.kept - disjoint.reference_documents
    assert filtered.kept == 45 and filtered.dropped_quality == 15
    assert filtered.documents_in == (filtered.dropped_dedup + sum(filtered.dropped_by_rule.values())
                                     + filtered.dropped_quality + filtered.kept)
    assert (tmp_path / "b" / "quality_scorer.json").exists()
    with pytest.raises(ValueError, match="no .txt files"):
        run_pipeline(tmp_path / "a", tmp_path / "c", progress=False)


def test_leakage_rule_uses_the_shared_overlap(monkeypatch):
    assert pipeline_module.exceeds_overlap is eq6.exceeds_overlap  # imported from the Eq. 6 module, never copied
    rng = np.random.default_rng(0)
    reference = rng.integers(4, 4000, size=128).tolist()
    other = rng.integers(4, 4000, size=256).tolist()
    containing = other[128:192] + reference + other[192:256]
    assert not leakage_ok(reference, reference)  # identical: forbidden
    assert not leakage_ok(containing, reference)  # sequence contains the reference: forbidden
    assert leakage_ok(other, reference)  # unrelated: allowed
    near = list(reference)
    for i in range(0, 128, 8):  # 16 of 128 tokens changed: overlap 0.875 <= 0.9, allowed
        near[i] = 5000 + i
    assert eq6.overlap(near, reference) == pytest.approx(112 / 128)
    assert leakage_ok(near, reference)
    assert forbidden_pairs([reference, other, containing], [reference, other[:128]], progress=False) == [
        (0, 0), (1, 1), (2, 0)]

    calls = []
    monkeypatch.setattr(pipeline_module, "exceeds_overlap",
                        lambda t, r, threshold: calls.append(threshold) or eq6.exceeds_overlap(t, r, threshold))
    leakage_ok(other, reference)
    assert calls == [eq6.TRAIN_LEAKAGE_THRESHOLD]
