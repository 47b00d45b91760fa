"""Tests for the synthetic knowledge world (mini_m3.data.world)."""

import random
import re

import pytest

from mini_m3.data import world as W
from mini_m3.data.world import (
    ATTRIBUTES, BIO_TEMPLATES, QUESTION_TEMPLATES, SKILL_KINDS, SPLITS, World, exact_match, extract_answer,
    format_qa, qa_prompt, skill_example, skill_text,
)

N_DOCS = 5000


@pytest.fixture(scope="module")
def world():
    return World.generate(2000, seed=0)


@pytest.fixture(scope="module")
def docs(world):
    return world.training_documents(N_DOCS, seed=0)


def _sentences(text):
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


# ---- pools ---------------------------------------------------------------------------------------

def test_pools_are_large_disjoint_and_prefix_free():
    assert len(W.FIRST_NAMES) >= 100 and len(W.LAST_NAMES) >= 100
    for pool in (W.CITIES, W.UNIVERSITIES, W.MAJORS, W.EMPLOYERS):
        assert len(pool) >= 20 and len(set(pool)) == len(pool)
    pools = {"first": W.FIRST_NAMES, "last": W.LAST_NAMES, "city": W.CITIES, "uni": W.UNIVERSITIES,
             "major": W.MAJORS, "employer": W.EMPLOYERS, "skill": W.SKILL_WORDS}
    words = {k: {w.lower() for v in pool for w in v.split()} for k, pool in pools.items()}
    keys = list(words)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not (words[a] & words[b]), (a, b, words[a] & words[b])
    # a full name can never occur inside another full name
    assert not [(a, b) for a in W.LAST_NAMES for b in W.LAST_NAMES if a != b and b.startswith(a)]
    for a in ATTRIBUTES:
        assert all(1 <= len(v.split()) <= 3 for v in W.ATTRIBUTE_VALUES[a])
        assert len(QUESTION_TEMPLATES[a]) >= W.N_TRAIN_QUESTION_TEMPLATES + 1
    assert len(BIO_TEMPLATES) >= 4


# ---- generation ----------------------------------------------------------------------------------

def test_determinism_same_seed():
    a, b = World.generate(300, seed=7), World.generate(300, seed=7)
    assert a.people == b.people
    assert a.references() == b.references()
    assert a.training_documents(200, seed=3) == b.training_documents(200, seed=3)
    assert a.eval_questions("memory", 20, seed=1) == b.eval_questions("memory", 20, seed=1)
    assert a.tokenizer_corpus(n_skill_texts=50) == b.tokenizer_corpus(n_skill_texts=50)


def test_different_seeds_differ():
    a, b = World.generate(300, seed=7), World.generate(300, seed=8)
    assert [p.name for p in a.people] != [p.name for p in b.people]
    assert a.training_documents(50, seed=0) != a.training_documents(50, seed=1)


def test_unique_names(world):
    names = [p.name for p in world.people]
    assert len(set(names)) == len(names) == 2000
    assert all(p.name == f"{p.first_name} {p.last_name}" for p in world.people)
    assert all(p.pid == i for i, p in enumerate(world.people))


def test_splits_disjoint_and_sized(world):
    sets = {s: {p.pid for p in world.people_in(s)} for s in SPLITS}
    assert len(sets["text"]) == 300 and len(sets["heldout"]) == 400 and len(sets["memory"]) == 1300
    assert not (sets["text"] & sets["memory"]) and not (sets["text"] & sets["heldout"])
    assert not (sets["memory"] & sets["heldout"])
    assert set().union(*sets.values()) == set(range(2000))
    s = world.summary()
    assert (s["n_text"], s["n_memory"], s["n_heldout"]) == (300, 1300, 400)
    w = World.generate(100, seed=1, text_fraction=0.0, heldout_fraction=0.5)
    assert len(w.people_in("text")) == 0 and len(w.people_in("heldout")) == 50


def test_birth_and_work_city_differ(world):
    assert all(p.birth_city != p.work_city for p in world.people)


# ---- texts ---------------------------------------------------------------------------------------

def test_biographies_mention_name_and_every_attribute(world):
    for p in world.people[:300]:
        for t in range(len(BIO_TEMPLATES)):
            bio = world.biography(p, t)
            assert p.name in bio
            for a in ATTRIBUTES:
                assert p.attribute(a) in bio, (t, a, bio)
            assert 25 <= len(bio.split()) <= 60
    refs = world.references()
    assert len(refs) == len(world.people)
    assert all(refs[p.pid] == world.biography(p, p.bio_template) for p in world.people)
    assert len({p.bio_template for p in world.people}) == len(BIO_TEMPLATES)


def test_qa_answer_is_the_attribute(world):
    p = world.people[5]
    for a in ATTRIBUTES:
        for t in range(len(QUESTION_TEMPLATES[a])):
            q, ans = world.qa(p, a, t)
            assert ans == p.attribute(a) and p.name in q and q.endswith("?")
        assert world.qa(p, a) == world.qa(p, a)  # default template is deterministic
        assert world.qa(p, a) in [world.qa(p, a, t) for t in range(W.N_TRAIN_QUESTION_TEMPLATES)]
    q, ans = world.qa(p, "major", 0)
    text = format_qa(q, ans)
    assert text.startswith(qa_prompt(q)) and text[len(qa_prompt(q)):] == " " + ans
    assert exact_match(" " + ans + "\nQ: more", ans) and not exact_match(" wrong", ans)
    assert extract_answer(" Computer Science\nfoo") == "Computer Science"


def test_eval_questions(world):
    items = world.eval_questions("heldout")
    assert len(items) == 400 * len(ATTRIBUTES)
    for it in items[:60]:
        p = world.people[it.person]
        assert p.split == "heldout" and it.answer == p.attribute(it.attribute)
        assert it.prompt == qa_prompt(it.question)
        assert it.question == QUESTION_TEMPLATES[it.attribute][W.HELDOUT_QUESTION_TEMPLATE].format(name=p.name)
    sample = world.eval_questions("memory", 50, seed=3)
    assert len(sample) == 50 and len({(i.person, i.attribute) for i in sample}) == 50
    assert sample != world.eval_questions("memory", 50, seed=4)
    train_phr = world.eval_questions("text", 10, phrasing="train")
    assert all(i.question == world.qa(i.person, i.attribute)[0] for i in train_phr)


# ---- training documents --------------------------------------------------------------------------

def test_no_heldout_person_in_training_documents(world, docs):
    text = "\n".join(d.text for d in docs)
    heldout = world.people_in("heldout")
    assert heldout
    leaked = [p.name for p in heldout if p.name in text]
    assert not leaked, leaked[:5]
    assert all(d.person is None or world.people[d.person].split != "heldout" for d in docs)
    # sanity: the search itself works (memory people do appear)
    assert sum(p.name in text for p in world.people_in("memory")) > 500


def test_memory_biographies_never_in_training_documents(world, docs):
    memory = {p.name: p for p in world.people_in("memory")}
    name_re = re.compile("|".join(re.escape(n) for n in sorted(memory, key=len, reverse=True)))
    n_checked = 0
    for d in docs:
        for name in set(name_re.findall(d.text)):
            p = memory[name]
            n_checked += 1
            for t in range(len(BIO_TEMPLATES)):
                for sent in _sentences(world.biography(p, t)):
                    assert sent not in d.text, (sent, d.text)
    assert n_checked > 1000
    for d in docs:
        if d.person is not None and world.people[d.person].split == "memory":
            assert d.kind == "qa"


def test_document_kinds_and_lengths(world, docs):
    kinds = {k: [d for d in docs if d.kind == k] for k in W.DOC_KINDS}
    assert 0.6 < len(kinds["qa"]) / N_DOCS < 0.8
    assert kinds["bio"] and kinds["skill"]
    for d in docs:
        n = len(d.text.split())
        assert 25 <= n <= 45, (n, d)
    for d in kinds["bio"]:
        assert world.people[d.person].split == "text" and world.people[d.person].name in d.text
    for d in kinds["qa"]:
        p = world.people[d.person]
        lines = d.text.split("\n")
        assert 1 <= len(lines) <= len(ATTRIBUTES)
        asked = d.detail.split(",")
        assert len(asked) == len(lines) == len(set(asked))
        for line, a in zip(lines, asked):
            m = re.fullmatch(r"Q: (.+\?) A: (.+)", line)
            assert m and p.name in m.group(1) and m.group(2) == p.attribute(a)
            # never the evaluation-only phrasing
            assert m.group(1) != QUESTION_TEMPLATES[a][W.HELDOUT_QUESTION_TEMPLATE].format(name=p.name)
        # one person per QA document
        others = [q for q in world.people if q.name in d.text and q.pid != p.pid]
        assert not others
    assert {d.detail for d in kinds["skill"]} == set(SKILL_KINDS)


def test_mix_and_qa_splits(world):
    only_qa = world.training_documents(300, seed=1, mix={"qa": 1.0}, qa_splits=("memory",))
    assert all(d.kind == "qa" and world.people[d.person].split == "memory" for d in only_qa)
    only_skill = world.training_documents(100, seed=1, mix={"skill": 1}, skill_kinds=("copy",))
    assert all(d.kind == "skill" and d.detail == "copy" for d in only_skill)


# ---- skills --------------------------------------------------------------------------------------

def test_skill_texts_are_correct():
    rng = random.Random(0)
    for _ in range(200):
        for kind in SKILL_KINDS:
            prompt, target = skill_example(rng, kind)
            text = f"{prompt} {target}"
            assert 25 <= len(text.split()) <= 45, (kind, text)
            if kind in ("copy", "reverse"):
                m = re.fullmatch(r"Words: (.+)\n(Copy|Reverse): (.+)", text)
                words, out = m.group(1).split(), m.group(3).split()
                assert out == (words if kind == "copy" else words[::-1])
            elif kind == "arithmetic":
                lines = text.split("\n")
                assert len(lines) >= 5
                for line in lines:
                    a, b, c = map(int, re.fullmatch(r"(\d+) \+ (\d+) = (\d+)", line).groups())
                    assert a + b == c
            elif kind == "sort":
                m = re.fullmatch(r"Numbers: (.+)\nSorted: (.+)", text)
                nums, out = list(map(int, m.group(1).split())), list(map(int, m.group(2).split()))
                assert out == sorted(nums)
            elif kind == "induction":
                m = re.fullmatch(r"Pairs: (.+)\nRecall: (.+)", text)
                pairs = dict(p.split(" -> ") for p in m.group(1).split(", "))
                recall = [p.split(" -> ") for p in m.group(2).split(", ")]
                assert len(pairs) == len(m.group(1).split(", ")) >= 5  # keys are distinct
                assert all(pairs[k] == v for k, v in recall) and len(recall) >= 3
    assert skill_text(random.Random(5), "copy") == skill_text(random.Random(5), "copy")


# ---- persistence, corpus, validation -------------------------------------------------------------

def test_json_roundtrip(tmp_path, world):
    w2 = World.from_json(world.to_json())
    assert w2 == world and w2.references() == world.references()
    assert w2.training_documents(100, seed=2) == world.training_documents(100, seed=2)
    path = tmp_path / "world.json"
    world.save(path)
    assert World.load(path) == world


def test_tokenizer_corpus_covers_everyone():
    w = World.generate(50, seed=2)
    corpus = "\n".join(w.tokenizer_corpus(n_skill_texts=20))
    assert all(p.name in corpus for p in w.people)
    assert all(w.biography(p, t) in corpus for p in w.people for t in range(len(BIO_TEMPLATES)))


@pytest.mark.parametrize("kwargs, field", [
    ({"n_people": 0}, "n_people"),
    ({"n_people": W.MAX_PEOPLE + 1}, "n_people"),
    ({"n_people": 10.5}, "n_people"),
    ({"heldout_fraction": -0.1}, "heldout_fraction"),
    ({"text_fraction": 1.5}, "text_fraction"),
    ({"text_fraction": 0.6, "heldout_fraction": 0.6}, "text_fraction"),
    ({"seed": -1}, "seed"),
])
def test_generate_validation(kwargs, field):
    kwargs = {"n_people": 100, **kwargs}
    with pytest.raises(ValueError, match=field):
        World.generate(**kwargs)


def test_other_validation(world):
    with pytest.raises(ValueError, match="mix"):
        world.training_documents(10, mix={"poems": 1.0})
    with pytest.raises(ValueError, match="qa_splits"):
        world.training_documents(10, qa_splits=("heldout",))
    with pytest.raises(ValueError, match="n_docs"):
        world.training_documents(-1)
    with pytest.raises(ValueError, match="mix"):
        World.generate(100, text_fraction=0.0).training_documents(10)
    with pytest.raises(ValueError, match="split"):
        world.eval_questions("train")
    with pytest.raises(ValueError, match="attribute"):
        world.qa(0, "hair_color")
    with pytest.raises(ValueError, match="template"):
        world.biography(0, len(BIO_TEMPLATES))
    with pytest.raises(ValueError, match="kind"):
        skill_text(random.Random(0), "poetry")
    with pytest.raises(ValueError, match="n"):
        world.eval_questions("heldout", n=10**6)


def test_reading_documents_are_about_fictitious_people(world):
    """Reading comprehension: a made-up person's biography then one question whose answer is in it."""
    docs = world.training_documents(200, seed=3, mix={"reading": 1.0})
    assert all(d.kind == "reading" and d.person is None for d in docs)
    for d in docs:
        bio, qa = d.text.rsplit("\n", 1)
        m = re.fullmatch(r"Q: (.+\?) A: (.+)", qa)
        assert m and m.group(2) in bio and d.detail in ATTRIBUTES
        assert len(d.text.split()) <= W.READING_MAX_WORDS
        assert not [p for p in world.people if p.name in d.text]  # nobody of the world
    assert len({d.text.split(" ")[0] for d in docs}) > 20  # many different names / templates
    assert docs == world.training_documents(200, seed=3, mix={"reading": 1.0})


def test_group_lookalikes_reorders_into_runs_that_share_a_name(world):
    docs = world.training_documents(3000, seed=3, mix={"qa": 0.6, "bio": 0.2, "skill": 0.2})
    out = world.group_lookalikes(docs, 5, seed=1)
    assert sorted(map(id, out)) == sorted(map(id, docs))  # the same documents, nothing lost or repeated
    assert out == world.group_lookalikes(docs, 5, seed=1)  # deterministic
    assert out != docs
    runs = [out[i:i + 5] for i in range(0, len(out), 5)]
    about = [[world.people[d.person] for d in r if d.person is not None] for r in runs]
    in_shared = sum(len(ps) for ps in about if len(ps) == 5 and (
        len({p.first_name for p in ps}) == 1 or len({p.last_name for p in ps}) == 1))
    assert in_shared > 0.7 * sum(d.person is not None for d in docs)  # most share a first or a last name
    in_random = sum(len({world.people[d.person].last_name for d in r}) == 1
                    for r in (docs[i:i + 5] for i in range(0, len(docs), 5)) if all(d.person is not None for d in r))
    assert in_random < 0.05 * len(docs) / 5  # unlike the original order
    with pytest.raises(ValueError, match="group_size"):
        world.group_lookalikes(docs, 0)
