"""§3.4 the memory bank on disk: round trips (raw and VQ), refusals (wrong model, tokenizer, damaged files),
the LRU cache, append with crash safety, cold start, retrieval and bad input.

One tiny model and one tokenizer trained on a 120-person world; every bank below is built once per module.
"""
import copy
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_model
from mini_m3 import Tokenizer
from mini_m3.memory.bank import BankError, MemoryBank
from mini_m3.memory.encode import encode_reference_tokens, encode_references

N_SMALL = 12  # references in the banks that are copied, damaged or appended to


@pytest.fixture(scope="module")
def refs(world, tok):
    refs = world.references()
    lengths = [len(ids) for ids in tok.encode_references(refs)]
    assert max(lengths) <= 128, f"biographies up to {max(lengths)} tokens: train the tokenizer with a larger vocab"
    return refs


@pytest.fixture(scope="module")
def model(tiny):
    return tiny


@pytest.fixture(scope="module")
def want(model, tok, refs):
    """Memories of every reference, encoded directly (no bank), in the same batches as `full_bank`."""
    return encode_references(model, tok, refs)


def encode(model, tok, texts):
    """Direct encoding of exactly these texts in one batch. A bank must be compared with the encoding of the
    same texts in the same batch: at layer 0 a repeated token gets exactly the same selection score at each
    of its occurrences (no RoPE in the score), and which occurrence is kept is then decided by float rounding
    that depends on the padded batch length."""
    return encode_references(model, tok, texts)


@pytest.fixture(scope="module")
def bank_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("banks")


@pytest.fixture(scope="module")
def full_bank(bank_dirs, model, tok, refs):
    """Every biography, raw bf16 storage (the default)."""
    return MemoryBank.build(bank_dirs / "full", model, tok, refs, progress=False)


@pytest.fixture(scope="module")
def small_bank_path(bank_dirs, model, tok, refs):
    """A small bank that tests copy before damaging or appending to it."""
    path = bank_dirs / "small"
    MemoryBank.build(path, model, tok, refs[:N_SMALL], progress=False)
    return path


@pytest.fixture
def small_copy(small_bank_path, tmp_path):
    dst = tmp_path / "bank"
    shutil.copytree(small_bank_path, dst)
    return dst


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def shard_file(path, kind):
    sh = manifest(path)["shards"][0]
    return path / f"{sh['name']}.{kind}.npy"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


# ----------------------------------------------------------------------------------------------- round trips
def test_raw_bf16_round_trip_equals_direct_encoding_rounded_to_bf16(full_bank, want):
    ids = [7, 0, 119, 42, 7]  # any order, repeats allowed
    got = full_bank.get(ids)
    exp = want[ids]
    assert got.reference_ids.tolist() == ids
    assert torch.equal(got.positions, exp.positions) and torch.equal(got.mask, exp.mask)
    for name in ("keys", "values"):
        g, e = getattr(got, name), getattr(exp, name)
        assert g.dtype == torch.float32 and g.shape == e.shape
        # bf16 storage: exactly the bf16 rounding of the encoder's output, i.e. within 2^-8 relative
        assert torch.equal(g, e.bfloat16().float())
        torch.testing.assert_close(g, e, rtol=2 ** -8, atol=1e-6)
        assert not torch.equal(g, e), "bf16 storage should round something"


def test_raw_float32_round_trip_is_exact(bank_dirs, model, tok, refs):
    bank = MemoryBank.build(bank_dirs / "f32", model, tok, refs[:N_SMALL], storage_dtype="float32",
                            progress=False)
    ids = list(range(N_SMALL))[::-1]
    got, exp = bank.get(ids), encode(model, tok, refs[:N_SMALL])[ids]
    for name in ("keys", "values", "positions", "mask"):
        assert torch.equal(getattr(got, name), getattr(exp, name)), name
    # reopened from disk: the same
    got2 = MemoryBank.open(bank.path, model, tok).get(ids)
    assert torch.equal(got2.keys, got.keys) and torch.equal(got2.values, got.values)


def test_vq_round_trip_error_is_bounded_and_storage_is_8x_smaller(bank_dirs, model, tok, refs):
    n = 60  # 60 refs x 32 vectors x (K, V) = 3840 training vectors for 4 sub-quantizers of 256 centroids
    # "np": plain PQ, no polysemous training (which faiss turns on for a bare "PQ4x8" and is ~10x slower)
    bank = MemoryBank.build(bank_dirs / "vq", model, tok, refs[:n], quantizer="PQ4x8np", progress=False)
    got, exp = bank.get(range(n)), encode(model, tok, refs[:n])
    assert torch.equal(got.positions, exp.positions) and torch.equal(got.mask, exp.mask)
    for name in ("keys", "values"):
        g, e = getattr(got, name), getattr(exp, name)
        err = rel_err(e, g)
        # a codec that only knew the mean vector would score ~0.96; measured 0.21 (keys) and 0.15 (values) with
        # 4 sub-quantizers x 8 bits on 4-dim pieces. 0.35 leaves room for other faiss versions and seeds, and
        # is far below what a broken decode (wrong rows or layout: >= ~1) would give.
        baseline = rel_err(e, e.mean(dim=(0, 3), keepdim=True).expand_as(e))
        assert err < 0.35 and err < 0.4 * baseline, (name, err, baseline)
        shuffled = rel_err(e, g[torch.roll(torch.arange(n), 1)])
        assert shuffled > 3 * err  # the error measures something: the wrong memory is far off
    sizes = bank.bytes_per_memory()
    assert sizes["raw_bf16"] == 2 * 2 * 2 * 8 * 16 * 2  # (K,V) x L_mem x H_mem x k x d_h x 2 bytes = 2048
    assert sizes["stored"] * 8 <= sizes["raw_bf16"]
    codes = np.load(shard_file(bank.path, "codes"))
    assert codes.dtype == np.uint8 and codes.nbytes == n * sizes["stored"]
    # reopened: the same decoded memories
    again = MemoryBank.open(bank.path, model, tok).get(range(n))
    assert torch.equal(again.keys, got.keys) and torch.equal(again.values, got.values)


def test_vq_codebooks_per_head_beat_one_shared_and_auto_falls_back_on_tiny_banks(bank_dirs, model, tok, refs):
    n = 60
    exp = encode(model, tok, refs[:n])
    errs = {}
    for groups in ("per_head", "shared"):
        bank = MemoryBank.build(bank_dirs / f"vq-{groups}", model, tok, refs[:n], quantizer="PQ4x8np",
                                vq_groups=groups, progress=False)
        assert manifest(bank.path)["quantizer"]["groups"] == (8 if groups == "per_head" else 1)  # (K,V) x 2 x 2
        got = bank.get(range(n))
        errs[groups] = sum(rel_err(getattr(exp, k), getattr(got, k)) for k in ("keys", "values"))
        assert bank.bytes_per_memory()["stored"] == 2 * 2 * 2 * 8 * 4  # same bytes either way
    assert errs["per_head"] < 0.9 * errs["shared"], errs
    # 20 references give 160 vectors per group, fewer than a PQ4x8's 256 centroids: "auto" shares one codebook,
    # "per_head" refuses with the group's name
    small = MemoryBank.build(bank_dirs / "vq-auto", model, tok, refs[:20], quantizer="PQ4x8np", progress=False)
    assert manifest(small.path)["quantizer"]["groups"] == 1
    with pytest.raises(ValueError, match="group 0"):
        MemoryBank.build(bank_dirs / "vq-strict", model, tok, refs[:20], quantizer="PQ4x8np", vq_groups="per_head",
                         progress=False)
    with pytest.raises(ValueError, match="vq_groups"):
        MemoryBank.build(bank_dirs / "vq-bad", model, tok, refs[:20], quantizer="PQ4x8np", vq_groups="layer",
                         progress=False)


# ----------------------------------------------------------------------------------------------- refusals
def test_open_refuses_a_model_with_other_weights(small_bank_path, model, tok):
    MemoryBank.open(small_bank_path, model, tok)  # the model that built it is fine
    with pytest.raises(BankError, match="rebuild"):
        MemoryBank.open(small_bank_path, tiny_model(seed=1), tok)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.blocks[0].attn.wk.weight[0, 0] += 1e-3  # in place, in a memory layer
    with pytest.raises(BankError, match="rebuild"):
        MemoryBank.open(small_bank_path, changed, tok)
    with torch.no_grad():
        changed.blocks[0].attn.wk.weight[0, 0] -= 1e-3
        changed.blocks[0].attn.wk.weight.copy_(model.blocks[0].attn.wk.weight)
        # layers after the last memory layer do not shape memories (Remark 9): still readable
        changed.blocks[model.cfg.n_layers - 1].mlp.w_up.weight.mul_(2.0)
    MemoryBank.open(small_bank_path, changed, tok)


def test_open_refuses_a_different_tokenizer(small_bank_path, model, world):
    other = Tokenizer.train(world.tokenizer_corpus()[:2000], 400)
    with pytest.raises(BankError, match="tokenizer"):
        MemoryBank.open(small_bank_path, model, other)


def test_a_version_1_bank_is_refused_with_a_rebuild_message(small_copy, model, tok):
    # version 1 tokenized references without the space after "Reference:": its memories no longer match training
    m = json.loads((small_copy / "manifest.json").read_text())
    (small_copy / "manifest.json").write_text(json.dumps({**m, "version": 1}))
    with pytest.raises(BankError, match="version 1 .*rebuild"):
        MemoryBank.open(small_copy, model, tok)


def test_references_are_encoded_with_the_space_after_reference_colon(tmp_path, model, tok, refs):
    # the first name of a biography must tokenize as it does in a question (" Monica", not "M" "on" "ica")
    assert refs[0][0] != " " and tok.encode_reference(refs[0]) == tok.encode(" " + refs[0])
    assert tok.encode_reference(" " + refs[0]) == tok.encode(" " + refs[0])  # no second space
    bank = MemoryBank.build(tmp_path / "b", model.with_memory_format(selector="all"), tok, refs[:2],
                            storage_dtype="float32", progress=False)
    direct = encode_reference_tokens(model, [tok.encode(" " + r) for r in refs[:2]], selector="all")
    torch.testing.assert_close(bank.get([0, 1]).keys, direct.keys)
    plain = encode_reference_tokens(model, [tok.encode(r) for r in refs[:2]], selector="all")
    assert plain.keys.shape != direct.keys.shape or not torch.allclose(plain.keys, direct.keys)


def test_truncated_shard_is_refused_at_open(small_copy, model, tok):
    f = shard_file(small_copy, "keys")
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(BankError, match="truncated"):
        MemoryBank.open(small_copy, model, tok)


def test_altered_byte_is_refused_by_checksum(small_copy, model, tok):
    f = shard_file(small_copy, "values")
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01  # same size, one bit of one value
    f.write_bytes(bytes(data))
    with pytest.raises(BankError, match="checksum"):
        MemoryBank.open(small_copy, model, tok)


# ----------------------------------------------------------------------------------------------- cache
def test_lru_cache_counts_hits_misses_and_evicts_least_recently_used(small_bank_path, model, tok):
    bank = MemoryBank.open(small_bank_path, model, tok, cache_size=2)

    def info():
        i = bank.cache_info()
        return i["hits"], i["misses"], i["size"]

    first = bank.get([0])
    assert info() == (0, 1, 1)
    assert torch.equal(bank.get([0]).keys, first.keys)
    assert info() == (1, 1, 1)
    bank.get([1])
    assert info() == (1, 2, 2)
    bank.get([0])  # 0 becomes the most recently used
    bank.get([2])  # capacity 2: evicts 1, the least recently used
    assert info() == (2, 3, 2) and bank.cache_info()["capacity"] == 2
    bank.get([0])
    assert info() == (3, 3, 2)  # 0 survived
    again = bank.get([1])  # 1 was evicted: a miss, read from disk again
    assert info() == (3, 4, 2)
    assert torch.equal(again.keys, MemoryBank.open(small_bank_path, model, tok).get([1]).keys)
    bank.get([3, 4, 5])  # more misses at once than the capacity: all returned, cache stays at capacity
    assert info()[2] == 2


# ----------------------------------------------------------------------------------------------- append
def test_append_new_ids_follow_search_finds_them_and_reopen_sees_them(small_copy, model, tok, refs, world):
    bank = MemoryBank.open(small_copy, model, tok)
    new = refs[N_SMALL:N_SMALL + 4]
    ids = bank.append(new, progress=False)
    assert ids == list(range(N_SMALL, N_SMALL + 4)) and len(bank) == N_SMALL + 4
    assert bank.search([new[2]], 1)[0, 0] == N_SMALL + 2
    q = world.eval_questions("memory") + world.eval_questions("text") + world.eval_questions("heldout")
    about = [x for x in q if x.person == N_SMALL + 1]
    assert about and all(N_SMALL + 1 in row for row in bank.search([x.prompt for x in about], 5).tolist())
    exp = encode(model, tok, new)  # appended texts are encoded as one batch
    assert torch.equal(bank.get(ids).keys, exp.keys.bfloat16().float())
    reopened = MemoryBank.open(small_copy, model, tok)
    assert len(reopened) == N_SMALL + 4 and reopened.texts[N_SMALL:] == new
    assert torch.equal(reopened.get(ids).values, exp.values.bfloat16().float())
    assert reopened.search([new[3]], 1)[0, 0] == N_SMALL + 3


def test_crash_during_append_leaves_the_previous_bank(small_copy, model, tok, refs, monkeypatch):
    before = MemoryBank.open(small_copy, model, tok).get(range(N_SMALL))
    bank = MemoryBank.open(small_copy, model, tok)

    def crash(self):
        raise OSError("simulated crash before the commit")

    monkeypatch.setattr(MemoryBank, "_write_manifest", crash)
    with pytest.raises(OSError, match="simulated crash"):
        bank.append(refs[N_SMALL:N_SMALL + 3], progress=False)
    monkeypatch.undo()
    old = MemoryBank.open(small_copy, model, tok, verify="full")
    assert len(old) == N_SMALL and manifest(small_copy)["n_references"] == N_SMALL
    assert torch.equal(old.get(range(N_SMALL)).keys, before.keys)
    assert old.search([refs[N_SMALL]], N_SMALL).shape == (1, N_SMALL)
    # the next append works, and its commit removes the crashed writer's leftovers
    old.append(refs[N_SMALL:N_SMALL + 3], progress=False)
    m = manifest(small_copy)
    keep = {"manifest.json", m["texts_file"], m["retriever_dir"]}
    keep |= {f"{sh['name']}.{kind}.npy" for sh in m["shards"] for kind in sh["files"]}
    assert {p.name for p in small_copy.iterdir()} == keep
    assert len(MemoryBank.open(small_copy, model, tok)) == N_SMALL + 3


# ----------------------------------------------------------------------------------------------- cold start
def test_cold_start_encodes_on_first_retrieval_and_flush_persists(tmp_path, model, tok, refs):
    path = tmp_path / "cold"
    bank = MemoryBank.build(path, model, tok, refs[:N_SMALL], encode=False, progress=False)
    assert manifest(path)["shards"] == [] and bank.cache_info()["cold_encodes"] == 0
    got = bank.get([3, 5])  # encodes refs 3 and 5 as one batch
    assert bank.cache_info()["cold_encodes"] == 2
    # the same memory a warm (bf16) bank of those texts serves, before and after flush
    warm = MemoryBank.build(tmp_path / "warm", model, tok, [refs[3], refs[5]], progress=False).get([0, 1])
    for name in ("keys", "values", "positions", "mask"):
        assert torch.equal(getattr(got, name), getattr(warm, name)), name
    assert torch.equal(got.keys, encode(model, tok, [refs[3], refs[5]]).keys.bfloat16().float())
    bank.get([3])
    assert bank.cache_info()["cold_encodes"] == 2  # not encoded twice
    with pytest.raises(ValueError, match="tokenizer"):  # a cold bank cannot encode without the tokenizer
        MemoryBank.open(path, model).get([0])
    assert bank.flush() == 2 and bank.flush() == 0
    reopened = MemoryBank.open(path, model, tok)
    assert reopened.cache_info()["encoded_on_disk"] == 2
    again = reopened.get([5, 3])
    assert reopened.cache_info()["cold_encodes"] == 0  # served from disk
    assert torch.equal(again.keys, got.keys[[1, 0]]) and torch.equal(again.values, got.values[[1, 0]])
    reopened.get([7])
    assert reopened.cache_info()["cold_encodes"] == 1  # the others are still cold


# ----------------------------------------------------------------------------------------------- search
def test_exact_search_finds_the_biography_a_question_is_about(full_bank, world):
    questions = world.eval_questions("memory") + world.eval_questions("heldout", 60)
    found = full_bank.search([q.prompt for q in questions], 5)
    assert found.shape == (len(questions), 5)
    hit = np.mean([q.person in row for q, row in zip(questions, found.tolist())])
    assert hit >= 0.9, hit


def test_search_k_larger_than_the_bank_is_a_clear_error(small_bank_path, model, tok):
    bank = MemoryBank.open(small_bank_path, model, tok)
    assert bank.search(["anything"], N_SMALL).shape == (1, N_SMALL)
    with pytest.raises(ValueError, match="larger than the number"):
        bank.search(["anything"], N_SMALL + 1)


def test_get_unknown_id_is_a_clear_error(small_bank_path, model, tok):
    with pytest.raises(IndexError, match="not in this bank"):
        MemoryBank.open(small_bank_path, model, tok).get([N_SMALL])


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("encode", [True, False])
@pytest.mark.parametrize("case", ["empty", "blank", "too_long", "not_a_string", "one_string"])
def test_bad_references_are_refused_before_anything_is_written(tmp_path, model, tok, refs, case, encode):
    texts = {"empty": [refs[0], ""], "blank": [refs[0], "  \n"], "too_long": [refs[0], " ".join(refs[1:4])],
             "not_a_string": [refs[0], 5], "one_string": refs[0]}[case]
    error, match = {"empty": (ValueError, "empty"), "blank": (ValueError, "empty"),
                    "too_long": (ValueError, "128.*chunk_references"), "not_a_string": (TypeError, "not a str"),
                    "one_string": (TypeError, "list of strings")}[case]
    if case == "too_long":
        assert len(tok.encode(texts[1])) > 128
    path = tmp_path / "b"
    with pytest.raises(error, match=match):
        MemoryBank.build(path, model, tok, texts, encode=encode, progress=False)
    assert not (path / "manifest.json").exists()


def test_appending_bad_references_leaves_the_bank_unchanged(small_copy, model, tok, refs):
    bank = MemoryBank.open(small_copy, model, tok)
    before = manifest(small_copy)
    with pytest.raises(ValueError, match="reference_length"):
        bank.append([refs[20], " ".join(refs[1:4])], progress=False)
    with pytest.raises(TypeError):
        bank.append([None], progress=False)
    assert manifest(small_copy) == before and len(MemoryBank.open(small_copy, model, tok)) == N_SMALL


def test_build_refuses_a_non_empty_directory_that_is_not_a_bank(tmp_path, model, tok, refs):
    path = tmp_path / "mine"
    path.mkdir()
    (path / "notes.txt").write_text("not a bank")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not empty"):
            MemoryBank.build(path, model, tok, refs[:2], overwrite=overwrite, progress=False)
    assert sorted(p.name for p in path.iterdir()) == ["notes.txt"]


def test_build_over_an_existing_bank_needs_overwrite(small_copy, model, tok, refs):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        MemoryBank.build(small_copy, model, tok, refs[:2], progress=False)
    bank = MemoryBank.build(small_copy, model, tok, refs[:3], overwrite=True, progress=False)
    assert len(bank) == 3 and len(MemoryBank.open(small_copy, model, tok)) == 3


def test_open_a_directory_without_a_bank(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="manifest"):
        MemoryBank.open(tmp_path, model)


def test_evaluation_leakage_filter_drops_a_reference_that_contains_the_question(full_bank, world, refs):
    """§4.3: with threshold 2/3, a reference containing the query (overlap(reference, query) ~ 1) is dropped,
    while an ordinary question about the person still retrieves that person's biography."""
    leaky_query = refs[7][: len(refs[7]) // 2]  # half of biography 7, verbatim
    assert 7 in full_bank.search([leaky_query], 5)[0].tolist()
    assert 7 not in full_bank.search([leaky_query], 5, leakage_threshold=2 / 3)[0].tolist()
    items = world.eval_questions("heldout", 30, seed=1)
    ids = full_bank.search([it.prompt for it in items], 5, leakage_threshold=2 / 3)
    assert sum(it.person in row.tolist() for it, row in zip(items, ids)) >= 0.9 * len(items)


def test_references_in_any_script_round_trip(tmp_path, model, tok):
    """Byte-level BPE has no unknown token, so CJK, Cyrillic, Arabic and emoji references encode, store,
    retrieve and read like any other (with a tokenizer that never saw those scripts)."""
    texts = ["北京是中国的首都，有很多历史。", "Москва — столица России.", "القاهرة عاصمة مصر", "🙂 emoji 🚀 test"]
    bank = MemoryBank.build(tmp_path / "scripts", model, tok, texts, storage_dtype="float32", progress=False)
    assert MemoryBank.open(bank.path, model, tok).texts == texts
    mem = bank.get([0, 3])
    direct = encode_references(model, tok, [texts[0], texts[3]])
    torch.testing.assert_close(mem.keys, direct.keys)
    assert bank.search(["Москва столица"], 1)[0, 0] == 1
