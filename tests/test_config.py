import json

import pytest

from mini_m3 import Memory3Config


def test_presets_build_and_validate():
    for name in Memory3Config.available():
        cfg = Memory3Config.from_name(name)
        assert cfg.name == name
        assert cfg.n_heads % cfg.n_kv_heads == 0


def test_paper_24b_shape_and_memory_defaults():
    cfg = Memory3Config.from_name("paper-2.4b")
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (44, 40, 8, 80)
    assert (cfg.d_model, cfg.mlp_width, cfg.vocab_size) == (3200, 3200, 60416)
    assert cfg.memory_layers == tuple(range(22))
    assert cfg.memory_heads == tuple(range(8))
    assert (cfg.memory_tokens_per_head, cfg.reference_length, cfg.chunk_length, cfg.memories_per_chunk) == (8, 128, 64, 5)


def test_paper_092b_has_20_memory_layers():
    cfg = Memory3Config.from_name("paper-0.92b")
    assert (cfg.n_layers, cfg.n_heads, cfg.head_dim) == (40, 32, 64)
    assert len(cfg.memory_layers) == 20


def test_fig10_shapes():
    shapes = {(45, 24, 128), (48, 48, 64), (66, 32, 80), (44, 40, 80), (30, 48, 80), (30, 40, 96)}
    got = set()
    for name in Memory3Config.available():
        if name.startswith("fig10-"):
            c = Memory3Config.from_name(name)
            got.add((c.n_layers, c.n_heads, c.head_dim))
            assert c.d_model == c.n_heads * c.head_dim == c.mlp_width and c.n_kv_heads == 8
            assert 2.1e9 < c.non_embedding_parameters() < 2.5e9
    assert got == shapes


def test_json_round_trip(tmp_path):
    cfg = Memory3Config.from_name("small", memory_layers=(1, 2, 3), memory_heads=(1,))
    assert Memory3Config.from_json(cfg.to_json()) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert Memory3Config.from_json(tmp_path / "c.json") == cfg
    assert not list(tmp_path.glob("*.tmp"))


def test_json_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config fields"):
        Memory3Config.from_json(json.dumps({"n_layerz": 3}))
    with pytest.raises(ValueError, match="version"):
        Memory3Config.from_json(json.dumps({"format": "mini_m3.config", "version": 99}))
    with pytest.raises(ValueError, match="not a mini_m3 config"):
        Memory3Config.from_json(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="JSON"):
        Memory3Config.from_json("{not json")
    with pytest.raises(ValueError, match="unknown preset"):
        Memory3Config.from_name("gpt-5")


@pytest.mark.parametrize("changes, field, rule", [
    (dict(n_heads=6, n_kv_heads=4), "n_heads", "divisible by n_kv_heads"),
    (dict(memory_layers=(0, 4)), "memory_layers", r"\[0, n_layers=4\)"),
    (dict(memory_layers=(2, 1)), "memory_layers", "strictly increasing"),
    (dict(memory_layers=(1, 1)), "memory_layers", "strictly increasing"),
    (dict(memory_heads=(2,)), "memory_heads", r"\[0, n_kv_heads=2\)"),
    (dict(memory_heads=(-1,)), "memory_heads", "KV-head index"),
    (dict(memory_layers=(), memory_heads=(0,)), "memory_heads", "both be empty"),
    (dict(memory_tokens_per_head=200), "memory_tokens_per_head", "reference_length=128"),
    (dict(head_dim=15), "head_dim", "even"),
    (dict(vocab_size=0), "vocab_size", "positive integer"),
    (dict(n_layers=2.5), "n_layers", "positive integer"),
    (dict(chunk_length=-64), "chunk_length", "positive integer"),
    (dict(rope_base=0), "rope_base", "positive number"),
    (dict(norm_eps=-1.0), "norm_eps", "positive number"),
    (dict(tie_embeddings="yes"), "tie_embeddings", "True or False"),
    (dict(reference_prefix_ids=(1, 9999)), "reference_prefix_ids", "vocab_size"),
    (dict(reference_prefix_ids=()), "reference_prefix_ids", "non-empty"),
])
def test_validation_rules_name_field_and_rule(changes, field, rule):
    with pytest.raises(ValueError, match=rf"Memory3Config\.{field}=.*{rule}"):
        Memory3Config.from_name("tiny", **changes)


def test_replace_validates():
    cfg = Memory3Config.from_name("tiny")
    assert cfg.replace(memories_per_chunk=3).memories_per_chunk == 3
    with pytest.raises(ValueError):
        cfg.replace(n_kv_heads=3)


def test_derived_positions():
    cfg = Memory3Config.from_name("tiny")
    assert cfg.prefix_length == 2 and cfg.context_offset == 2 + 128
    assert cfg.memory_slots_per_chunk == 40
