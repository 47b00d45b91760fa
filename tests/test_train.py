"""§3.6 training: WSD schedule, chunk packing, leakage filter, memory layout, exact resume, bad checkpoints."""
import json

import pytest
import torch

from mini_m3 import Memory3, Memory3Config, Retriever, Tokenizer
from mini_m3.data.world import World
from mini_m3.train import (ChunkedData, TrainConfig, latest_checkpoint, load_checkpoint, memory_index,
                           pack_documents, pack_stream, retrieve_for_chunks, train, wsd_lr)


@pytest.fixture(scope="module")
def setup():
    world = World.generate(60, seed=0)
    tok = Tokenizer.train(world.tokenizer_corpus(n_skill_texts=200), 1024)
    refs = world.references()
    ref_tokens = tok.encode_batch(refs)
    docs = world.training_documents(96, seed=0)
    tokens, targets = pack_documents(tok.encode_batch([d.text for d in docs]), 64, 4,
                                     bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    retriever = Retriever().fit(refs)
    chunk_refs = retrieve_for_chunks(tokens, 64, tok, retriever, ref_tokens, progress=False)
    cfg = Memory3Config.from_name("tiny", vocab_size=1024)
    return world, tok, docs, ChunkedData(tokens, targets, chunk_refs, ref_tokens), cfg


def test_wsd_schedule_shape():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1)
    lrs = [wsd_lr(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(lr == 1.0 for lr in lrs[10:80])  # the stable plateau
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_pack_documents_one_document_per_chunk():
    tokens, targets = pack_documents([[5, 6, 7], [8, 9]], 4, 2, bos_id=1, eos_id=2, pad_id=0)
    assert tokens.tolist() == [[1, 5, 6, 7, 1, 8, 9, 2]]  # the first document is cut at 4 tokens
    assert targets.tolist() == [[5, 6, 7, -100, 8, 9, 2, -100]]
    with pytest.raises(ValueError):
        pack_documents([[5]], 4, 2, bos_id=1, eos_id=2, pad_id=0)


def test_pack_stream_documents_back_to_back():
    tokens, targets = pack_stream([[5, 6, 7], [8, 9], [10]], 4, bos_id=1, eos_id=2)
    # stream: 1 5 6 7 2 | 1 8 9 2 1 | 10 2 -> two rows of 4 + 1 target; the rest is dropped
    assert tokens.tolist() == [[1, 5, 6, 7], [1, 8, 9, 2]]
    assert targets.tolist() == [[5, 6, 7, 2], [8, 9, 2, 1]]
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack_stream([[5]], 4, bos_id=1, eos_id=2)
    _, _, documents = pack_stream([[5, 6, 7], [8, 9], [10]], 4, bos_id=1, eos_id=2, with_documents=True)
    assert documents.tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]  # row 1 starts at doc 1's <s>; its </s> (doc 0) was a target


def test_memory_index_reads_own_and_previous_four():
    refs = torch.tensor([[10, 11, 12, 13, 14, 15]])
    idx = memory_index(refs, 5)
    assert idx[0, 0].tolist() == [10, -1, -1, -1, -1]
    assert idx[0, 5].tolist() == [15, 14, 13, 12, 11]


def test_retrieval_for_chunks_finds_the_person_and_applies_the_leakage_filter(setup):
    world, tok, docs, data, cfg = setup
    flat = data.chunk_refs.flatten().tolist()
    qa = [(d.person, r) for d, r in zip(docs, flat) if d.kind == "qa"]
    assert sum(p == r for p, r in qa) / len(qa) > 0.7
    # a biography document is its own reference: overlap 1.0 > 0.9, so that reference is never paired with it
    for d, r in zip(docs, flat):
        if d.kind == "bio" and r >= 0:
            assert world.references()[r] != d.text
    # the filter on a constructed case: a chunk that *is* a reference cannot retrieve it
    tokens = torch.full((1, 64), tok.pad_id)
    ids = [tok.bos_id] + data.references[3]
    tokens[0, :len(ids)] = torch.tensor(ids)
    r = retrieve_for_chunks(tokens, 64, tok, Retriever().fit(world.references()), data.references, progress=False)
    assert r[0, 0].item() != 3
    r_no_filter = retrieve_for_chunks(tokens, 64, tok, Retriever().fit(world.references()), data.references,
                                      leakage_threshold=1.0, progress=False)
    assert r_no_filter[0, 0].item() == 3


@pytest.mark.parametrize("stage", ["warmup", "continual"])
def test_loss_decreases(setup, stage):
    *_, data, cfg = setup
    torch.manual_seed(0)
    model = Memory3(cfg)
    r = train(model, data, TrainConfig(stage=stage, steps=25, batch_size=4, lr=3e-3, quiet=True))
    assert sum(r["losses"][-5:]) / 5 < sum(r["losses"][:5]) / 5 - 0.3


def test_resume_after_a_kill_gives_the_same_loss_curve(setup, tmp_path):
    *_, data, cfg = setup
    tc = TrainConfig(stage="continual", steps=8, batch_size=4, checkpoint_every=3, quiet=True, keep_checkpoints=2)
    torch.manual_seed(0)
    full = train(Memory3(cfg), data, tc, out_dir=tmp_path / "full")["losses"]
    # "killed" after step 5: a run of 5 steps leaves checkpoints at steps 3 and 5
    torch.manual_seed(0)
    train(Memory3(cfg), data, TrainConfig(**{**tc.__dict__, "steps": 5}), out_dir=tmp_path / "run")
    ck = latest_checkpoint(tmp_path / "run")
    assert ck.name == "step-0000005"
    state = json.loads((ck / "train_state.json").read_text())
    assert state["step"] == 5
    # resume with the full step budget: a fresh model object, weights from the checkpoint
    torch.manual_seed(123)  # a different RNG state must not matter: it is restored from the checkpoint
    rest = train(Memory3(cfg), data, tc, out_dir=tmp_path / "run")["losses"]
    # steps 5..7 must match the uninterrupted run (LR schedule is a function of the step, total steps = 8)
    assert len(rest) == 3
    torch.testing.assert_close(torch.tensor(rest), torch.tensor(full[5:]), rtol=1e-5, atol=1e-5)
    log = [json.loads(l) for l in (tmp_path / "run" / "continual.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(8))


def test_checkpoint_of_another_config_is_refused(setup, tmp_path):
    *_, data, cfg = setup
    train(Memory3(cfg), data, TrainConfig(steps=2, batch_size=2, checkpoint_every=2, quiet=True), out_dir=tmp_path)
    other = Memory3(cfg.replace(n_layers=2, memory_layers=None))
    with pytest.raises(ValueError, match="different model config"):
        load_checkpoint(latest_checkpoint(tmp_path), other)


def test_interrupted_checkpoint_write_leaves_the_last_one_loadable(setup, tmp_path, monkeypatch):
    *_, data, cfg = setup
    model = Memory3(cfg)
    train(model, data, TrainConfig(steps=2, batch_size=2, checkpoint_every=2, quiet=True), out_dir=tmp_path)
    good = latest_checkpoint(tmp_path)
    import mini_m3.train as T

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(T, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        train(model, data, TrainConfig(steps=4, batch_size=2, checkpoint_every=2, quiet=True), out_dir=tmp_path)
    assert latest_checkpoint(tmp_path) == good
    load_checkpoint(good, Memory3(cfg))


def test_config_validation():
    with pytest.raises(ValueError, match="stage"):
        TrainConfig(stage="pretrain")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
