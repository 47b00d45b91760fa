"""Tests for mini_m3.memory.overlap (Eq. 6 overlap, leakage filter) and mini_m3.memory.retrieve (embedders, the
retriever and its leakage-filtered search)."""
import json
import random

import numpy as np
import pytest

from mini_m3.memory.overlap import (
    EVAL_LEAKAGE_THRESHOLD,
    TRAIN_LEAKAGE_THRESHOLD,
    _lcs_windowed,
    exceeds_overlap,
    leakage_filter,
    overlap,
    overlap_upper_bound,
)
from mini_m3.memory.retrieve import Embedder, HashedNgramEmbedder, Retriever, SentenceTransformerEmbedder


# -----------------------------------------------------------------------------
# Eq. 6 overlap against a brute-force reference


def lcs(a, b) -> int:
    """Textbook O(|a||b|) longest common subsequence."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def brute_overlap(t, r) -> float:
    """Eq. 6 by definition: best LCS over every window of 2|r| + 1 consecutive items of t."""
    width = 2 * len(r) + 1
    starts = range(max(1, len(t) - width + 1))
    return max(lcs(t[a : a + width], r) for a in starts) / len(r)


def random_pairs(n_pairs, seed=0):
    rng = random.Random(seed)
    for _ in range(n_pairs):
        alphabet = rng.randint(1, 6)  # small alphabets so matches happen
        n_r = rng.randint(1, 10)
        n_t = rng.choice([rng.randint(0, n_r), rng.randint(n_r, 3 * n_r), rng.randint(4 * n_r, 8 * n_r)])
        yield [rng.randrange(alphabet) for _ in range(n_t)], [rng.randrange(alphabet) for _ in range(n_r)]


def test_overlap_matches_brute_force():
    pairs = list(random_pairs(400))
    assert any(len(t) < len(r) for t, r in pairs) and any(len(t) > 4 * len(r) for t, r in pairs)
    for t, r in pairs:
        assert overlap(t, r) == brute_overlap(t, r), (t, r)
        assert overlap(np.array(t, dtype=np.int64), np.array(r, dtype=np.int32)) == brute_overlap(t, r)
        assert overlap_upper_bound(t, r) >= overlap(t, r)


def test_both_lcs_paths_agree_on_long_sequences():
    # one-window-at-a-time (Python ints) and all-windows (numpy uint64 words, multi-word carries)
    rng = np.random.default_rng(0)
    for n_r in (1, 63, 64, 65, 127, 128, 129, 200):
        for n_t in (n_r // 2, 2 * n_r + 1, 6 * n_r):
            t, r = rng.integers(0, 4, n_t), rng.integers(0, 4, n_r)
            expected = _lcs_windowed(t, r, few=10**9)
            assert _lcs_windowed(t, r, few=0) == expected, (n_r, n_t)
            if n_t <= 2 * n_r + 1:  # a single window: cheap enough for the textbook LCS
                assert expected == lcs(t.tolist(), r.tolist())


def test_overlap_special_cases():
    rng = random.Random(1)
    for _ in range(20):
        r = [rng.randrange(50) for _ in range(rng.randint(1, 40))]
        assert overlap(r, r) == 1.0
        assert overlap(r, [x + 100 for x in r]) == 0.0  # disjoint
    assert overlap("", "abc") == 0.0
    assert overlap("the cat sat", "cat") == 1.0
    assert overlap(["a", "b", "c"], ("b", "c", "z")) == pytest.approx(2 / 3)  # any hashable items
    assert overlap([-1, 5, 2**40], [2**40, -1]) == 0.5  # negative / huge ids are remapped, not clipped
    with pytest.raises(ValueError):
        overlap([1, 2], [])


def test_overlap_window_is_two_r():
    r = [1, 2]  # |r| = 2, so |i_N - i_1| <= 4
    assert overlap([1, 9, 9, 9, 2], r) == 1.0  # spread exactly 4: counts
    assert overlap([1, 9, 9, 9, 9, 2], r) == 0.5  # spread 5: only one item counts
    spread = [1] + [0] * 300 + [2] + [0] * 300 + [3]
    assert overlap(spread, [1, 2, 3]) == pytest.approx(1 / 3)
    assert lcs(spread, [1, 2, 3]) == 3  # plain LCS would say 1.0: the window matters


def test_exceeds_overlap_uses_exact_value():
    t, r = [1, 2, 3, 4], [4, 3, 2, 1]  # same multiset (bound = 1.0) but LCS = 1
    assert overlap_upper_bound(t, r) == 1.0 and overlap(t, r) == 0.25
    assert not exceeds_overlap(t, r, 0.5)
    assert exceeds_overlap([1, 2, 3, 4], [1, 2, 3, 4], 0.9)


def test_leakage_filter_thresholds():
    query = list(range(100))
    ref = lambda n_shared: list(range(n_shared)) + [1000 + i for i in range(10 - n_shared)]  # overlap n/10
    candidates = [ref(n) for n in range(11)]
    keep = leakage_filter(query, candidates, TRAIN_LEAKAGE_THRESHOLD)
    assert keep == [True] * 10 + [False]  # 0.9 exactly at the threshold is kept, 1.0 dropped
    three = [[0, 1, 2], [0, 1, 999], [0, 998, 999], [7, 8, 9]]  # overlaps 1, 2/3, 1/3, 1
    assert leakage_filter(query, three, EVAL_LEAKAGE_THRESHOLD) == [False, True, True, False]
    assert leakage_filter("the capital of france is paris", ["paris", "xyz"], 0.5) == [False, True]


def test_leakage_filter_direction():
    question = "who wrote hamlet"
    reference = "hamlet is a tragedy. who wrote hamlet? shakespeare wrote it around 1600."
    # the question is (almost) inside the reference, but it covers a small share of the reference
    assert leakage_filter(question, [reference], EVAL_LEAKAGE_THRESHOLD) == [True]
    assert leakage_filter(question, [reference], EVAL_LEAKAGE_THRESHOLD, direction="query_in_reference") == [False]
    with pytest.raises(ValueError):
        leakage_filter(question, [reference], 0.5, direction="sideways")


# -----------------------------------------------------------------------------
# embedders


def test_hashed_embedder_normalised_deterministic_and_unicode():
    texts = ["Alice was born in Paris in 1901.", "北京是中国的首都。", "emoji 🎉🎉 party", "", "   ", "ab"]
    a = HashedNgramEmbedder(dim=1024).embed(texts)
    b = HashedNgramEmbedder(dim=1024).embed(texts)
    assert a.dtype == np.float32 and a.shape == (6, 1024)
    assert np.array_equal(a, b)  # stable hash: identical across instances
    assert np.isfinite(a).all()
    norms = np.linalg.norm(a, axis=1)
    np.testing.assert_allclose(norms[:3], 1, rtol=1e-5)
    assert norms[3] == norms[4] == 0  # featureless text -> documented zero vector
    np.testing.assert_allclose(norms[5], 1, rtol=1e-5)  # a word is a feature even below n-gram length
    assert np.array_equal(HashedNgramEmbedder(dim=1024).embed([]), np.zeros((0, 1024), np.float32))
    with pytest.raises(TypeError):
        HashedNgramEmbedder().embed("a single string")


def test_hashed_embedder_similarity_and_fit_roundtrip():
    emb = HashedNgramEmbedder(dim=2048)
    docs = ["the quick brown fox jumps", "the lazy dog sleeps all day", "stock markets fell sharply"]
    emb.fit(docs * 3 + ["the the the"])
    x = emb.embed(docs + ["a quick brown fox jumped"])
    sims = x[:3] @ x[3]
    assert sims.argmax() == 0 and sims[0] > 0.3
    restored = HashedNgramEmbedder.from_state_dict(json.loads(json.dumps(emb.state_dict())))
    assert np.array_equal(restored.embed(docs), emb.embed(docs))
    assert not np.array_equal(HashedNgramEmbedder(dim=2048).embed(docs), emb.embed(docs))  # idf matters
    assert isinstance(emb, Embedder)


def test_sentence_transformer_embedder_import_error_or_real():
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install mini_m3\[embed\]"):
            SentenceTransformerEmbedder()
    else:
        pytest.skip("sentence-transformers installed; the real model path needs a download")


# -----------------------------------------------------------------------------
# retriever


def synthetic_corpus(n_refs=500, words_per_ref=60, seed=0):
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(3000)]
    refs = [" ".join(rng.choice(vocab) for _ in range(words_per_ref)) for _ in range(n_refs)]

    def cut(text):  # a 30 % contiguous piece of the reference
        words = text.split()
        n = int(0.3 * len(words))
        start = rng.randrange(len(words) - n)
        return " ".join(words[start : start + n])

    return refs, [cut(r) for r in refs]


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus()


@pytest.fixture(scope="module")
def flat(corpus):
    refs, _ = corpus
    return Retriever(HashedNgramEmbedder(dim=2048), "Flat").fit(refs)


def recall_at(ids, exact_ids):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, exact_ids)])


def test_flat_finds_source_reference(flat, corpus):
    refs, queries = corpus
    scores, ids = flat.search(queries, 5)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (500, 5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    assert (ids[:, 0] == np.arange(len(refs))).mean() >= 0.95
    assert len(flat) == 500 and flat.texts == refs


@pytest.mark.parametrize("factory, kwargs", [("HNSW32", {}), ("IVF16,Flat", {"nprobe": 8})])
def test_approximate_indexes_recall(flat, corpus, factory, kwargs):
    refs, queries = corpus
    _, exact = flat.search(queries, 5)
    _, ids = Retriever(HashedNgramEmbedder(dim=2048), factory, **kwargs).fit(refs).search(queries, 5)
    assert recall_at(ids, exact) >= 0.8
    assert (ids[:, 0] == np.arange(len(refs))).mean() >= 0.95


def test_ivf_pq_finds_source(corpus):
    refs, queries = corpus
    ret = Retriever(HashedNgramEmbedder(dim=2048), "IVF8,PQ32", nprobe=8).fit(refs)
    _, ids = ret.search(queries, 5)
    assert (ids[:, 0] == np.arange(len(refs))).mean() >= 0.9  # 2048 floats -> 32 bytes, still finds it


def test_ivf_needs_enough_training_vectors(corpus):
    refs, _ = corpus
    with pytest.raises(ValueError, match="needs at least 64 training vectors"):
        Retriever(HashedNgramEmbedder(dim=256), "IVF64,Flat").fit(refs[:20])


def test_search_errors(flat):
    with pytest.raises(ValueError, match=r"k=501.*\(500\)"):
        flat.search(["query"], 501)
    with pytest.raises(ValueError):
        flat.search(["query"], 0)
    with pytest.raises(RuntimeError, match="empty"):
        Retriever(HashedNgramEmbedder(dim=64)).search(["query"], 1)


def test_add_continues_ids(corpus):
    refs, queries = corpus
    ret = Retriever(HashedNgramEmbedder(dim=1024)).fit(refs[:100])
    ret.add(refs[100:150])
    assert len(ret) == 150 and ret.texts == refs[:150]
    _, ids = ret.search(queries[120:130], 1)
    assert (ids[:, 0] == np.arange(120, 130)).mean() >= 0.9


def test_save_load_roundtrip_and_corruption(tmp_path, flat, corpus):
    _, queries = corpus
    flat.save(tmp_path / "ret")
    loaded = Retriever.load(tmp_path / "ret")
    for a, b in zip(flat.search(queries[:50], 5), loaded.search(queries[:50], 5)):
        assert np.array_equal(a, b)
    assert loaded.texts == flat.texts and len(loaded) == len(flat)
    assert not list((tmp_path / "ret").glob("*.tmp"))  # temporaries were renamed away

    (tmp_path / "ret" / "manifest.json").write_text("{ not json")
    with pytest.raises(ValueError, match="manifest"):
        Retriever.load(tmp_path / "ret")
    (tmp_path / "ret" / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="manifest"):
        Retriever.load(tmp_path / "ret")
    with pytest.raises(ValueError, match="missing"):
        Retriever.load(tmp_path / "nothing_here")


def test_search_with_leakage_filter(flat, corpus):
    refs, queries = corpus
    k = 3
    _, plain = flat.search(queries[:10], k + 1)
    # query = the reference itself: overlap(query, its own reference) = 1 > 0.9, so it must go
    scores, ids = flat.search_with_leakage_filter(refs[:20], k, TRAIN_LEAKAGE_THRESHOLD)
    assert ids.shape == (20, k) and not (ids == np.arange(20)[:, None]).any()
    for row, q in zip(ids, refs[:20]):
        assert all(overlap(q, refs[i]) <= TRAIN_LEAKAGE_THRESHOLD for i in row)
    # a 30 % cut of a reference is caught only when measuring the query inside the reference
    _, kept = flat.search_with_leakage_filter(queries[:10], k, EVAL_LEAKAGE_THRESHOLD)
    assert (kept[:, 0] == np.arange(10)).all()
    _, dropped = flat.search_with_leakage_filter(queries[:10], k, EVAL_LEAKAGE_THRESHOLD,
                                                 direction="query_in_reference")
    assert not (dropped == np.arange(10)[:, None]).any()
    assert np.array_equal(dropped, plain[:10, 1:])  # the rest keep their order
    # token-level overlap through a tokenizer
    _, tok = flat.search_with_leakage_filter(refs[:5], k, TRAIN_LEAKAGE_THRESHOLD, tokenize=str.split)
    assert not (tok == np.arange(5)[:, None]).any()
