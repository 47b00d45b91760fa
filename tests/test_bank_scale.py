"""§3.4 banks of many shards: one build writing several shards, banks built from precomputed memories, and the
array-backed id -> (shard, row) map."""
import numpy as np
import pytest
import torch

from conftest import load_experiment, tiny_model
from mini_m3 import MemoryBank, Retriever, encode_references
from mini_m3.memory.bank import _Locations
from mini_m3.memory.encode import ExplicitMemory


@pytest.fixture(scope="module")
def refs(world):
    return world.references()[:10]


def _assert_same_memories(a: ExplicitMemory, b: ExplicitMemory):
    assert torch.equal(a.mask, b.mask) and torch.equal(a.positions, b.positions)
    torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=0)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)


def test_one_build_writing_several_shards_keeps_every_memory(tmp_path, tok, refs):
    """shard_size smaller than the bank: shards written in the same generation need distinct file names
    (they used to share one, so later shards overwrote earlier ones)."""
    model = tiny_model()
    bank = MemoryBank.build(tmp_path / "b", model, tok, refs, shard_size=4, progress=False)
    names = [sh["name"] for sh in bank.manifest["shards"]]
    assert len(names) == 3 and len(set(names)) == 3 and [sh["n"] for sh in bank.manifest["shards"]] == [4, 4, 2]
    again = MemoryBank.open(tmp_path / "b", model, tok, cache_size=0, verify="full")
    want = encode_references(model, tok, refs)
    stored = again.get(range(len(refs)))
    _assert_same_memories(stored, MemoryBank.build(tmp_path / "one", model, tok, refs, progress=False).get(range(10)))
    assert stored.keys.shape == want.keys.shape


def test_bank_from_precomputed_memories_equals_the_encoded_bank(tmp_path, tok, refs):
    model = tiny_model()
    encoded = MemoryBank.build(tmp_path / "enc", model, tok, refs, shard_size=4, progress=False)
    mem = encode_references(model, tok, refs)
    batches = [mem[list(range(s, min(s + 3, len(refs))))] for s in range(0, len(refs), 3)]
    given = MemoryBank.build(tmp_path / "given", model, tok, refs, memories=iter(batches), progress=False)
    assert [sh["n"] for sh in given.manifest["shards"]] == [3, 3, 3, 1]  # one shard per batch, streamed
    reopened = MemoryBank.open(tmp_path / "given", model, tok, cache_size=0)
    ids = [7, 0, 9, 3, 3]
    _assert_same_memories(reopened.get(ids), encoded.get(ids))
    assert reopened.search(["Where was the person born?"], 2).shape == (1, 2)


def test_precomputed_memories_are_checked(tmp_path, tok, refs):
    model = tiny_model()
    mem = encode_references(model, tok, refs)
    with pytest.raises(ValueError, match="reference order"):
        MemoryBank.build(tmp_path / "a", model, tok, refs, memories=[mem[[1, 0] + list(range(2, 10))]],
                         progress=False)
    with pytest.raises(ValueError, match="cover 5 references"):
        MemoryBank.build(tmp_path / "b", model, tok, refs, memories=[mem[list(range(5))]], progress=False,
                         overwrite=True)
    bad = ExplicitMemory(mem.keys[..., :4, :], mem.values[..., :4, :], mem.positions[..., :4], mem.mask[..., :4],
                         mem.reference_ids)
    with pytest.raises(ValueError, match="do not fit this model"):
        MemoryBank.build(tmp_path / "c", model, tok, refs, memories=[bad], progress=False, overwrite=True)


def test_vq_bank_from_memories_trains_its_quantizer_on_them(tmp_path, tok, refs):
    model = tiny_model()
    mem = encode_references(model, tok, refs * 30)  # enough vectors for the quantizer's k-means
    texts = [f"{t} ({i})" for i, t in enumerate(refs * 30)]
    mem.reference_ids = torch.arange(len(texts))
    bank = MemoryBank.build(tmp_path / "vq", model, tok, texts, memories=[mem], quantizer="default", progress=False,
                            retriever=Retriever())
    assert bank.manifest["storage"] == "vq" and bank.quantizer.trained
    got = MemoryBank.open(tmp_path / "vq", model, tok, cache_size=0).get([0, 299])
    err = (got.keys - mem.keys[[0, 299]]).norm() / mem.keys[[0, 299]].norm()
    assert err < 0.5  # lossy, but it is the same memory


def test_locations_map():
    loc = _Locations()
    loc.set(np.array([5, 2, 9]), 0)
    assert len(loc) == 3 and 2 in loc and 3 not in loc and 10 not in loc and -1 not in loc
    assert loc[9] == (0, 2) and loc[5] == (0, 0)
    loc.set([3, 9], 1)  # 9 moves to a newer shard (as after a flush)
    assert len(loc) == 4 and loc[9] == (1, 1) and loc[3] == (1, 0)


def test_bench_bank_scale_quick(tmp_path):
    """experiments/bench_bank_scale.py --quick (2e3 and 2e4 synthetic references) runs and reports consistent bytes."""
    import json
    out = tmp_path / "scale.json"
    res = load_experiment("bench_bank_scale").main(["--quick", "--out", str(out), "--quiet", "--keep",
                                                    str(tmp_path / "banks")])
    saved = json.loads(out.read_text())
    assert set(saved) == set(res) and out.with_suffix(".png").exists()
    assert not any((tmp_path / "banks").iterdir())  # bank files are deleted after measuring
    small, big = saved["rows"]
    assert (small["n"], big["n"]) == (2_000, 20_000)
    for r in (small, big):  # K and V of the small shape in bf16: 2 x 3 x 2 x 8 x 32 x 2 B per reference
        assert r["bytes_per_memory"]["stored"] == 6144
        header = r["bytes"]["keys_values"] - r["n"] * 6144
        assert 0 < header <= 2 * r["shards"] * 256  # only .npy headers on top
        assert r["recall_at_5_vs_exact"] > 0.2 and r["get"]["160"]["lru"]["ms_per_call"] > 0
    ext = saved["extrapolation"]
    from mini_m3 import Memory3Config
    from mini_m3.theory.costs import memory_bank_bytes
    paper = memory_bank_bytes(Memory3Config.from_name("paper-2.4b"), 1.1e8)
    assert ext["paper_shape_bank_bytes"]["vq"] == pytest.approx(paper["total"]["vq"] + 1.1e8 * 2 * 22 * 8 * 8)
