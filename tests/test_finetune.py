"""§6 fine-tuning and alignment: SFT data, answer-only loss, SFT and DPO with memory, resume, probe, CLI."""

import copy
import json
import shutil

import pytest
import torch
from conftest import tiny_model

from mini_m3 import MemoryBank
from mini_m3.checkpoint import save_pretrained
from mini_m3.data.bios import BioWorld
from mini_m3.data.instructions import (ABSTAIN, BIO_ANSWER_TEMPLATES, PreferencePair, ProbeItem, SFTExample,
                                       answer_sentence, asserted_values, chat_prompt, completion, fake_names,
                                       preference_pairs, probe_known_questions, probe_unknown_questions, sft_examples)
from mini_m3.data.world import ATTRIBUTE_VALUES
from mini_m3.finetune import (DPOConfig, SFTConfig, _score, bank_for_model, cosine_lr, dpo, factuality_probe,
                              reward_margin, sft, sft_batch)


@pytest.fixture(scope="module")
def bank(world, tok, tmp_path_factory):
    return MemoryBank.build(tmp_path_factory.mktemp("ft") / "bank", tiny_model(0), tok, world.references(),
                            progress=False)


@pytest.fixture(scope="module")
def examples(world):
    return sft_examples(world, 24, seed=0)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------- data
def test_sft_examples_are_deterministic_and_cover_every_kind(world):
    a, b = sft_examples(world, 200, seed=3), sft_examples(world, 200, seed=3)
    assert a == b
    assert a != sft_examples(world, 200, seed=4)
    assert {e.kind for e in a} == {"qa", "multi", "abstain", "skill"}
    real = {p.name for p in world.people}
    for e in a:
        if e.kind in ("qa", "multi"):
            p = world.person(e.person)
            assert p.split in ("memory", "text")  # heldout people are kept for the probe
            assert len(e.turns) == (1 if e.kind == "qa" else len(e.turns)) and 1 <= len(e.turns) <= 3
            assert p.name in e.turns[0][0]
            for (_, ans), attr in zip(e.turns, e.detail.split(",")):
                assert ans == answer_sentence(p.name, attr, p.attribute(attr))  # cites the fact in a sentence
        elif e.kind == "abstain":
            assert e.person is None and e.name not in real and e.name in e.turns[0][0]
            assert e.turns == ((e.turns[0][0], ABSTAIN),)
        else:
            assert e.person is None and e.name is None
    assert any(len(e.turns) > 1 for e in a)


def test_fake_names_exist_nowhere_and_probe_pool_is_disjoint(world):
    real = {p.name for p in world.people}
    train, probe = set(fake_names(world, 500, pool="train")), set(fake_names(world, 500, pool="probe"))
    assert len(train) == 500 and len(probe) == 500
    assert not (train & real) and not (probe & real) and not (train & probe)
    assert fake_names(world, 20, seed=1) == fake_names(world, 20, seed=1) != fake_names(world, 20, seed=2)
    sft_fakes = {e.name for e in sft_examples(world, 300, seed=0) if e.kind == "abstain"}
    dpo_fakes = {p.name for p in preference_pairs(world, 300, seed=0) if p.kind == "abstain"}
    unknown = probe_unknown_questions(world, 50)
    assert all(not it.exists for it in unknown)
    assert not ({it.name for it in unknown} & (sft_fakes | dpo_fakes | real))
    known = probe_known_questions(world, 20)
    assert all(world.person(it.person).split == "heldout" and it.exists for it in known)


def test_preference_pairs(world):
    pairs = preference_pairs(world, 200, seed=0)
    assert pairs == preference_pairs(world, 200, seed=0) != preference_pairs(world, 200, seed=1)
    assert {p.kind for p in pairs} == {"fact", "abstain"}
    real = {p.name for p in world.people}
    for p in pairs:
        assert p.prompt == chat_prompt(p.prompt.split("\n")[0][len("User: "):]) and p.name in p.prompt
        if p.kind == "fact":
            truth = world.person(p.person).attribute(p.attribute)
            assert p.chosen == answer_sentence(p.name, p.attribute, truth)
            wrong = asserted_values(p.rejected, p.attribute)
            assert len(wrong) == 1 and wrong[0] != truth and wrong[0] in ATTRIBUTE_VALUES[p.attribute]
        else:
            assert p.name not in real and p.chosen == ABSTAIN
            assert len(asserted_values(p.rejected, p.attribute)) == 1  # a made-up confident answer


def test_loss_mask_covers_exactly_the_answer_tokens(tok, examples):
    tokens, targets = sft_batch(tok, examples)
    for b, e in enumerate(examples):
        keep = targets[b] != -100
        answer_ids = [i for _, a in e.turns for i in tok.encode(completion(a))]
        assert targets[b][keep].tolist() == answer_ids  # every answer token, in order, and nothing else
        assert tokens[b][1:][keep[:-1]].tolist() == answer_ids  # targets are the next tokens
        prompt_ids = [i for q, _ in e.turns for i in tok.encode(chat_prompt(q))]
        n_real = int((tokens[b] != tok.pad_id).sum())
        assert n_real == 1 + len(prompt_ids) + len(answer_ids)  # <s> + prompts + answers
        ids, mask = e.encode(tok)
        assert [i for i, m in zip(ids, mask) if not m] == [tok.bos_id] + prompt_ids


# ----------------------------------------------------------------------------------------------- training
def test_cosine_schedule_has_10_percent_warmup():
    cfg = SFTConfig(steps=100, lr=1.0)
    lrs = [cosine_lr(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)


def test_sft_with_memory_lowers_the_answer_loss(tok, examples, bank):
    model = tiny_model(0)
    r = sft(model, tok, examples[:16], SFTConfig(steps=10, batch_size=8, lr=3e-3, quiet=True), bank=bank)
    assert r["steps_run"] == 10 and len(r["retrieved"]) == 16
    first, last = r["losses"][0], sum(r["losses"][-3:]) / 3
    assert last < first - 0.5, r["losses"]
    # retrieval used the prompt: the asked person's biography is among the memories of most real examples
    hits = [e.person in ids for e, ids in zip(examples[:16], r["retrieved"]) if e.person is not None]
    assert sum(hits) >= 0.8 * len(hits)


def test_sft_without_memory_and_memory_actually_read(tok, examples, bank):
    a, b = tiny_model(0), tiny_model(0)
    cfg = dict(steps=2, batch_size=4, lr=3e-3, quiet=True)
    ra = sft(a, tok, examples[:8], SFTConfig(with_memory=False, **cfg))
    rb = sft(b, tok, examples[:8], SFTConfig(**cfg), bank=bank)
    assert ra["retrieved"] is None
    assert ra["losses"][0] != rb["losses"][0]  # memory changes the very first forward pass


def test_dpo_implicit_reward_margin_grows(world, tok, bank):
    pairs = preference_pairs(world, 8, seed=0)
    policy = tiny_model(0)
    reference = copy.deepcopy(policy)
    before = params(reference)
    assert reward_margin(policy, reference, tok, pairs, bank=bank)["reward_margin"] == pytest.approx(0, abs=1e-6)
    r = dpo(policy, reference, tok, pairs, DPOConfig(steps=8, batch_size=4, lr=1e-3, quiet=True), bank=bank)
    assert abs(r["reward_margins"][0]) < 1e-5  # policy == reference at step 0
    after = reward_margin(policy, reference, tok, pairs, beta=0.01, bank=bank)
    assert after["reward_margin"] > 0.02 and after["preference_accuracy"] >= 0.75, (after, r["reward_margins"])
    assert r["losses"][-1] < r["losses"][0]
    assert all(torch.equal(v, before[k]) for k, v in reference.state_dict().items())  # reference untouched
    assert all(p.requires_grad for p in reference.parameters())  # the caller's model is not frozen in place


# ----------------------------------------------------------------------------------------------- errors
def test_bad_inputs_are_refused_with_clear_errors(world, tok, examples, bank):
    m = tiny_model(0)
    with pytest.raises(ValueError, match="needs a memory bank"):
        sft(m, tok, examples, SFTConfig(steps=1, quiet=True))
    with pytest.raises(ValueError, match="no examples"):
        sft(m, tok, [], SFTConfig(steps=1, with_memory=False, quiet=True))
    with pytest.raises(TypeError, match="not a SFTExample"):
        sft(m, tok, ["User: hi"], SFTConfig(steps=1, with_memory=False, quiet=True))
    with pytest.raises(TypeError, match="SFTConfig"):
        sft(m, tok, examples, DPOConfig(steps=1, with_memory=False))
    long = SFTExample("qa", (("word " * 300, "x"),))
    with pytest.raises(ValueError, match="max_seq_len"):
        sft(m, tok, [long], SFTConfig(steps=1, with_memory=False, quiet=True))
    for bad in (dict(steps=0), dict(lr=-1.0), dict(memory_source="disk"), dict(warmup_fraction=2.0)):
        with pytest.raises(ValueError):
            SFTConfig(**bad)
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0)
    same = PreferencePair("fact", chat_prompt("Q?"), "A.", "A.", "major")
    with pytest.raises(ValueError, match="the same"):
        dpo(m, None, tok, [same], DPOConfig(steps=1, with_memory=False, quiet=True))
    with pytest.raises(ValueError, match="same config"):
        dpo(m, tiny_model(0, n_layers=2), tok, preference_pairs(world, 2), DPOConfig(steps=1, quiet=True), bank=bank)
    with pytest.raises(ValueError, match="tokenizer has"):
        sft(tiny_model(0, vocab_size=300), tok, examples, SFTConfig(steps=1, with_memory=False, quiet=True))
    with pytest.raises(ValueError, match="heldout"):
        sft_examples(world, 5, splits=("heldout",))
    with pytest.raises(ValueError, match="pool"):
        fake_names(world, 10, pool="test")
    other = tiny_model(1)
    with pytest.raises(ValueError, match="another model"):
        factuality_probe(other, tok, world, bank=bank, n_known=2, n_unknown=2)


def test_a_diverged_step_stops_fine_tuning_as_it_stops_pretraining(world, tok, examples, tmp_path):
    """SFT and DPO share pretraining's check (`train.check_finite_step`): a NaN loss stops the run at that step, and
    no checkpoint of it is written."""
    runs = {"sft": lambda m: sft(m, tok, examples[:8], SFTConfig(steps=3, batch_size=4, with_memory=False,
                                                                  checkpoint_every=1, quiet=True), out_dir=tmp_path),
            "dpo": lambda m: dpo(m, None, tok, preference_pairs(world, 4), DPOConfig(steps=3, batch_size=4,
                                 with_memory=False, checkpoint_every=1, quiet=True), out_dir=tmp_path / "dpo")}
    for kind, run in runs.items():
        model = tiny_model(0)
        with torch.no_grad():
            model.tok_emb.weight.fill_(float("nan"))
        with pytest.raises(ValueError, match=f"training diverged at {kind} step 0: loss = nan"):
            run(model)
    assert not list(tmp_path.rglob("step-*"))


# ----------------------------------------------------------------------------------------------- resume
def test_sft_checkpoint_resume_is_exact(world, tok, examples, bank, tmp_path):
    cfg = SFTConfig(steps=6, batch_size=4, lr=3e-3, checkpoint_every=3, quiet=True)
    full = tiny_model(0)
    r_full = sft(full, tok, examples, cfg, bank=bank, out_dir=tmp_path / "a")
    b = tmp_path / "b"
    sft(tiny_model(0), tok, examples, cfg, bank=bank, out_dir=b)
    shutil.rmtree(b / "step-0000006")  # as if killed after step 3
    (b / "latest").write_text("step-0000003")
    resumed = tiny_model(0)
    r = sft(resumed, tok, examples, cfg, bank=bank, out_dir=b)
    assert r["start_step"] == 3 and r["steps_run"] == 3
    assert r["losses"] == pytest.approx(r_full["losses"][3:], abs=1e-6)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-6, rtol=0)
    log = [json.loads(l) for l in (b / "sft.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in log] == list(range(6))
    with pytest.raises(ValueError, match="different sft config"):
        sft(tiny_model(0), tok, examples, SFTConfig(steps=8, batch_size=4, lr=3e-3, quiet=True), bank=bank, out_dir=b)
    with pytest.raises(ValueError, match="not a dpo"):
        dpo(tiny_model(0), None, tok, preference_pairs(world, 4), DPOConfig(steps=2, with_memory=False, quiet=True),
            out_dir=b)


def test_dpo_resume_is_exact_and_checks_the_reference(world, tok, tmp_path):
    pairs = preference_pairs(world, 12, seed=0)
    cfg = DPOConfig(steps=4, batch_size=4, lr=1e-3, checkpoint_every=2, with_memory=False, quiet=True)
    full = tiny_model(0)
    dpo(full, None, tok, pairs, cfg, out_dir=tmp_path / "a")
    b = tmp_path / "b"
    dpo(tiny_model(0), None, tok, pairs, cfg, out_dir=b)
    shutil.rmtree(b / "step-0000004")
    (b / "latest").write_text("step-0000002")
    resumed = tiny_model(0)  # the starting weights: they define the frozen reference
    r = dpo(resumed, None, tok, pairs, cfg, out_dir=b)
    assert r["start_step"] == 2
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="reference_digest"):
        dpo(tiny_model(1), None, tok, pairs, cfg, out_dir=b)


# ----------------------------------------------------------------------------------------------- BioWorld data
@pytest.fixture(scope="module")
def bio_world():
    return BioWorld.generate(300, seed=0)


def test_sft_examples_in_a_bioworld(bio_world):
    w = bio_world
    a = sft_examples(w, 200, seed=3)
    assert a == sft_examples(w, 200, seed=3) != sft_examples(w, 200, seed=4)
    assert {e.kind for e in a} == {"qa", "multi", "abstain"}  # a BioWorld has no skill tasks
    real = {p.name for p in w.people}
    train_first = {p.first_name for p in w.people if p.split != "heldout"}
    for e in a:
        if e.kind == "abstain":
            assert e.name not in real and e.name.split()[0] in train_first and e.turns[0][1] == ABSTAIN
            continue
        p = w.people[e.person]
        assert p.split in ("memory", "text") and p.name in e.turns[0][0]
        assert any(e.turns[0][0] == t.format(N=p.name) for t in w.templates("question", "train", e.detail.split(",")[0]))
        for (_, ans), attr in zip(e.turns, e.detail.split(",")):
            assert ans == BIO_ANSWER_TEMPLATES[attr].format(name=p.name, value=getattr(p, attr))
            assert asserted_values(ans, attr, "bio") == [getattr(p, attr)]  # the scorer reads back what was taught
    assert any(len(e.turns) > 1 for e in a)
    with pytest.raises(ValueError, match="no skill tasks"):
        sft_examples(w, 5, mix={"qa": 1, "skill": 1})


def test_bioworld_fake_names_and_probe_questions(bio_world):
    """Fine-tuning's fake people are named from the training people's name pools, the probe's from the held-out
    people's: disjoint, nobody real, and as new to the tokenizer as a held-out person."""
    w = bio_world
    real = {p.name for p in w.people}
    held = [p for p in w.people if p.split == "heldout"]
    train, probe = fake_names(w, 200, pool="train"), fake_names(w, 80, pool="probe")
    assert len(set(train)) == 200 and len(set(probe)) == 80 and not (set(train) | set(probe)) & real
    assert {n.split()[0] for n in probe} <= {p.first_name for p in held}
    assert {n.split()[1] for n in probe} <= {p.last_name for p in held}
    assert not {n.split()[0] for n in train} & {p.first_name for p in held}
    assert fake_names(w, 20, seed=1, pool="probe") == fake_names(w, 20, seed=1, pool="probe") \
        != fake_names(w, 20, seed=2, pool="probe")
    with pytest.raises(ValueError, match="pool has only"):
        fake_names(w, 10 ** 6, pool="probe")
    for ph in ("train", "heldout"):
        known = probe_known_questions(w, 20, phrasing=ph)
        assert all(w.people[it.person].split == "heldout" and it.style == "bio" for it in known)
        assert all(it.answer == getattr(w.people[it.person], it.attribute) for it in known)
        unknown = probe_unknown_questions(w, 30, phrasing=ph)
        assert all(not it.exists and it.style == "bio" and it.name in it.question for it in unknown)
        assert all(any(it.question == t.format(N=it.name) for t in w.templates("question", ph, it.attribute))
                   for it in unknown)
    assert not {it.name for it in probe_unknown_questions(w, 50)} & set(train)  # disjoint pools, whatever the seeds


def test_bioworld_preference_pairs(bio_world):
    w = bio_world
    pairs = preference_pairs(w, 100, seed=0)
    assert pairs == preference_pairs(w, 100, seed=0) and {p.kind for p in pairs} == {"fact", "abstain"}
    for p in pairs:
        if p.kind == "fact":
            person = w.people[p.person]
            assert person.split != "heldout"
            assert asserted_values(p.chosen, p.attribute, "bio") == [getattr(person, p.attribute)]
            wrong = asserted_values(p.rejected, p.attribute, "bio")
            assert len(wrong) == 1 and wrong[0] != getattr(person, p.attribute)
        else:
            assert p.chosen == ABSTAIN and len(asserted_values(p.rejected, p.attribute, "bio")) == 1


def test_overcautious_pairs_reject_the_abstention_about_real_people(bio_world, world):
    for w in (bio_world, world):
        plain = preference_pairs(w, 200, seed=0)
        assert plain == preference_pairs(w, 200, seed=0, overcautious_fraction=0.0)  # the lever off: as before
        pairs = preference_pairs(w, 200, seed=0, overcautious_fraction=0.5)
        over = [p for p in pairs if p.kind == "overcautious"]
        facts = [p for p in pairs if p.kind == "fact"]
        assert 0.3 < len(over) / (len(over) + len(facts)) < 0.7
        for p in over:
            assert p.rejected == ABSTAIN and p.person is not None and p.chosen != ABSTAIN and p.name in p.chosen
        assert all(p.kind == "overcautious" for p in preference_pairs(w, 50, overcautious_fraction=1.0)
                   if p.person is not None)
    with pytest.raises(ValueError, match="overcautious_fraction"):
        preference_pairs(world, 5, overcautious_fraction=1.5)


def test_bioworld_probe_scoring():
    known = [ProbeItem("Where was Ann Lee born?", "birth_city", "Ann Lee", "Velmora", 0, "bio")] * 4
    unknown = [ProbeItem("Where was Bo Kim born?", "birth_city", "Bo Kim", None, None, "bio")] * 4
    k = _score(known, ["Ann Lee was born in Velmora.", "Ann Lee was born in Ozport.", ABSTAIN,
                       "Ann Lee was born on 3 May 1990."], "chat")
    # the fourth states a birth date, not a city: no city asserted, so not a made-up city
    assert (k["accuracy"], k["value_accuracy"], k["made_up_rate"], k["abstain_rate"]) == (0.25, 0.25, 0.25, 0.25)
    u = _score(unknown, [ABSTAIN, "Bo Kim was born in Ozport.", "Bo Kim was born in Ozport. Or Velmora.", "hmm"],
               "chat")
    assert (u["made_up_rate"], u["abstain_rate"], u["other_rate"]) == (0.5, 0.25, 0.25)
    q = _score(known[:3], ["Velmora", "Ozport", "I do not know."], "qa")  # bare values: the reply is the value
    assert (q["accuracy"], q["made_up_rate"], q["abstain_rate"]) == (1 / 3, 1 / 3, 1 / 3)
    assert asserted_values("Ann Lee studied at Royal Academy of Vel.", "major", "bio") == []
    assert asserted_values("Ann Lee majored in Art History.", "major", "bio") == ["Art History"]
    assert answer_sentence("Ann Lee", "major", "Law", "bio") == "Ann Lee majored in Law."
    with pytest.raises(ValueError, match="attribute must be one of"):
        answer_sentence("Ann Lee", "work_city", "Oslo", "bio")  # the first world's attribute, not a BioWorld's
    with pytest.raises(ValueError, match="style must be one of"):
        asserted_values("x", "major", "other")


def test_probe_splits_known_people_by_bank_biography_wording(bio_world):
    """Held-out people are told in the training wording family or in the held-out one: the probe reports each apart."""
    from mini_m3.finetune import _by_bio_family
    known = probe_known_questions(bio_world, 40, seed=1)
    fam = [bio_world.people[it.person].bio_family for it in known]
    assert set(fam) == {"train", "heldout"}
    replies = [it.answer if f == "train" else "I do not know." for it, f in zip(known, fam)]  # right on one family
    by = _by_bio_family(bio_world, known, replies, "qa")
    assert by["train"]["n"] == fam.count("train") and by["heldout"]["n"] == fam.count("heldout")
    assert (by["train"]["accuracy"], by["heldout"]["accuracy"], by["heldout"]["abstain_rate"]) == (1.0, 0.0, 1.0)
    whole = _score(known, replies, "qa")["accuracy"]
    assert whole == pytest.approx(fam.count("train") / len(fam))  # the mean that one number would report


# ----------------------------------------------------------------------------------------------- probe
def test_probe_scoring():
    known = [ProbeItem("Where was Ann Lee born?", "birth_city", "Ann Lee", "Paris", 0)] * 4
    unknown = [ProbeItem("Where was Bo Kim born?", "birth_city", "Bo Kim", None)] * 4
    k = _score(known, ["Ann Lee was born in Paris.", "Ann Lee was born in Rome.", ABSTAIN, "Paris"], "chat")
    assert (k["accuracy"], k["value_accuracy"], k["made_up_rate"], k["abstain_rate"]) == (0.25, 0.5, 0.25, 0.25)
    u = _score(unknown, [ABSTAIN, "Bo Kim was born in Oslo.", "i do not know", "hmm"], "chat")
    assert (u["made_up_rate"], u["abstain_rate"], u["other_rate"]) == (0.25, 0.5, 0.25)
    assert _score(known[:1], ["Paris"], "qa")["accuracy"] == 1.0
    assert asserted_values("Ann Lee studied Art History.", "major") == ["Art History"]  # not also "History"


def test_probe_runs_with_a_bank_for_the_tuned_model(world, tok, bank, tmp_path):
    model = tiny_model(0)
    with torch.no_grad():
        model.blocks[0].attn.wq.weight.mul_(1.01)  # "fine-tuned": the old bank no longer fits
    with pytest.raises(ValueError, match="another model"):
        factuality_probe(model, tok, world, bank=bank, n_known=2, n_unknown=2)
    own = bank_for_model(model, tok, bank, tmp_path / "own")
    assert MemoryBank.open(tmp_path / "own", model, tok).texts == bank.texts
    r = factuality_probe(model, tok, world, bank=own, n_known=4, n_unknown=4, max_new_tokens=8)
    for mode in ("memory", "none"):
        assert r[mode]["known"]["n"] == 4 and 0 <= r[mode]["unknown"]["made_up_rate"] <= 1
    assert own.cache_info()["cold_encodes"] > 0  # memories written by the tuned model itself


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_sft_then_dpo(world, tok, bank, tmp_path, capsys):
    from mini_m3.cli import main
    base = tmp_path / "base"
    save_pretrained(bank.model, base, tok)
    common = ["--n-people", "120", "--batch-size", "4", "--quiet", "--threads", "1", "--probe-questions", "2"]
    assert main(["sft", "--model", str(base), "--bank", str(bank.path), "--steps", "2", "--n-examples", "8",
                 "--out", str(tmp_path / "sft"), *common]) == 0
    s = json.loads((tmp_path / "sft/summary.json").read_text())
    assert s["kind"] == "sft" and s["config"]["with_memory"] and "memory" in s["probe"]
    assert main(["dpo", "--model", str(tmp_path / "sft/model"), "--bank", str(tmp_path / "sft/bank"), "--steps", "2",
                 "--n-pairs", "8", "--out", str(tmp_path / "dpo"), *common]) == 0
    assert (tmp_path / "dpo/model/model.safetensors").exists()
    # the demo bank does not fit the SFT model (Remark 9), and a bank of another world is refused
    assert main(["dpo", "--model", str(tmp_path / "sft/model"), "--bank", str(bank.path), "--steps", "1",
                 "--out", str(tmp_path / "x"), *common]) == 2
    assert main(["sft", "--model", str(base), "--bank", str(bank.path), "--steps", "1", "--out",
                 str(tmp_path / "y"), *common[:-2], "--n-people", "100"]) == 2
    assert "error" in capsys.readouterr().err
