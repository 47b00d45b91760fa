"""§2 Defs 4, 6–7: teacher-forced output probabilities (checked against a direct softmax), the prefix and memory
paths, the threshold logic on hand-set numbers, a copy model for which the verdicts are known, and Def 4
(specific vs abstract) on two tiny models trained here: one on a bigram table, one on a copy task."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import tiny_model
from mini_m3.memory.encode import ExplicitMemory, encode_reference_tokens
from mini_m3.model import ModelOutput
from mini_m3 import Memory3, Memory3Config, Tokenizer
from mini_m3.theory.knowledge import (FOLLOW_THRESHOLD, HAS_THRESHOLD, LACKS_THRESHOLD, STAY_THRESHOLD, imitability,
                                      imitability_verdict, kind_verdict, knowledge_kind, knowledge_report,
                                      knowledge_verdicts, lacks, output_probabilities, produces)


@pytest.fixture(scope="module")
def tok():
    texts = ["The capital of France is Paris.", "Paris is the capital of France.",
             "The capital of Italy is Rome.", "Rome is a city in Italy."] * 20
    return Tokenizer.train(texts, vocab_size=300)


def direct_probs(model, seq, n_out, **kw):
    """Softmax of model(...) at the positions that predict the last n_out tokens of seq."""
    with torch.no_grad():
        logits = model(torch.tensor([seq[:-1]]), **kw).logits[0]
    p = torch.softmax(logits.double(), -1)
    return np.array([p[len(seq) - 1 - n_out + k, seq[len(seq) - n_out + k]].item() for k in range(n_out)])


PREFIX, INP, OUT = [1, 40, 41, 42, 43], [50, 51, 52], [60, 61, 62]


def test_output_probabilities_match_a_direct_softmax(tiny):
    p = output_probabilities(tiny, [], [1] + INP, OUT)
    assert p.shape == (3,) and p.dtype == np.float64 and ((p > 0) & (p < 1)).all()
    np.testing.assert_allclose(p, direct_probs(tiny, [1] + INP + OUT, 3), rtol=1e-6)
    # the split between prefix and input does not matter, only the token sequence does
    np.testing.assert_allclose(output_probabilities(tiny, [1, 50], [51, 52], OUT), p, rtol=1e-6)
    with pytest.raises(ValueError):
        output_probabilities(tiny, [], [], OUT)
    with pytest.raises(ValueError):
        output_probabilities(tiny, [], [1], [])


def test_a_prefix_changes_the_probabilities(tiny):
    plain = output_probabilities(tiny, [], [1] + INP, OUT)
    with_prefix = output_probabilities(tiny, PREFIX, INP, OUT)
    np.testing.assert_allclose(with_prefix, direct_probs(tiny, PREFIX + INP + OUT, 3), rtol=1e-6)
    assert np.abs(with_prefix - plain).max() > 1e-6


def test_memory_path_reads_the_realizations_memory(tiny):
    mem = encode_reference_tokens(tiny, [PREFIX[1:] + [44, 45, 46, 47, 48]])
    p = output_probabilities(tiny, [], [1] + INP, OUT, memory=mem)
    seq = [1] + INP + OUT
    kv = mem.to_memory_kv(torch.tensor([[[0]]]))
    manual = direct_probs(tiny, seq, 3, memory=kv, query_chunks=torch.zeros(len(seq) - 1, dtype=torch.long))
    np.testing.assert_allclose(p, manual, rtol=1e-6)
    np.testing.assert_allclose(output_probabilities(tiny, [], [1] + INP, OUT, memory=kv), p, rtol=1e-6)
    assert np.abs(p - output_probabilities(tiny, [], [1] + INP, OUT)).max() > 1e-6
    # a text longer than one 64-token chunk still reads the memory at every position
    long_in = [1] + list(range(100, 170))
    p_long = output_probabilities(tiny, [], long_in, OUT, memory=mem)
    seq = long_in + OUT
    manual = direct_probs(tiny, seq, 3, memory=kv, query_chunks=torch.zeros(len(seq) - 1, dtype=torch.long))
    np.testing.assert_allclose(p_long, manual, rtol=1e-6)


def test_thresholds_on_hand_set_numbers():
    assert LACKS_THRESHOLD == 0.5 and HAS_THRESHOLD == 0.9
    assert lacks([0.99, 0.5]) and not lacks([0.99, 0.5000001]) and lacks([0.1])
    assert produces([0.9, 0.95]) and not produces([0.95, 0.8999999]) and not produces([0.2])
    v = knowledge_verdicts([0.3, 0.99], [0.95, 0.91], [0.92, 0.5])
    assert v == {"lacks": True, "separable_by_prefix": True, "separable_by_memory": False, "separable": True}
    v = knowledge_verdicts([0.6, 0.99], [0.95, 0.91], [0.95, 0.95])  # already known: nothing to separate
    assert v == {"lacks": False, "separable_by_prefix": True, "separable_by_memory": True, "separable": False}
    v = knowledge_verdicts([0.01], [0.89])
    assert v == {"lacks": True, "separable_by_prefix": False, "separable_by_memory": None, "separable": False}
    good = np.array([[0.95, 0.92], [0.9, 0.99]])
    assert imitability_verdict(good, [0.1, 0.2]) == {"lacks": True, "every_prefix_supplies": True, "imitable": True}
    one_bad = good.copy()
    one_bad[1, 0] = 0.7  # realization 1 does not supply probe 0
    assert imitability_verdict(one_bad, [0.1, 0.2])["imitable"] is False
    assert imitability_verdict(good, [0.1, 0.6]) == {"lacks": False, "every_prefix_supplies": True, "imitable": False}


def test_knowledge_report_on_tiny(tiny, tok):
    r = knowledge_report(tiny, tok, "The capital of France is Paris.", "The capital of France is", " Paris")
    bos = tok.bos_id
    inp, out = tok.encode("The capital of France is"), tok.encode(" Paris")
    assert r["input_ids"] == inp and r["output_ids"] == out
    assert r["prefix_ids"] == [bos] + tok.encode("The capital of France is Paris.\n")
    np.testing.assert_allclose(r["plain"]["probs"], direct_probs(tiny, [bos] + inp + out, len(out)), rtol=1e-6)
    np.testing.assert_allclose(r["prefix"]["probs"], direct_probs(tiny, r["prefix_ids"] + inp + out, len(out)),
                               rtol=1e-6)
    mem = encode_reference_tokens(tiny, [tok.encode_reference("The capital of France is Paris.")])
    np.testing.assert_allclose(r["memory"]["probs"], output_probabilities(tiny, [], [bos] + inp, out, memory=mem))
    for cond in ("plain", "prefix", "memory"):
        p = r[cond]["probs"]
        assert r[cond]["min"] == p.min() and r[cond]["mean"] == pytest.approx(p.mean())
        assert r[cond]["sequence"] == pytest.approx(np.prod(p))
    # a random 512-way model knows nothing and learns nothing from one example
    assert r["lacks"] and not r["separable_by_prefix"] and not r["separable_by_memory"] and not r["separable"]
    assert "memory" not in knowledge_report(tiny, tok, "Paris.", "France is", " Paris", use_memory=False)


def test_imitability_via_memory_on_tiny(tiny, tok):
    reals = ["The capital of France is Paris.", "Paris is the capital of France."]
    probes = [("The capital of France is", " Paris"), ("The capital of", " France")]
    r = imitability(tiny, tok, reals, probes, via="memory")
    assert r["min_probs"].shape == (2, 2) and r["sequence_probs"].shape == (2, 2)
    mem = encode_reference_tokens(tiny, [tok.encode_reference(reals[1])])
    p = output_probabilities(tiny, [], [tok.bos_id] + tok.encode(probes[0][0]), tok.encode(probes[0][1]), memory=mem)
    assert r["min_probs"][1, 0] == pytest.approx(p.min())
    assert r["lacks"] and not r["imitable"]


def test_memory_is_written_in_the_models_format_unless_another_is_named(tok):
    """A model trained with "first" (3 tokens per head) reads its realizations in that format; memory_selector
    names another one on purpose."""
    model = tiny_model(0, memory_selector="first", memory_tokens_per_head=3)
    real, (inp, out) = "The capital of France is Paris.", ("The capital of France is", " Paris")
    ids = [tok.bos_id] + tok.encode(inp)
    p = {s: output_probabilities(model, [], ids, tok.encode(out), memory=encode_reference_tokens(
        model, [tok.encode_reference(real)], selector=s)) for s in ("first", "attention")}
    assert not np.allclose(p["first"], p["attention"])  # the two formats give different memories here
    np.testing.assert_allclose(knowledge_report(model, tok, real, inp, out)["memory"]["probs"], p["first"])
    np.testing.assert_allclose(knowledge_report(model, tok, real, inp, out, memory_selector="attention")["memory"]
                               ["probs"], p["attention"])
    r = imitability(model, tok, [real], [(inp, out)], via="memory")
    assert r["min_probs"][0, 0] == pytest.approx(p["first"].min())


# ----------------------------------------------------------------------------------------------- a copy model
class WordTokenizer:
    """One id per whitespace-separated word, so probe tokens line up with realization tokens."""
    bos_id = 1

    def __init__(self):
        self.vocab = {}

    def encode(self, text):
        return [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]


class CopyModel(torch.nn.Module):
    """An ideal induction head and nothing else: after token x it predicts, with probability ~1, the token that
    followed the last earlier x; with no earlier x it is uniform. It lacks every fact and imitates any."""
    cfg = SimpleNamespace(memory_layers=(), vocab_size=64)

    def forward(self, idx, **kw):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.cfg.vocab_size)
        for b in range(B):
            row = idx[b].tolist()
            for t in range(T):
                earlier = [k for k in range(t) if row[k] == row[t]]
                if earlier:
                    logits[b, t, row[earlier[-1] + 1]] = 20.0
        return ModelOutput(logits=logits)


def test_copy_model_lacks_the_fact_but_a_realization_supplies_it():
    m, wt = CopyModel(), WordTokenizer()
    r = knowledge_report(m, wt, "the capital of france is paris", "the capital of france is", "paris")
    assert r["plain"]["min"] == pytest.approx(1 / 64)
    assert r["prefix"]["min"] > 0.99 and "memory" not in r
    assert r["lacks"] and r["separable_by_prefix"] and r["separable"] and r["separable_by_memory"] is None
    # two-token answer: the sequence probability is the product
    r2 = knowledge_report(m, wt, "france 's capital is paris city", "france 's capital is", "paris city")
    assert len(r2["output_ids"]) == 2 and r2["prefix"]["sequence"] == pytest.approx(np.prod(r2["prefix"]["probs"]))
    with pytest.raises(ValueError, match="no memory layers"):
        knowledge_report(m, wt, "a b", "a", "b", use_memory=True)


def test_copy_model_imitates_realizations_of_one_fact_only():
    m, wt = CopyModel(), WordTokenizer()
    reals = ["the capital of france is paris", "everyone knows france is paris"]
    probes = [("the capital of france is", "paris"), ("we say france is", "paris")]
    r = imitability(m, wt, reals, probes)
    assert (r["min_probs"] > 0.99).all() and (r["plain_min"] < 0.5).all() and r["imitable"]
    # a realization of another fact ("is" -> "rome") cannot serve as t* for the Paris probes
    r = imitability(m, wt, reals + ["the capital of italy is rome"], probes)
    assert (r["min_probs"][2] < 0.01).all() and not r["imitable"] and r["lacks"]
    with pytest.raises(ValueError, match="no memory layers"):
        imitability(m, wt, reals, probes, via="memory")


# ----------------------------------------------------------------------------------------------- Def 4
def test_kind_verdict_on_hand_set_numbers():
    assert FOLLOW_THRESHOLD == 0.5 and STAY_THRESHOLD == 0.5
    assert kind_verdict(0.99, 0.98, 0.0) == "specific"
    assert kind_verdict(0.99, 0.0, 0.97) == "abstract"
    assert kind_verdict(0.99, 0.3, 0.3) == "neither"      # the swap leaves the model undecided
    assert kind_verdict(0.5, 0.99, 0.0) == "neither"      # Def 6 (i): it lacks the behaviour to begin with
    assert kind_verdict(0.51, 0.49, 0.5) == "abstract" and kind_verdict(0.51, 0.5, 0.49) == "specific"


def test_knowledge_kind_on_the_ideal_copy_model_with_text_probes():
    m, wt = CopyModel(), WordTokenizer()
    probe = ("the capital of france is paris . the capital of france is", "paris")
    r = knowledge_kind(m, wt, [probe], substitutes=["rome", "paris", "oslo"], n_substitutes=5)
    assert r["verdict"] == "abstract" and r["counts"] == {"specific": 0, "abstract": 1, "neither": 0}
    assert r["original"] > 0.99 and r["follow"] > 0.99 and r["stay"] < 0.01  # "paris" itself is never swapped in
    assert r["thresholds"] == {"lacks": 0.5, "follow": 0.5, "stay": 0.5}
    with pytest.raises(ValueError, match="probe 0: the output does not occur"):
        knowledge_kind(m, wt, [("the capital of france is", "paris")], substitutes=["rome"])
    with pytest.raises(ValueError, match="probe 0: no substitute"):
        knowledge_kind(m, wt, [probe])  # the only other answer would be its own
    with pytest.raises(ValueError, match="probe 0: with a tokenizer, input and output must be strings"):
        knowledge_kind(m, wt, [([1, 2, 1], [2])], substitutes=[[3]])
    with pytest.raises(ValueError, match="probes is empty"):
        knowledge_kind(m, wt, [])


V, A, B = 64, range(4, 34), range(34, 64)  # bigram inputs A, outputs B (disjoint, so the table is a function)


def _tiny_trained(batches, steps: int) -> Memory3:
    """A 2-layer, 2-head, d=32 model trained with AdamW (lr 3e-3, batch 32) on ``batches()`` -> (ids, targets)."""
    torch.manual_seed(0)
    m = Memory3(Memory3Config(vocab_size=V, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16, d_model=32,
                              mlp_width=64, max_seq_len=64))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        x, y = batches()
        loss = m(x, targets=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def bigram_table():
    g = torch.Generator().manual_seed(0)
    return dict(zip(A, (B[int(i)] for i in torch.randperm(len(B), generator=g))))


@pytest.fixture(scope="module")
def bigram_model(bigram_table):
    """Trained on "<s> a1 f(a1) a2 f(a2) …" with random a's: the output f(a) is fixed by the input a."""
    g, lut = torch.Generator().manual_seed(1), torch.zeros(V, dtype=torch.long)
    lut[list(A)] = torch.tensor([bigram_table[a] for a in A])

    def batches(n=32, pairs=12):
        a = torch.randint(A.start, A.stop, (n, pairs), generator=g)
        seq = torch.cat([torch.ones(n, 1, dtype=torch.long), torch.stack([a, lut[a]], -1).view(n, -1)], 1)
        return seq[:, :-1], seq[:, 1:]
    return _tiny_trained(batches, 150)


@pytest.fixture(scope="module")
def copy_model():
    """Trained on "<s> s s" with s 10 random tokens, loss on the repeat: the output is copied from the context."""
    g = torch.Generator().manual_seed(2)

    def batches(n=32, length=10):
        s = torch.randint(4, V, (n, length), generator=g)
        seq = torch.cat([torch.ones(n, 1, dtype=torch.long), s, s], 1)
        y = seq[:, 1:].clone()
        y[:, :length] = -100
        return seq[:, :-1], y
    return _tiny_trained(batches, 200)


def _bigram_probes(table, n=8, seed=3):
    """"<s> a1 f(a1) … a5 f(a5) a1" -> f(a1): the context holds the answer, as Def 4's swap needs."""
    rng, probes = np.random.default_rng(seed), []
    for _ in range(n):
        a = [int(x) for x in rng.choice(A, 5, replace=False)]
        probes.append(([1] + [t for x in a for t in (x, table[x])] + [a[0]], [table[a[0]]]))
    return probes


def _copy_probes(n=8, seed=4):
    """"<s> s1 … s10 s1 s2 s3 s4" -> s5 with random s: only the context can tell the answer."""
    rng, probes = np.random.default_rng(seed), []
    for _ in range(n):
        s = [int(x) for x in rng.choice(range(4, V), 10, replace=False)]
        probes.append(([1] + s + s[:4], [s[4]]))
    return probes


def test_def4_calls_a_bigram_table_specific_and_a_copy_skill_abstract(bigram_model, copy_model, bigram_table):
    bigram, copy = _bigram_probes(bigram_table), _copy_probes()
    # the bigram model keeps f(a) when the context says a -> b' (measured: P(b) 0.98 before and after, P(b') 0.00)
    r = knowledge_kind(bigram_model, None, bigram)
    assert r["verdict"] == "specific" and r["counts"]["specific"] == len(bigram), r
    assert r["original"] > 0.9 and r["stay"] > 0.9 and r["follow"] < 0.1
    # the copy model moves to b' (measured: P(b) 0.97 -> 0.00, P(b') 0.97)
    r = knowledge_kind(copy_model, None, copy)
    assert r["verdict"] == "abstract" and r["counts"]["abstract"] == len(copy), r
    assert r["original"] > 0.9 and r["stay"] < 0.1 and r["follow"] > 0.9
    # converse probes: the copy model copies the bigram's answer too (abstract), the bigram model never had the
    # copy skill (measured P(b) 0.008: neither)
    r = knowledge_kind(copy_model, None, bigram)
    assert r["verdict"] == "abstract" and r["follow"] > 0.9, r
    r = knowledge_kind(bigram_model, None, copy)
    assert r["verdict"] == "neither" and r["original"] < 0.1 and r["counts"]["neither"] == len(copy), r


# ----------------------------------------------------------------------------------------------- Def 4 via memory
class MemoryCopyModel(torch.nn.Module):
    """An ideal memory reader: after token x it predicts, with probability ~1, the token that followed x in the
    memory it reads (the memory's keys carry the realization's ids, see `ids_as_memory`); with no x there it is
    uniform. ``blind=True``: it ignores the memory and answers from a fixed table (a specific knowledge)."""
    cfg = SimpleNamespace(memory_layers=(0,), vocab_size=64)

    def __init__(self, table=None):
        super().__init__()
        self.table = table  # {input id: output id}, or None to read the memory

    def forward(self, idx, memory=None, query_chunks=None, **kw):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.cfg.vocab_size)
        mem = [] if memory is None else memory.keys[0, 0, 0, 0, :, 0].long().tolist()
        for b in range(B):
            for t, x in enumerate(idx[b].tolist()):
                if self.table is not None:
                    if x in self.table:
                        logits[b, t, self.table[x]] = 20.0
                elif x in mem[:-1]:
                    logits[b, t, mem[mem.index(x) + 1]] = 20.0
        return ModelOutput(logits=logits)


def ids_as_memory(model, ref_ids, selector=None):
    """A stand-in for the realization's explicit memory: one memory whose keys are its token ids."""
    n = len(ref_ids)
    ids = torch.tensor(ref_ids, dtype=torch.float32).view(1, 1, 1, n, 1)
    return ExplicitMemory(ids, ids.clone(), torch.arange(n).view(1, 1, 1, n), torch.ones(1, 1, 1, n, dtype=torch.bool),
                          torch.tensor([-1]))


def test_def4_via_memory_tells_a_memory_reader_from_a_fixed_table(monkeypatch):
    import mini_m3.theory.knowledge as knowledge
    monkeypatch.setattr(knowledge, "_realization_memory", ids_as_memory)
    wt = WordTokenizer()
    probes = [("the capital of france is paris", "the capital of france is", "paris"),
              ("the capital of italy is rome", "the capital of italy is", "rome")]
    subs = ["oslo", "lima", "rome", "paris"]
    reader = knowledge_kind(MemoryCopyModel(), wt, probes, substitutes=subs, n_substitutes=2, via="memory")
    assert reader["via"] == "memory" and reader["verdict"] == "abstract" and reader["counts"]["abstract"] == 2
    assert reader["original"] > 0.99 and reader["follow"] > 0.99 and reader["stay"] < 0.01
    # the same realizations put in the context instead: the reader does not copy from context, so it lacks them
    ctx = knowledge_kind(MemoryCopyModel(), wt, [(f"{r} . {i}", o) for r, i, o in probes], substitutes=subs)
    assert ctx["via"] == "context" and ctx["original"] < 0.1 and ctx["verdict"] == "neither"
    # a model that answers "is" -> "paris" from its weights keeps "paris" whatever the memory says
    fixed = MemoryCopyModel({wt.encode("is")[0]: wt.encode("paris")[0]})
    r = knowledge_kind(fixed, wt, probes[:1], substitutes=subs, via="memory")
    assert r["verdict"] == "specific" and r["stay"] > 0.99 and r["follow"] < 0.01
    # ids work too (tokenizer None): the realization's ids are the memory, the input is used as given
    real, inp, out = [wt.encode(x) for x in probes[0]]
    r = knowledge_kind(MemoryCopyModel(), None, [(real, [1] + inp, out)], substitutes=[wt.encode("oslo")], via="memory")
    assert r["verdict"] == "abstract" and r["follow"] > 0.99
    with pytest.raises(ValueError, match="the output does not occur in the realization"):
        knowledge_kind(MemoryCopyModel(), wt, [("the capital is rome", "the capital is", "paris")], substitutes=subs,
                       via="memory")
    with pytest.raises(ValueError, match=r"probe 0: via='memory' takes \(realization, input, output\)"):
        knowledge_kind(MemoryCopyModel(), wt, [(r, o) for r, _, o in probes], via="memory")
    with pytest.raises(ValueError, match="pass memory=None"):
        knowledge_kind(MemoryCopyModel(), wt, probes, via="memory", memory=ids_as_memory(None, [1, 2]))
    with pytest.raises(ValueError, match="via must be"):
        knowledge_kind(MemoryCopyModel(), wt, probes, via="prefix")
    with pytest.raises(ValueError, match="no memory layers"):
        knowledge_kind(CopyModel(), wt, probes, via="memory")


def test_def4_via_memory_encodes_the_swapped_realization_on_tiny(tiny, tok):
    real, inp, out, sub = "The capital of France is Paris.", "The capital of France is", " Paris", " Rome"
    r = knowledge_kind(tiny, tok, [(real, inp, out)], substitutes=[sub], via="memory")
    ids_in = [tok.bos_id] + tok.encode(inp)
    mem = encode_reference_tokens(tiny, [tok.encode_reference(real)])
    swapped = encode_reference_tokens(tiny, [tok.encode_reference(real.replace(out, sub))])
    assert r["original"] == pytest.approx(output_probabilities(tiny, [], ids_in, tok.encode(out), memory=mem).min())
    assert r["stay"] == pytest.approx(output_probabilities(tiny, [], ids_in, tok.encode(out), memory=swapped).min())
    assert r["follow"] == pytest.approx(output_probabilities(tiny, [], ids_in, tok.encode(sub), memory=swapped).min())
    assert r["stay"] != pytest.approx(output_probabilities(tiny, [], ids_in, tok.encode(out), memory=mem).min())
