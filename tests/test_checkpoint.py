"""§5 checkpoints: safetensors + JSON round trip, refusals, no pickle, and the Remark 9 weights fingerprint."""
import copy
import json
import pickle
import struct

import pytest
import torch

from conftest import tiny_model
from mini_m3 import Tokenizer
from mini_m3.checkpoint import (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, load_pretrained, load_weights,
                                save_pretrained, weights_fingerprint)
from mini_m3.data.world import World


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(World.generate(30, seed=0).tokenizer_corpus(n_skill_texts=200), 300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    model = tiny_model(0)
    directory = save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "m", tokenizer=tok)
    return model, directory


IDS = torch.tensor([[1, 50, 60, 70, 300, 511, 2]])


def test_round_trip_gives_the_same_logits_and_tokenizer(saved, tok):
    model, directory = saved
    loaded, loaded_tok = load_pretrained(directory)
    assert not loaded.training and loaded.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert loaded_tok.fingerprint() == tok.fingerprint()
    assert loaded_tok.encode("Alice was born in Paris.") == tok.encode("Alice was born in Paris.")
    assert weights_fingerprint(loaded) == weights_fingerprint(model)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # tied weights stay tied


def test_a_directory_without_tokenizer_loads_none(tmp_path):
    model = tiny_model(0)
    save_pretrained(model, tmp_path / "m")
    loaded, loaded_tok = load_pretrained(tmp_path / "m")
    assert loaded_tok is None
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_files_are_safetensors_and_json_no_pickle(saved, tmp_path, monkeypatch):
    model, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE])
    json.loads((directory / CONFIG_FILE).read_text())
    json.loads((directory / TOKENIZER_FILE).read_text())
    raw = (directory / WEIGHTS_FILE).read_bytes()
    (n_header,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length, then a JSON header
    header = json.loads(raw[8:8 + n_header])
    assert header["__metadata__"]["format"] == "mini_m3.weights"
    assert not raw.startswith(b"\x80") and b"PK\x03\x04" not in raw[:4]  # not a pickle, not a torch.save zip

    def refuse(*args, **kwargs):
        raise AssertionError("pickle must not be used")

    for mod, name in ((pickle, "dump"), (pickle, "dumps"), (pickle, "load"), (pickle, "loads"),
                      (torch, "save"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    save_pretrained(model, tmp_path / "again", tokenizer=load_pretrained(directory)[1])
    loaded, _ = load_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_truncated_weights_are_refused(saved, tmp_path):
    model, directory = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        (bad / name).write_bytes((directory / name).read_bytes())
    data = (directory / WEIGHTS_FILE).read_bytes()
    for cut in (len(data) - 1000, 100, 4):  # inside the data, inside the header, inside the length field
        (bad / WEIGHTS_FILE).write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            load_pretrained(bad)


def test_weights_of_another_config_are_refused(saved, tmp_path):
    _, directory = saved
    with pytest.raises(ValueError, match="do not fit"):  # same parameter names, other shapes
        load_weights(tiny_model(0, d_model=96, head_dim=24), directory / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="do not fit"):  # other parameter names (more layers)
        load_weights(tiny_model(0, n_layers=6), directory / WEIGHTS_FILE)
    # a model directory whose weights file comes from another config
    mixed = tmp_path / "mixed"
    save_pretrained(tiny_model(0, n_layers=6), mixed)
    (mixed / CONFIG_FILE).write_text((directory / CONFIG_FILE).read_text())
    with pytest.raises(ValueError, match="do not fit"):
        load_pretrained(mixed)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_pretrained(tmp_path)
    save_pretrained(tiny_model(0), tmp_path / "m")
    (tmp_path / "m" / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="weights"):
        load_pretrained(tmp_path / "m")


def test_fingerprint_covers_exactly_the_layers_that_shape_memories():
    model = tiny_model(0)
    cfg = model.cfg
    assert cfg.memory_layers == (0, 1) and cfg.n_layers == 4
    fp = weights_fingerprint(model)
    assert fp == weights_fingerprint(tiny_model(0)) and fp != weights_fingerprint(tiny_model(1))

    def changed(param_name):
        m = copy.deepcopy(model)
        with torch.no_grad():
            dict(m.named_parameters())[param_name].view(-1)[0] += 1e-3
        return weights_fingerprint(m)

    # the embedding and every block up to the last memory layer: memories must be rebuilt (Remark 9)
    for name in ("tok_emb.weight", "blocks.0.attn.wq.weight", "blocks.0.attn_norm.weight",
                 "blocks.0.mlp.w_down.weight", "blocks.1.attn.wk.weight"):
        assert changed(name) != fp, name
    # layers after the last memory layer and the final norm never touch a memory
    for name in ("blocks.2.attn.wq.weight", "blocks.3.mlp.w_up.weight", "norm.weight"):
        assert changed(name) == fp, name
    # the config's shape is part of it: the same weights with other memory heads are another model
    assert weights_fingerprint(tiny_model(0, memory_heads=(0,))) != fp
    # the memory format is not (a bank checks it itself): the same weights in another format, made either way
    other = tiny_model(0, memory_tokens_per_head=4, memory_selector="first", memories_per_chunk=1)
    assert weights_fingerprint(other) == fp
    assert weights_fingerprint(model.with_memory_format(selector="all", memories_per_chunk=2)) == fp
