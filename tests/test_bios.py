"""The reading world (mini_m3.data.bios): held-out means held out, look-alikes exist, wordings come in families."""

import re

import pytest

from mini_m3.data.bios import (ATTRIBUTES, INTRO_TEMPLATES, OTHER_STYLE_FIRST, QUESTION_TEMPLATES,
                               SENTENCE_TEMPLATES, WIDE_INTRO_TEMPLATES, WIDE_QUESTION_TEMPLATES,
                               WIDE_SENTENCE_TEMPLATES, BioWorld, wording_templates)
from mini_m3.data.world import exact_match


@pytest.fixture(scope="module")
def world():
    return BioWorld.generate(800, seed=3)


@pytest.fixture(scope="module")
def docs(world):
    return world.training_documents(3000, seed=3)


def _pattern(template: str) -> re.Pattern:
    """A template as a regex: each placeholder matches a run of words (no sentence end)."""
    parts = re.split(r"\{[A-Za-z]\}", template)
    return re.compile(r"[^.?\n]+?".join(re.escape(p) for p in parts))


def test_heldout_people_names_and_values_never_reach_training_text_or_tokenizer(world, docs):
    corpus = " ".join(world.tokenizer_corpus(docs))
    assert all(d.person is None or world.people[d.person].split != "heldout" for d in docs)
    held = world.people_in("heldout")
    words = {w for p in held for w in (p.first_name, p.last_name)}
    words |= {p.birth_city for p in held} | {p.employer.split()[0] for p in held}
    seen = set(re.findall(r"[A-Za-z]+", corpus))
    assert words and not (words & seen), sorted(words & seen)[:5]
    assert not set(OTHER_STYLE_FIRST) & seen


def test_heldout_wordings_never_in_training_text(world, docs):
    corpus = "\n".join(world.tokenizer_corpus(docs))
    held = [t for a in ATTRIBUTES for t in SENTENCE_TEMPLATES["heldout"][a] + QUESTION_TEMPLATES["heldout"][a]]
    held += list(INTRO_TEMPLATES["heldout"])
    assert len(held) > 20
    assert [t for t in held if _pattern(t).search(corpus)] == []
    # the training families do appear (the check is not vacuous)
    assert all(_pattern(t).search(corpus) for t in QUESTION_TEMPLATES["train"]["employer"])


def test_lookalikes_share_names_and_full_names_are_unique(world):
    people = world.people_in("memory") + world.people_in("text")
    from collections import Counter
    first, last = Counter(p.first_name for p in people), Counter(p.last_name for p in people)
    shared = [p for p in people if first[p.first_name] > 1 or last[p.last_name] > 1]
    assert len(shared) > 0.8 * len(people)  # most people have a look-alike
    assert len({p.name for p in world.people}) == len(world.people)


def test_biographies_hold_every_fact_and_answers_are_spans(world):
    for p in world.people[:50]:
        for seed in range(3):
            bio = world.biography(p, seed=seed)
            assert p.name in bio and all(getattr(p, a) in bio for a in ATTRIBUTES)
    q, a = world.qa(world.people[0], "employer", template=0)
    assert len(a.split()) >= 2 and exact_match(" " + a, a)


def test_bank_biography_fits_or_errors(world):
    p = world.people[0]
    short = world.bank_biography(p, fits=lambda t: len(t) < 10_000)
    assert short == world.biography(p, seed=0)
    limit = min(len(world.biography(p, seed=s)) for s in range(64))
    assert len(world.bank_biography(p, fits=lambda t: len(t) <= limit)) <= limit
    with pytest.raises(ValueError, match="fits"):
        world.bank_biography(p, fits=lambda t: False)


def test_eval_questions_axes(world):
    items = world.eval_questions("heldout", 30, seed=1, question_family="heldout", bio_family="heldout")
    by_pid = {p.pid: p for p in world.people}
    assert all(by_pid[it.person].bio_family == "heldout" and by_pid[it.person].split == "heldout" for it in items)
    held_q = {t.format(N=by_pid[it.person].name) for it in items for t in QUESTION_TEMPLATES["heldout"][it.attribute]}
    assert all(it.question in held_q for it in items)
    assert all(it.answer == getattr(by_pid[it.person], it.attribute) for it in items)


def test_deterministic_and_round_trip(world):
    again = BioWorld.generate(800, seed=3)
    assert again.people == world.people
    assert BioWorld.from_json(world.to_json()).people == world.people
    assert BioWorld.generate(800, seed=4).people != world.people
    with pytest.raises(ValueError, match="not a mini_m3 BioWorld"):
        BioWorld.from_json('{"format": "x"}')
    for bad in ("[1]", "{not json"):
        with pytest.raises(ValueError):
            BioWorld.from_json(bad)


def test_save_and_load(world, tmp_path):
    world.save(tmp_path / "w.json")
    assert BioWorld.load(tmp_path / "w.json").people == world.people


def test_other_style_people_are_new(world):
    others = world.other_style_people(10)
    assert [p.pid for p in others] == list(range(len(world), len(world) + 10))
    assert not {p.name for p in others} & {p.name for p in world.people}


@pytest.mark.parametrize("bad", [dict(n_people=5), dict(text_fraction=0.6, heldout_fraction=0.5),
                                 dict(seed=-1), dict(heldout_fraction=True), dict(name_share=0),
                                 dict(value_share=1.5)])
def test_bad_settings(bad):
    with pytest.raises(ValueError):
        BioWorld.generate(**{"n_people": 100, **bad})


def _words(templates) -> set[str]:
    return {w.lower() for t in templates for w in re.findall(r"[A-Za-z]+", re.sub(r"\{[A-Za-z]\}", " ", t))}


def _family(wordings: str, family: str) -> list[str]:
    return [t for kind in ("sentence", "question") for a in ATTRIBUTES
            for t in wording_templates(wordings, kind, family, a)] + list(wording_templates(wordings, "intro", family))


def test_wide_wordings_add_training_templates_that_share_no_word_of_the_heldout_family():
    held_only = _words(_family("base", "heldout")) - _words(_family("base", "train"))
    assert {"hails", "salary", "diploma"} <= held_only
    extra = set(_family("wide", "train")) - set(_family("base", "train"))
    assert len(extra) == len(WIDE_INTRO_TEMPLATES) + sum(map(len, WIDE_SENTENCE_TEMPLATES.values())) + sum(
        map(len, WIDE_QUESTION_TEMPLATES.values())) > 60
    assert _words(extra) & held_only == set()
    assert not [t for t in extra if t.startswith("{N}") and t.endswith("?")]  # the held-out questions' frame
    assert _family("wide", "heldout") == _family("base", "heldout")


def test_wide_world_same_people_more_wordings_heldout_still_unseen():
    base, wide = BioWorld.generate(400, seed=5), BioWorld.generate(400, seed=5, wordings="wide")
    assert wide.people == base.people and wide.summary()["n_sentence_templates"]["train"] > 2 * 25
    assert BioWorld.from_json(wide.to_json()).wordings == "wide" and base.wordings == "base"
    assert "wordings" not in base.config  # a base world's JSON is unchanged
    docs = wide.training_documents(3000, seed=5)
    corpus = "\n".join(wide.tokenizer_corpus(docs))
    assert [t for t in _family("base", "heldout") if _pattern(t).search(corpus)] == []
    used = [t for t in set(_family("wide", "train")) - set(_family("base", "train")) if _pattern(t).search(corpus)]
    assert len(used) > 50  # the new wordings are in the training text
    assert wide.eval_questions("heldout", 50, question_family="heldout") == base.eval_questions(
        "heldout", 50, question_family="heldout")
    for bad in ("broad", ""):
        with pytest.raises(ValueError, match="wordings"):
            BioWorld.generate(400, seed=5, wordings=bad)
    with pytest.raises(ValueError, match="wordings"):
        BioWorld(base.people, seed=5, config={"wordings": "x"})


def test_compositional_wordings_are_hundreds_of_training_templates_that_share_no_word_of_the_heldout_family():
    held_only = _words(_family("base", "heldout")) - _words(_family("base", "train"))
    comp, wide = _family("compositional", "train"), _family("wide", "train")
    assert set(wide) < set(comp) and len(comp) == len(set(comp)) > 5 * len(wide)
    assert _words(set(comp) - set(wide)) & held_only == set()
    assert not [t for t in comp if t.startswith("{N}") and t.endswith("?")]  # the held-out questions' frame
    assert _family("compositional", "heldout") == _family("base", "heldout")
    for a in ATTRIBUTES:
        sentences = wording_templates("compositional", "sentence", "train", a)
        assert len(sentences) > 100 and all(t.count("{v}") == 1 and (t[0].isupper() or t[0] == "{") for t in sentences)
        questions = wording_templates("compositional", "question", "train", a)
        assert len(questions) > 40 and all(t.count("{N}") == 1 for t in questions)
    with pytest.raises(ValueError, match="kind"):
        wording_templates("compositional", "title", "train")


def test_compositional_world_tells_biographies_in_new_wordings_and_keeps_heldout_unseen():
    base, comp = BioWorld.generate(400, seed=5), BioWorld.generate(400, seed=5, wordings="compositional")
    assert comp.people == base.people and BioWorld.from_json(comp.to_json()).wordings == "compositional"
    p = comp.people_in("memory")[0]
    bio = comp.biography(p, seed=7)
    assert all(v in bio for v in p.facts().values()) and "{" not in bio and ". ." not in bio
    sentences = [x for x in re.split(r"(?<=\.) (?=[A-Z0-9])", bio)]
    assert all(x[0].isupper() or x[0].isdigit() for x in sentences), sentences
    docs = comp.training_documents(3000, seed=5)
    corpus = "\n".join(comp.tokenizer_corpus(docs))
    assert [t for t in _family("base", "heldout") if _pattern(t).search(corpus)] == []
    used = [t for t in set(_family("compositional", "train")) - set(_family("wide", "train"))
            if _pattern(t).search(corpus)]
    assert len(used) > 300  # the new wordings are in the training text
    assert comp.eval_questions("heldout", 50, question_family="heldout", bio_family="heldout") == base.eval_questions(
        "heldout", 50, question_family="heldout", bio_family="heldout")
    told_heldout = [q for q in comp.people_in("heldout") if q.bio_family == "heldout"]  # the new-bio-wording axis
    assert told_heldout and comp.references(people=told_heldout) == base.references(people=told_heldout)


def test_neutral_wordings_tell_a_share_of_facts_only_by_the_value_and_keep_heldout_unseen():
    from mini_m3.data.bios import NEUTRAL_SENTENCE_TEMPLATES, NEUTRAL_SHARE
    held_only = _words(_family("base", "heldout")) - _words(_family("base", "train"))
    assert _words(NEUTRAL_SENTENCE_TEMPLATES) & held_only == set()
    assert set(_family("neutral", "train")) == set(_family("compositional", "train")) | set(NEUTRAL_SENTENCE_TEMPLATES)
    assert _family("neutral", "heldout") == _family("base", "heldout")
    comp, neutral = (BioWorld.generate(400, seed=5, wordings=w) for w in ("compositional", "neutral"))
    assert neutral.people == comp.people and BioWorld.from_json(neutral.to_json()).wordings == "neutral"
    neutral_re = [_pattern(t) for t in NEUTRAL_SENTENCE_TEMPLATES]
    n_sent = n_neutral = 0
    for p in neutral.people_in("memory")[:150]:
        bio = neutral.biography(p)
        assert all(v in bio for v in p.facts().values()) and "{" not in bio
        sentences = re.split(r"(?<=\.) (?=[A-Z0-9])", bio)[1:]  # after the introduction
        n_sent += len(sentences)
        n_neutral += sum(any(r.fullmatch(x) for r in neutral_re) for x in sentences)
        assert not any(r.search(comp.biography(p)) for r in neutral_re)  # the compositional world has none
    assert abs(n_neutral / n_sent - NEUTRAL_SHARE) < 0.08, (n_neutral, n_sent)
    told_heldout = [q for q in neutral.people_in("heldout") if q.bio_family == "heldout"]  # new-bio-wording axis
    assert told_heldout and neutral.references(people=told_heldout) == comp.references(people=told_heldout)
    corpus = "\n".join(neutral.tokenizer_corpus(neutral.training_documents(2000, seed=5)))
    assert [t for t in _family("base", "heldout") if _pattern(t).search(corpus)] == []
