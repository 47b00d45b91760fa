"""§7 Table 21 protocol on a shared machine: `compare_decode_throughput` interleaves the modes round by round.

No timed assertions: the real run checks the structure and counts, a scripted `decode_throughput` checks the
rotation, that the warm-up is not counted, and that ratios are taken within each round.
"""
import numpy as np
import pytest

import mini_m3.evaluate as ev
from conftest import tiny_model
from mini_m3.evaluate import compare_decode_throughput, decode_throughput
from mini_m3.memory.bank import MemoryBank

MODES = ("memory", "none", "rag")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok, refs):
    model = tiny_model(0, memories_per_chunk=2)  # RAG: 2 references + the prompt fit max_seq_len 256
    bank = MemoryBank.build(tmp_path_factory.mktemp("bank") / "b", model, tok, refs[:30], progress=False)
    prompts = [" ".join(refs[i:i + 3]) for i in range(0, 30, 3)]
    return model, tok, bank, prompts


def test_compare_on_a_tiny_model_returns_medians_spread_and_per_round_ratios(setup):
    model, tok, bank, prompts = setup
    r = compare_decode_throughput(model, tok, prompts, MODES, bank, rounds=3, batch_size=2, prompt_tokens=24,
                                  new_tokens=3)
    assert set(r["tokens_per_s"]) == set(r["spread"]) == set(r["tokens_per_s_rounds"]) == set(MODES)
    assert r["rounds"] == 3 and r["warmup_rounds"] == 1 and len(r["order"]) == 3
    assert r["method"].startswith("median of 3 interleaved rounds")
    for m in MODES:
        xs = r["tokens_per_s_rounds"][m]
        assert len(xs) == 3 and min(xs) > 0
        s = r["spread"][m]
        assert r["tokens_per_s"][m] == s["median"] == float(np.median(xs))
        assert s["min"] == min(xs) <= s["q1"] <= s["median"] <= s["q3"] <= s["max"] == max(xs)
    assert set(r["ratios"]) == {"memory_over_none", "memory_over_rag"}
    for key, den in (("memory_over_none", "none"), ("memory_over_rag", "rag")):
        want = [a / b for a, b in zip(r["tokens_per_s_rounds"]["memory"], r["tokens_per_s_rounds"][den])]
        assert r["ratios"][key]["rounds"] == pytest.approx(want)
        assert r["ratios"][key]["median"] == pytest.approx(float(np.median(want)))


# tokens/s each mode reports in each counted round: the median of the per-round ratios (memory / none: 2, 0.25,
# 1.5, 2 -> 1.75) differs from the ratio of the medians (100 / 50 = 2)
SCRIPT = [{"memory": 100.0, "none": 50.0, "rag": 50.0},
          {"memory": 10.0, "none": 40.0, "rag": 10.0},
          {"memory": 300.0, "none": 200.0, "rag": 100.0},
          {"memory": 100.0, "none": 50.0, "rag": 50.0}]


@pytest.fixture
def scripted(monkeypatch):
    """`decode_throughput` replaced by a call log: the warm-up round reports 1e9 tokens/s, round r reports SCRIPT[r]."""
    calls = []

    def fake(model, tokenizer, prompts, *, mode, bank=None, **kw):
        rnd = len(calls) // len(MODES) - 1
        calls.append((mode, bank, kw))
        return {"tokens_per_s": 1e9 if rnd < 0 else SCRIPT[rnd][mode]}
    monkeypatch.setattr(ev, "decode_throughput", fake)
    return calls


def test_rounds_interleave_with_the_order_rotated_and_the_warmup_not_counted(scripted):
    bank = object()
    r = compare_decode_throughput(None, None, ["p"], MODES, bank, rounds=4, batch_size=3, new_tokens=5)
    rotations = [["memory", "none", "rag"], ["none", "rag", "memory"], ["rag", "memory", "none"]]
    assert [m for m, _, _ in scripted] == ["memory", "none", "rag"] + sum(rotations + rotations[:1], [])
    assert r["order"] == rotations + rotations[:1]
    assert all(b is (None if m == "none" else bank) for m, b, _ in scripted)  # "none" reads no bank
    assert all(kw == {"batch_size": 3, "prompt_tokens": 128, "new_tokens": 5, "memories_per_chunk": None}
               for _, _, kw in scripted)
    assert r["tokens_per_s_rounds"]["memory"] == [100.0, 10.0, 300.0, 100.0]  # the warm-up's 1e9 is not there
    assert r["tokens_per_s"] == {"memory": 100.0, "none": 50.0, "rag": 50.0}
    assert r["spread"]["none"]["min"] == 40.0 and r["spread"]["none"]["max"] == 200.0
    assert r["ratios"]["memory_over_none"]["rounds"] == [2.0, 0.25, 1.5, 2.0]
    assert r["ratios"]["memory_over_none"]["median"] == 1.75  # not 100 / 50
    assert r["ratios"]["memory_over_rag"]["median"] == 2.0


def test_labelled_modes_read_their_own_banks_and_name_their_ratios(scripted):
    a, b = object(), object()
    runs = {"memory": ("memory", a), "none": ("none", None), "rag@b": ("rag", b)}
    r = compare_decode_throughput(None, None, ["p"], runs, rounds=1, ratios=[("memory", "rag@b")])
    assert [(m, bk) for m, bk, _ in scripted] == [("memory", a), ("none", None), ("rag", b)] * 2
    assert set(r["ratios"]) == {"memory_over_rag@b"} and r["modes"]["rag@b"] == "rag"


@pytest.mark.parametrize("modes, bank, kw, message", [
    (("memory", "fast"), "bank", {}, "unknown decoding mode 'fast'"),
    (MODES, "bank", {"rounds": 0}, "rounds must be an integer >= 1"),
    (MODES, "bank", {"rounds": 2.5}, "rounds must be an integer >= 1"),
    (MODES, None, {}, "mode 'memory' reads a memory bank"),
    ({"m": ("rag", None)}, None, {}, "mode 'm' reads a memory bank"),
    ({"m": "memory"}, "bank", {}, r"modes\['m'\] must be a \(mode, bank\) pair"),
    (("memory", "memory"), "bank", {}, "modes must not repeat"),
    ((), "bank", {}, "modes is empty"),
    ("memory", "bank", {}, "modes must be a list of mode names"),
    (("memory", "none"), "bank", {"ratios": [("memory", "rag")]}, "ratios must be"),
    (MODES, "bank", {"new_tokens": 0}, "new_tokens must be >= 1"),
    (MODES, "bank", {"memories_per_chunk": 0}, "memories_per_chunk must be an integer >= 1"),
    (MODES, "bank", {"memories_per_chunk": True}, "memories_per_chunk must be an integer >= 1"),
])
def test_bad_input_is_a_clear_error_before_anything_runs(scripted, modes, bank, kw, message):
    with pytest.raises(ValueError, match=message):
        compare_decode_throughput(None, None, ["p"], modes, bank, **kw)
    assert scripted == []


def test_decode_throughput_rejects_an_empty_batch(setup):
    model, tok, _, prompts = setup
    for kw in ({"batch_size": 0}, {"repeats": 0}):  # batch 0 used to decode every prompt it was given
        with pytest.raises(ValueError, match="batch_size and repeats must be >= 1"):
            decode_throughput(model, tok, prompts, mode="none", prompt_tokens=24, new_tokens=2, **kw)


def test_memories_per_chunk_reaches_every_mode_and_is_recorded(setup):
    """The model reads 2 memories per chunk (its config); a call may read another number, and the result says which."""
    model, tok, bank, prompts = setup
    kw = dict(prompt_tokens=24, new_tokens=2)
    assert decode_throughput(model, tok, prompts, mode="memory", bank=bank, **kw)["memories_per_chunk"] == 2
    one = decode_throughput(model, tok, prompts, mode="memory", bank=bank, memories_per_chunk=1, **kw)
    assert one["memories_per_chunk"] == 1 and one["generated_tokens"] == 2
    r = compare_decode_throughput(model, tok, prompts, MODES, bank, rounds=1, memories_per_chunk=1, **kw)
    assert r["memories_per_chunk"] == 1
    assert compare_decode_throughput(model, tok, prompts, ("none",), rounds=1, **kw)["memories_per_chunk"] == 2
    with pytest.raises(ValueError, match="memories_per_chunk must be an integer >= 1"):
        decode_throughput(model, tok, prompts, mode="memory", bank=bank, memories_per_chunk=0, **kw)
