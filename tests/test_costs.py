"""Tests for mini_m3.theory.costs (Appendix A / §1.4 cost model and §3.3 storage).

Expected values are written out again from the spec, term by term, in plain arithmetic at the
paper-2.4b shape; they never call the module's helpers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mini_m3.config import Memory3Config
from mini_m3.theory import costs
from mini_m3.theory.costs import (
    PAPER_KNOWLEDGE_BASE_REFERENCES,
    advantage_interval,
    cheapest_format,
    explicit_read_cost,
    explicit_write_cost,
    external_read_cost,
    format_bytes,
    implicit_write_cost,
    memory_bank_bytes,
    memory_format_costs,
    total_cost,
)

# paper-2.4b shape, written out by hand (spec §1.4 table)
L, H, H_KV, D_H, D, W, N_VOCAB = 44, 40, 8, 80, 3200, 3200, 60416
L_MEM, L_REF, L_MEM_TOK, L_CHUNK, L_TRAIN = 22, 128, 8, 64, 2048

# implicit write: 3·2·[ L( l_ref(2d² + 2·d·d_h·H_kv + 3dW) + 2·l_ref·(l_train/2)·d ) + l_ref·n_vocab·d ]
QO = 2 * D * D
KV = 2 * D * D_H * H_KV
MLP = 3 * D * W
IMP_WRITE = 3 * 2 * (L * (L_REF * (QO + KV + MLP) + 2 * L_REF * (L_TRAIN // 2) * D) + L_REF * N_VOCAB * D)
# explicit write: 2·[ L_mem( l_ref(2d² + 2·d·d_h·H_kv) + 2·(l_ref²/2)·d ) + (L_mem−1)(l_ref·3dW) + L_mem(l_ref²·d) ]
EXP_WRITE = 2 * (L_MEM * (L_REF * (QO + KV) + 2 * (L_REF * L_REF // 2) * D)
                 + (L_MEM - 1) * (L_REF * MLP)
                 + L_MEM * (L_REF * L_REF * D))
# explicit read: 2·L_mem · 2·l_chunk·l_mem·d
EXP_READ = 2 * L_MEM * 2 * L_CHUNK * L_MEM_TOK * D
# external read: 2·[ L( l_ref(2d² + 2·d·d_h·H_kv) + 2·l_ref(l_ref/2 + l_chunk)·d ) + (L−1)(l_ref·3dW) ]
EXT_READ = 2 * (L * (L_REF * (QO + KV) + 2 * L_REF * (L_REF // 2 + L_CHUNK) * D) + (L - 1) * (L_REF * MLP))
N_MINUS = EXP_WRITE / (EXT_READ - EXP_READ)
N_PLUS = (IMP_WRITE - EXP_WRITE) / EXP_READ


@pytest.fixture
def paper() -> Memory3Config:
    return Memory3Config.from_name("paper-2.4b")


def test_paper_shape_is_what_the_hand_constants_assume(paper):
    assert (paper.n_layers, paper.n_heads, paper.n_kv_heads, paper.head_dim) == (L, H, H_KV, D_H)
    assert (paper.d_model, paper.mlp_width, paper.vocab_size) == (D, W, N_VOCAB)
    assert paper.memory_layers == tuple(range(L_MEM)) and len(paper.memory_heads) == H_KV
    assert (paper.reference_length, paper.memory_tokens_per_head, paper.chunk_length) == (L_REF, L_MEM_TOK, L_CHUNK)


def test_hand_constants_sanity():
    # exact integers, so the float comparisons below are meaningful; rough magnitudes in TFLOPs
    assert IMP_WRITE == 2_238_500_044_800
    assert 0.3 < EXP_WRITE / 1e12 < 0.31 and 0.6 < EXT_READ / 1e12 < 0.63 and EXP_READ == 144_179_200


def test_individual_formulas_match_term_by_term(paper):
    assert implicit_write_cost(paper, 2048) == IMP_WRITE
    assert explicit_write_cost(paper) == EXP_WRITE
    assert explicit_read_cost(paper) == EXP_READ
    assert external_read_cost(paper) == EXT_READ


def test_memory_format_costs_dict(paper):
    c = memory_format_costs(paper, train_length=2048)
    assert set(c) == {"implicit", "explicit", "external"}
    assert all(set(v) == {"write", "read"} for v in c.values())
    assert c["implicit"] == {"write": IMP_WRITE, "read": 0.0}
    assert c["explicit"] == {"write": EXP_WRITE, "read": EXP_READ}
    assert c["external"] == {"write": 0.0, "read": EXT_READ}
    assert all(isinstance(x, float) for v in c.values() for x in v.values())


def test_train_length_enters_only_the_attention_term(paper):
    # doubling l_train adds 3·2·L·2·l_ref·(Δl_train/2)·d
    delta = 3 * 2 * L * 2 * L_REF * (2048 // 2) * D
    assert implicit_write_cost(paper, 4096) == IMP_WRITE + delta
    assert memory_format_costs(paper, train_length=4096)["implicit"]["write"] == IMP_WRITE + delta


def test_total_cost_scalar_and_array(paper):
    assert total_cost(paper, 10, "implicit") == IMP_WRITE
    assert total_cost(paper, 10, "explicit") == EXP_WRITE + 10 * EXP_READ
    assert total_cost(paper, 10, "external") == 10 * EXT_READ
    n = np.array([[0.0, 1.0], [100.0, 1e5]])
    for fmt, (w, r) in {"implicit": (IMP_WRITE, 0), "explicit": (EXP_WRITE, EXP_READ),
                        "external": (0, EXT_READ)}.items():
        out = total_cost(paper, n, fmt)
        assert isinstance(out, np.ndarray) and out.shape == n.shape
        np.testing.assert_allclose(out, w + n * r, rtol=1e-15)
    assert isinstance(total_cost(paper, 3, "explicit"), float)


def test_advantage_interval_values(paper):
    n_minus, n_plus = advantage_interval(paper)
    assert n_minus == pytest.approx(N_MINUS, rel=1e-12)
    assert n_plus == pytest.approx(N_PLUS, rel=1e-12)
    # RAG loses after about half a use; parameters win only after about ten thousand uses
    assert 0.4 < n_minus < 0.6 and 1e4 < n_plus < 2e4


def _argmin_format(cfg, n):
    values = {f: total_cost(cfg, n, f) for f in ("external", "explicit", "implicit")}
    return min(values, key=values.get), values


@pytest.mark.parametrize("name", ["paper-2.4b", "paper-0.92b", "small", "tiny"])
def test_advantage_interval_brackets_the_cheapest_format(name):
    cfg = Memory3Config.from_name(name)
    n_minus, n_plus = advantage_interval(cfg)
    checks = {n_minus / 2: "external", math.sqrt(n_minus * n_plus): "explicit", 2 * n_plus: "implicit"}
    for n, expected in checks.items():
        best, values = _argmin_format(cfg, n)
        assert best == expected, (name, n, values)
        # strictly cheapest, not a tie
        assert sorted(values.values())[0] < sorted(values.values())[1]
        assert cheapest_format(cfg, n) == expected
    # at the endpoints the two neighbouring formats cost the same
    assert total_cost(cfg, n_minus, "explicit") == pytest.approx(total_cost(cfg, n_minus, "external"), rel=1e-12)
    assert total_cost(cfg, n_plus, "explicit") == pytest.approx(total_cost(cfg, n_plus, "implicit"), rel=1e-12)


def test_cheapest_format_array_and_ties(paper):
    out = cheapest_format(paper, np.array([0.0, 0.1, 1.0, 1e3, 1e5]))
    assert list(out) == ["external", "external", "explicit", "explicit", "implicit"]
    assert cheapest_format(paper, 0) == "external"  # tie at n = 0 goes to the cheapest write


def test_middle_layer_generalisation(paper):
    # memory layers 11..32 (22 layers, deepest = 32): encoding runs 33 layers, sparsify/read over 22
    mid = paper.replace(memory_layers=tuple(range(11, 33)))
    depth, n_mem = 33, 22
    expected_write = 2 * (depth * (L_REF * (QO + KV) + 2 * (L_REF * L_REF // 2) * D)
                          + (depth - 1) * (L_REF * MLP)
                          + n_mem * (L_REF * L_REF * D))
    assert explicit_write_cost(mid) == expected_write
    assert explicit_write_cost(mid) > EXP_WRITE
    assert explicit_read_cost(mid) == EXP_READ  # same number of memory layers
    # sparse layers: a single memory layer at index 21 still needs 22 encoding layers
    one = paper.replace(memory_layers=(21,))
    expected_one = 2 * (22 * (L_REF * (QO + KV) + 2 * (L_REF * L_REF // 2) * D)
                        + 21 * (L_REF * MLP) + 1 * (L_REF * L_REF * D))
    assert explicit_write_cost(one) == expected_one
    assert explicit_read_cost(one) == 2 * 1 * 2 * L_CHUNK * L_MEM_TOK * D
    # the interval moves accordingly: dearer write → later n-, earlier n+
    n_minus_mid, n_plus_mid = advantage_interval(mid)
    assert n_minus_mid > N_MINUS and n_plus_mid < N_PLUS


def test_storage_at_paper_shape(paper):
    b = memory_bank_bytes(paper, PAPER_KNOWLEDGE_BASE_REFERENCES)
    per = b["per_reference"]
    assert per["dense"] == 44 * 2 * 40 * 128 * 80 * 2
    assert per["dense_gqa"] == 44 * 2 * 8 * 128 * 80 * 2
    assert per["sparse"] == 22 * 2 * 8 * 8 * 80 * 2 == 450_560
    assert per["vq"] == 22 * 2 * 8 * 8 * 14 == 39_424
    assert b["sparsity_factor"] == 2 * 5 * 16 == 160
    assert b["compression_rate"] == pytest.approx(160 / 14) and round(b["compression_rate"], 2) == 11.43
    assert b["overall_reduction"] == pytest.approx(160 * 160 / 14)
    for k in ("dense", "dense_gqa", "sparse", "vq"):
        assert b["total"][k] == pytest.approx(per[k] * 1.1e8, rel=1e-15)
    assert PAPER_KNOWLEDGE_BASE_REFERENCES == 1.1e8
    # the vq default is the paper's 14 bytes at head_dim 80
    assert b["vq_code_bytes"] == 14


def test_storage_options(paper):
    gqa = memory_bank_bytes(paper, 1, dense_as_paper=False)
    assert gqa["per_reference"]["dense"] == 44 * 2 * 8 * 128 * 80 * 2
    assert gqa["sparsity_factor"] == 2 * 1 * 16
    fp32 = memory_bank_bytes(paper, 10, dtype_bytes=4, vq_code_bytes=20)
    assert fp32["per_reference"]["sparse"] == 22 * 2 * 8 * 8 * 80 * 4
    assert fp32["per_reference"]["vq"] == 22 * 2 * 8 * 8 * 20
    assert fp32["total"]["vq"] == 10 * 22 * 2 * 8 * 8 * 20
    # fewer memory heads shrink sparse and vq, not dense
    two_heads = memory_bank_bytes(paper.replace(memory_heads=(0, 5)), 1)
    assert two_heads["per_reference"]["sparse"] == 22 * 2 * 2 * 8 * 80 * 2
    assert two_heads["per_reference"]["dense"] == 44 * 2 * 40 * 128 * 80 * 2
    # scaled vq default at other head dims: ceil(1.4 bits/dim) in bytes
    assert memory_bank_bytes(Memory3Config.from_name("paper-0.92b"), 1)["vq_code_bytes"] == 12  # ceil(11.2)
    tiny = memory_bank_bytes(Memory3Config.from_name("tiny"), 1)
    assert tiny["vq_code_bytes"] == 3  # ceil(2.8)
    # tiny: L=4, H=4, H_kv=2, d_h=16, memory layers 0..1, l_ref=128, l_mem=8
    assert tiny["per_reference"]["sparse"] == 2 * 2 * 2 * 8 * 16 * 2
    assert tiny["per_reference"]["vq"] == 2 * 2 * 2 * 8 * 3
    assert tiny["per_reference"]["dense"] == 4 * 2 * 4 * 128 * 16 * 2
    assert tiny["compression_rate"] == pytest.approx(16 * 2 / 3)


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1024) == "1.00 KiB"
    assert format_bytes(1.5 * 2**40) == "1.50 TiB"
    assert format_bytes(2**50) == "1.00 PiB"
    assert format_bytes(1.5e12, binary=False) == "1.50 TB"
    assert format_bytes(450_560) == "440.00 KiB"
    with pytest.raises(ValueError):
        format_bytes(-1)


def test_validation_errors(paper):
    with pytest.raises(ValueError, match="unknown memory format"):
        total_cost(paper, 1, "parameters")
    with pytest.raises(ValueError, match="non-negative"):
        total_cost(paper, -1, "explicit")
    with pytest.raises(ValueError, match="train_length"):
        implicit_write_cost(paper, 0)
    with pytest.raises(ValueError, match="n_references"):
        memory_bank_bytes(paper, -5)
    no_memory = paper.replace(memory_layers=(), memory_heads=())
    with pytest.raises(ValueError, match="no memory layers"):
        explicit_write_cost(no_memory)
    with pytest.raises(ValueError, match="no memory layers"):
        memory_bank_bytes(no_memory, 1)


def test_advantage_interval_empty_raises(paper):
    # a very long reference: sparsifying it needs a full l_ref × l_ref score matrix per memory layer,
    # which costs more than one training step on it, so n+ < 0 < n-
    long_ref = paper.replace(reference_length=100_000)
    assert explicit_write_cost(long_ref) > implicit_write_cost(long_ref)
    with pytest.raises(ValueError, match="interval is empty"):
        advantage_interval(long_ref)
    assert cheapest_format(long_ref, 1e3) in ("external", "implicit")


def test_advantage_interval_rag_never_loses_raises(paper, monkeypatch):
    # with a valid config cost_read^ext > cost_read^exp always (L_mem <= L, l_mem <= l_ref), so the
    # guard is exercised with patched costs
    def fake_costs(cfg, **kw):
        return {"implicit": {"write": 10.0, "read": 0.0}, "explicit": {"write": 1.0, "read": 2.0},
                "external": {"write": 0.0, "read": 2.0}}
    monkeypatch.setattr(costs, "memory_format_costs", fake_costs)
    with pytest.raises(ValueError, match="never beats RAG"):
        advantage_interval(paper)


def test_module_docstring_names_the_paper_section():
    assert costs.__doc__.splitlines()[0].startswith("Appendix A / §1.4 cost model:")
