"""§3.3–3.4 the memory format is part of the model (issue 15 item 3): selector, tokens per head and memories per
chunk live in `Memory3Config`; encoding, training, banks and `build-bank` read them from the model; a bank in
another format is refused at build and at open; `with_memory_format` is the explicit way to use another one."""
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from mini_m3 import Memory3Config
from mini_m3.checkpoint import load_pretrained, save_pretrained, weights_fingerprint
from mini_m3.cli import main
from mini_m3.memory.bank import BankError, MemoryBank
from mini_m3.memory.encode import encode_references
from mini_m3.train import ChunkedData, TrainConfig, continual_memory

ASSET = Path(__file__).resolve().parents[1] / "notebooks" / "assets" / "alltoken_demo"


@pytest.fixture(scope="module")
def texts(refs):
    return refs[:4]


def test_build_refuses_a_format_other_than_the_models_and_writes_nothing(tmp_path, tiny, tok, texts):
    for kw, asked in ((dict(selector="all"), "selector='all', tokens_per_head=128"),
                      (dict(tokens_per_head=4), "selector='attention', tokens_per_head=4"),
                      (dict(selector="first"), "selector='first', tokens_per_head=8")):
        with pytest.raises(BankError, match=rf"{asked}, but the model's config says selector='attention', "
                                            rf"tokens_per_head=8 .*with_memory_format") as e:
            MemoryBank.build(tmp_path / "b", tiny, tok, texts, progress=False, **kw)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "b").exists()
    # naming the model's own format explicitly is fine; so is a bank of the model's format by default
    bank = MemoryBank.build(tmp_path / "b", tiny, tok, texts, selector="attention", tokens_per_head=8, progress=False)
    assert (bank.manifest["selector"], bank.manifest["tokens_per_head"]) == ("attention", 8)


def test_open_refuses_a_model_whose_config_says_another_format(tmp_path, tiny, tok, texts):
    MemoryBank.build(tmp_path / "b", tiny, tok, texts, progress=False)
    for other in (tiny.with_memory_format(selector="all"), tiny.with_memory_format(tokens_per_head=4),
                  tiny_model(0, memory_selector="exp"), tiny_model(0, memory_selector="headmax")):
        with pytest.raises(BankError, match=r"holds memories in format selector='attention', tokens_per_head=8, but "
                                            r"the model's config says"):
            MemoryBank.open(tmp_path / "b", other, tok)
    # memories per chunk are read at retrieval time, not stored: a bank serves any number of them
    assert len(MemoryBank.open(tmp_path / "b", tiny.with_memory_format(memories_per_chunk=2), tok)) == len(texts)


def test_with_memory_format_shares_the_weights_and_its_bank_passes_the_check(tmp_path, tok, texts):
    model = tiny_model(0)
    other = model.with_memory_format(selector="all", memories_per_chunk=1)
    assert other.cfg.memory_format == {"selector": "all", "tokens_per_head": 128, "memories_per_chunk": 1}
    assert model.cfg.memory_format == {"selector": "attention", "tokens_per_head": 8, "memories_per_chunk": 5}
    assert weights_fingerprint(other) == weights_fingerprint(model)
    assert all(a is b for a, b in zip(model.parameters(), other.parameters()))
    bank = MemoryBank.build(tmp_path / "b", other, tok, texts, storage_dtype="float32", progress=False)
    assert (bank.manifest["selector"], bank.manifest["tokens_per_head"]) == ("all", 128)
    torch.testing.assert_close(MemoryBank.open(tmp_path / "b", other, tok).get(range(len(texts))).keys,
                               encode_references(model, tok, texts, selector="all").keys)
    with pytest.raises(BankError, match="model's config says selector='attention'"):
        MemoryBank.open(tmp_path / "b", model, tok)
    with torch.no_grad():  # one set of weights: a change made through one object is seen by the other
        other.tok_emb.weight[5, 0] += 1.0
    assert weights_fingerprint(model) == weights_fingerprint(other)
    x = torch.randint(4, 500, (1, 12))
    assert torch.equal(model(x).logits, other(x).logits)


def test_encoding_and_training_read_the_format_from_the_model(tok, texts):
    model = tiny_model(0, memory_selector="first", memory_tokens_per_head=3, memories_per_chunk=2)
    mem = encode_references(model, tok, texts)
    assert mem.tokens_per_head == 3 and bool(mem.mask.all())
    assert torch.equal(mem.positions[0, 0, 0], torch.arange(3) + model.cfg.prefix_length)  # "first" keeps 0..2
    assert encode_references(model, tok, texts, selector="all").tokens_per_head == 128  # an explicit override
    ref_tokens = tok.encode_references(texts)
    data = ChunkedData(torch.full((2, 128), 5), torch.full((2, 128), 5), torch.tensor([[0, 1], [2, 3]]), ref_tokens)
    rows = torch.arange(2)
    kv = continual_memory(model, data, rows, TrainConfig(stage="continual"))
    assert kv.keys.shape[-2] == 2 * 3  # the model's 2 memories per chunk x 3 tokens
    kv = continual_memory(model, data, rows, TrainConfig(stage="continual", selector="attention", tokens_per_head=5))
    assert kv.keys.shape[-2] == 2 * 5  # explicit TrainConfig settings still override (as mini_m3/demo.py uses)
    with pytest.raises(ValueError, match=r"TrainConfig\.selector='oracle'"):
        TrainConfig(selector="oracle")


def test_the_config_holds_the_selector_and_a_version_1_config_loads_as_attention(tmp_path):
    cfg = Memory3Config.from_name("tiny", memory_selector="all")
    assert Memory3Config.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match=r"Memory3Config\.memory_selector='oracle': must be one of"):
        Memory3Config.from_name("tiny", memory_selector="oracle")
    v1 = json.loads(Memory3Config.from_name("tiny").to_json())
    v1["version"] = 1
    del v1["memory_selector"]
    assert Memory3Config.from_dict(v1).memory_selector == "attention"
    with pytest.raises(ValueError, match="memory_selector is a field of config format version 2"):
        Memory3Config.from_dict({**v1, "memory_selector": "all"})
    with pytest.raises(ValueError, match="version 3 is not supported"):
        Memory3Config.from_dict({**v1, "version": 3})
    # a model directory written before the field existed (config.json version 1) loads, in the paper's format
    save_pretrained(tiny_model(0), tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(v1))
    assert load_pretrained(tmp_path / "m")[0].cfg.memory_format["selector"] == "attention"


def test_the_shipped_checkpoint_records_the_format_it_was_trained_in():
    model, tok = load_pretrained(ASSET)  # the weights' own metadata agrees with config.json (checked here)
    settings = json.loads((ASSET / "demo_settings.json").read_text())
    assert (settings["selector"], settings["memories_per_chunk"]) == ("all", 1)
    assert model.cfg.memory_format == {"selector": "all", "tokens_per_head": model.cfg.reference_length,
                                       "memories_per_chunk": 1}


def test_build_bank_takes_the_format_from_the_model(tmp_path, tok, texts, capsys):
    save_pretrained(tiny_model(0, memory_selector="all", memories_per_chunk=1), tmp_path / "model", tok)
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["build-bank", "--model", str(tmp_path / "model"), "--references", str(tmp_path / "refs.jsonl"),
                 "--out", str(tmp_path / "bank"), "--quiet", "--threads", "1"]) == 0
    assert "selector 'all', tokens per head 128" in capsys.readouterr().out
    m = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    assert (m["selector"], m["tokens_per_head"]) == ("all", 128)


def test_format_mixing_reads_the_easier_format_on_evenly_spaced_steps_only(tok, texts):
    """TrainConfig.format_mix (a named lever): the mixed steps' loss is that of a model whose own format is all
    tokens and 1 memory; the other steps' and an evaluation's (step None) that of the model's format."""
    from mini_m3.train import mixed_step, train_step
    tc = TrainConfig(stage="continual", format_mix=0.5)
    assert [mixed_step(i, tc) for i in range(6)] == [False, True, False, True, False, True]
    assert sum(mixed_step(i, TrainConfig(stage="continual", format_mix=0.25)) for i in range(100)) == 25
    assert not any(mixed_step(i, TrainConfig(stage="continual")) for i in range(10)) and not mixed_step(None, tc)
    model = tiny_model(0, memories_per_chunk=2)
    easy = model.with_memory_format(selector="all", memories_per_chunk=1)
    ref_tokens = tok.encode_references(texts)
    data = ChunkedData(torch.randint(4, 500, (2, 128)), torch.randint(4, 500, (2, 128)),
                       torch.tensor([[0, 1], [2, 3]]), ref_tokens)
    rows = torch.arange(2)
    with torch.no_grad():
        paper, all_one = (float(train_step(m, data, rows, TrainConfig(stage="continual"))) for m in (model, easy))
        assert abs(paper - all_one) > 1e-4  # the two formats give different losses here
        assert float(train_step(model, data, rows, tc, step=1)) == pytest.approx(all_one, abs=1e-6)
        assert float(train_step(model, data, rows, tc, step=0)) == pytest.approx(paper, abs=1e-6)
        assert float(train_step(model, data, rows, tc)) == pytest.approx(paper, abs=1e-6)
    for bad in (dict(format_mix=1.5), dict(mix_selector="oracle"), dict(mix_memories=0)):
        with pytest.raises(ValueError, match=r"TrainConfig\.format_mix="):
            TrainConfig(**bad)
