"""§6 fine-tuning data at mini scale: SFT conversations and DPO preference pairs built from the knowledge World.

The paper fine-tunes on public chat/instruction sets plus synthetic "multi-round chat", "commonsense" and
"knowledge" data (Table 15), then aligns with DPO (§6.2). We cannot use those sets on a 2M-parameter model
trained on a synthetic world, so we generate their counterparts from the world itself
(:class:`mini_m3.data.world.World`), deterministically from a seed.

**Chat format** (plain text, no special tokens besides the leading ``<s>``)::

    User: Where was Alice Smith born?
    Assistant: Alice Smith was born in Paris.
    User: And which company does she work for?
    Assistant: Alice Smith works for Google.

One turn is ``"User: {question}\\nAssistant:"`` (the prompt, never in the loss) followed by
``" {answer}\\n"`` (the completion, in the loss: the leading space, the answer and the newline that ends
it, so the model learns to stop). :func:`chat_prompt` and :func:`completion` build the two pieces; the
text of a conversation is the concatenation of all of them. Each piece is tokenized on its own
(:meth:`SFTExample.encode`), so the answer span is exact in token space.

**Kinds of SFT examples** (:func:`sft_examples`):

* ``"qa"``: one turn about one person; the answer cites the attribute in a sentence
  (:func:`answer_sentence`, e.g. ``"Alice Smith was born in Paris."``).
* ``"multi"``: 2..``max_turns`` turns about one person; the first question names the person, the
  follow-ups use the pronoun (:data:`FOLLOWUP_TEMPLATES`); answers always name the person.
* ``"abstain"``: a question about a person who exists nowhere (a name assembled from the world's name
  pools that no person of the world has, :func:`fake_names`); the answer is :data:`ABSTAIN`.
* ``"skill"``: an abstract-skill task (:func:`mini_m3.data.world.skill_example`): the skill prompt is the
  user turn and its target the answer.

Every example knows the person it is about (``person`` = pid, None for fake people and skills) and its
retrieval query (``query``: the first prompt, before any answer). People come from the ``memory`` and
``text`` splits only; ``heldout`` people are kept for the factuality probe.

**Fake names** are partitioned once and for all into a training pool (used by SFT and DPO) and a probe
pool (used by :func:`probe_unknown_questions`) by a hash of the name, so the probe never asks about a
fake person seen in fine-tuning, whatever the seeds.

**Preference pairs** (:func:`preference_pairs`): same prompt, a *chosen* and a *rejected* completion.
For a real person: chosen = the true attribute (supported by the biography in the bank), rejected = a
plausible wrong value from the same pool. For a fake person: chosen = :data:`ABSTAIN`, rejected = a
made-up confident answer. With ``overcautious_fraction`` > 0 (a lever), some real-person pairs reject
"I do not know." instead of a wrong value.

**Either world.** Every function takes the first world (:class:`~mini_m3.data.world.World`) or the reading world
(:class:`~mini_m3.data.bios.BioWorld`, the flagship's). In a BioWorld: answers use :data:`BIO_ANSWER_TEMPLATES`;
questions its training question wordings (the probe: its held-out wordings, or training ones); it has no skill
tasks (:data:`BIO_SFT_MIX`); values are generated, so a wrong or made-up value is another training person's; and
fake names combine the first and last names of one name pool: the training people's for fine-tuning, the held-out
people's for the probe (the two pools are disjoint, so no name is shared, and a probe's fake name is as new to the
tokenizer as a held-out person's). A reply asserts a value when it states one in the attribute's answer sentence
(chat), or is any non-empty reply that is not an abstention (the bare "Q: ... A:" format): generated values cannot
be listed as the first world's can. A :class:`ProbeItem` knows its world (``style``).
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .bios import ATTRIBUTES as BIO_ATTRIBUTES
from .bios import BioPerson, BioWorld
from .world import (ATTRIBUTE_VALUES, ATTRIBUTES, FEMALE_FIRST_NAMES, FIRST_NAMES, HELDOUT_QUESTION_TEMPLATE,
                    LAST_NAMES, N_TRAIN_QUESTION_TEMPLATES, QUESTION_TEMPLATES, SKILL_KINDS, World, skill_example)

USER = "User:"
ASSISTANT = "Assistant:"
#: The fixed answer to a question about someone the model cannot know about.
ABSTAIN = "I do not know."

#: How an answer cites the attribute: always the full name, then the value.
ANSWER_TEMPLATES: dict[str, str] = {
    "birth_year": "{name} was born in {value}.",
    "birth_city": "{name} was born in {value}.",
    "university": "{name} studied at {value}.",
    "major": "{name} studied {value}.",
    "employer": "{name} works for {value}.",
    "work_city": "{name} works in {value}.",
}
#: Follow-up questions of a multi-turn conversation (the person is named only in the first turn).
FOLLOWUP_TEMPLATES: dict[str, str] = {
    "birth_year": "And when was {he} born?",
    "birth_city": "And where was {he} born?",
    "university": "Which university did {he} attend?",
    "major": "What did {he} study?",
    "employer": "Which company does {he} work for?",
    "work_city": "Which city does {he} work in?",
}
SFT_KINDS: tuple[str, ...] = ("qa", "multi", "abstain", "skill")
DEFAULT_SFT_MIX: dict[str, float] = {"qa": 0.35, "multi": 0.3, "abstain": 0.2, "skill": 0.15}
#: The same, in a BioWorld (:mod:`mini_m3.data.bios`): its facts, as sentences that name the person.
BIO_ANSWER_TEMPLATES: dict[str, str] = {
    "birth_date": "{name} was born on {value}.",
    "birth_city": "{name} was born in {value}.",
    "university": "{name} studied at {value}.",
    "major": "{name} majored in {value}.",
    "employer": "{name} works for {value}.",
}
BIO_FOLLOWUP_TEMPLATES: dict[str, str] = {
    "birth_date": "And when was {he} born?",
    "birth_city": "And where was {he} born?",
    "university": "Which university did {he} attend?",
    "major": "What did {he} study?",
    "employer": "Which company does {he} work for?",
}
#: A BioWorld has no skill tasks: its default mix is the facts and the abstentions.
BIO_SFT_MIX: dict[str, float] = {"qa": 0.4, "multi": 0.35, "abstain": 0.25}
STYLES: tuple[str, ...] = ("world", "bio")  # ProbeItem.style: which world's answer sentences
FAKE_POOLS: tuple[str, ...] = ("train", "probe")
PROBE_POOL_SHARE = 4  # one fake name in 4 (by hash) is reserved for the probe

# stream ids so the same seed gives independent draws for each product
_STREAM_SFT, _STREAM_DPO, _STREAM_PROBE = 11, 12, 13


# --------------------------------------------------------------------------------------------------
# text pieces
# --------------------------------------------------------------------------------------------------
def chat_prompt(question: str) -> str:
    """One user turn and the assistant tag: ``"User: {question}\\nAssistant:"`` (never in the loss)."""
    return f"{USER} {question}\n{ASSISTANT}"


def completion(answer: str) -> str:
    """The text the assistant writes after :func:`chat_prompt`: ``" {answer}\\n"`` (in the loss)."""
    return f" {answer}\n"


def extract_reply(generated: str) -> str:
    """The assistant's reply in a generated continuation of :func:`chat_prompt`: the first line, stripped."""
    return generated.split("\n", 1)[0].strip()


def _answer_templates(style: str) -> dict[str, str]:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    return ANSWER_TEMPLATES if style == "world" else BIO_ANSWER_TEMPLATES


def answer_sentence(name: str, attribute: str, value: str, style: str = "world") -> str:
    """The sentence that answers a question about ``attribute`` of ``name``: e.g. "Alice Smith works in Paris.".
    ``style`` "bio": a BioWorld's (:data:`BIO_ANSWER_TEMPLATES`)."""
    templates = _answer_templates(style)
    if attribute not in templates:
        raise ValueError(f"attribute must be one of {tuple(templates)}, got {attribute!r}")
    return templates[attribute].format(name=name, value=value)


def question_for(name: str, attribute: str, template: int) -> str:
    """The world's question ``template`` about ``attribute``, asked about any name (real or fake)."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    templates = QUESTION_TEMPLATES[attribute]
    if isinstance(template, bool) or not isinstance(template, (int, np.integer)) or not 0 <= template < len(templates):
        raise ValueError(f"template must be in [0, {len(templates)}), got {template!r}")
    return templates[int(template)].format(name=name)


# one alternation per pool, longest value first, so "Art History" is read as one value, not also "History"
_VALUE_RES = {a: re.compile(r"(?<![\w])(" + "|".join(re.escape(v) for v in sorted(set(vals), key=len, reverse=True))
                            + r")(?![\w])") for a, vals in ATTRIBUTE_VALUES.items()}


# a BioWorld value is whatever follows the attribute's verb in its answer sentence, up to the full stop (no
# generated value holds one); "studied at" and "majored in", "born on" and "born in" tell the attributes apart
_BIO_VALUE_RES = {a: re.compile(r"(?<![\w])" + re.escape(t.split("{name} ", 1)[1].split(" {value}", 1)[0])
                                + r" ([^.\n]+)") for a, t in BIO_ANSWER_TEMPLATES.items()}


def asserted_values(reply: str, attribute: str, style: str = "world", fmt: str = "chat") -> list[str]:
    """Distinct values of ``attribute`` that ``reply`` states, in order of appearance.

    First world (``style`` "world"): values of the attribute's pool (whole words; a value inside a longer value,
    like "History" in "Art History", is not counted). BioWorld ("bio"): generated values cannot be listed, so in the
    chat format a value is what follows the attribute's verb in :data:`BIO_ANSWER_TEMPLATES` ("... was born on
    {value}."), and in the bare "Q: ... A:" format (``fmt`` "qa") the whole reply is the value unless it is empty or
    an abstention."""
    templates = _answer_templates(style)
    if attribute not in templates:
        raise ValueError(f"attribute must be one of {tuple(templates)}, got {attribute!r}")
    if style == "world":
        return list(dict.fromkeys(m.group(1) for m in _VALUE_RES[attribute].finditer(reply)))
    if fmt == "qa":
        value = reply.strip()
        return [] if not value or is_abstention(value) else [value]
    return list(dict.fromkeys(m.group(1).strip() for m in _BIO_VALUE_RES[attribute].finditer(reply)))


def is_abstention(reply: str) -> bool:
    """True if the reply is the abstention phrase (:data:`ABSTAIN`, case- and space-insensitive)."""
    return " ".join(reply.split()).lower().startswith(ABSTAIN.lower().rstrip("."))


# --------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SFTExample:
    """A conversation: ``turns`` = ((question, answer), ...). ``person`` is the pid asked about (None for a
    fake person or a skill task), ``name`` the name asked about (fake names included), ``detail`` the asked
    attributes (comma-separated) or the skill kind."""

    kind: str
    turns: tuple[tuple[str, str], ...]
    person: int | None = None
    name: str | None = None
    detail: str = ""

    def segments(self) -> list[tuple[str, bool]]:
        """The text as ``(piece, is_answer)`` pairs: prompt, completion, prompt, completion, ..."""
        out = []
        for q, a in self.turns:
            out.append((chat_prompt(q), False))
            out.append((completion(a), True))
        return out

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments())

    @property
    def query(self) -> str:
        """Retrieval query: the first prompt (no answer ever reaches the retriever)."""
        return chat_prompt(self.turns[0][0])

    def encode(self, tokenizer) -> tuple[list[int], list[bool]]:
        """Token ids (``<s>`` first) and, per token, whether it belongs to an answer (the loss mask).
        Each segment is tokenized alone, so the mask is exact."""
        ids, mask = [tokenizer.bos_id], [False]
        for piece, is_answer in self.segments():
            t = tokenizer.encode(piece)
            ids.extend(t)
            mask.extend([is_answer] * len(t))
        return ids, mask


@dataclass(frozen=True)
class PreferencePair:
    """A DPO pair: ``prompt`` (a :func:`chat_prompt`) and two answers; the completions are
    :func:`completion` of ``chosen`` / ``rejected``. ``kind`` is ``"fact"``, ``"abstain"`` or ``"overcautious"``."""

    kind: str
    prompt: str
    chosen: str
    rejected: str
    attribute: str
    person: int | None = None
    name: str | None = None

    @property
    def query(self) -> str:
        return self.prompt


@dataclass(frozen=True)
class ProbeItem:
    """A factuality-probe question. ``answer`` is the true value (None: the person does not exist)."""

    question: str
    attribute: str
    name: str
    answer: str | None
    person: int | None = None
    style: str = "world"  # the world it is about: "world" (World) or "bio" (BioWorld), see asserted_values

    @property
    def exists(self) -> bool:
        return self.answer is not None


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _rng(world: World, stream: int, seed: int) -> random.Random:
    state = np.random.SeedSequence([world.seed, stream, seed]).generate_state(2, dtype=np.uint32)
    return random.Random(int(state[0]) << 32 | int(state[1]))


def _check_count(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{field} must be a non-negative int, got {value!r}")
    return int(value)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _people(world: World, splits: Iterable[str]):
    splits = tuple(splits)
    if not splits:
        raise ValueError("splits must name at least one of 'memory', 'text'")
    for s in splits:
        if s not in ("memory", "text"):
            raise ValueError(f"fine-tuning data may use only 'memory' and 'text' people (heldout people are kept "
                             f"for the factuality probe), got {s!r}")
    people = tuple(p for s in dict.fromkeys(splits) for p in world.people_in(s))
    if not people:
        raise ValueError(f"the world has no people in splits {splits}")
    return people


def _pronoun(person) -> str:
    if isinstance(person, BioPerson):
        return "she" if person.female else "he"
    return "she" if person.first_name in FEMALE_FIRST_NAMES else "he"


def _style(world) -> str:
    return "bio" if isinstance(world, BioWorld) else "world"


def _attributes(world) -> tuple[str, ...]:
    return BIO_ATTRIBUTES if isinstance(world, BioWorld) else ATTRIBUTES


def _fact(person, attribute: str) -> str:
    """A person's value of one attribute, in either world."""
    return getattr(person, attribute) if isinstance(person, BioPerson) else person.attribute(attribute)


def _n_question_templates(world, attribute: str, family: str = "train") -> int:
    if isinstance(world, BioWorld):
        return len(world.templates("question", family, attribute))
    return N_TRAIN_QUESTION_TEMPLATES


def _question(world, name: str, attribute: str, template: int, family: str = "train") -> str:
    if isinstance(world, BioWorld):
        return world.templates("question", family, attribute)[template].format(N=name)
    return question_for(name, attribute, HELDOUT_QUESTION_TEMPLATE if family == "heldout" else template)


def _value_pool(world, attribute: str) -> list[str]:
    """The values a wrong or made-up answer draws from: the attribute's pool (World), or the values of the people
    fine-tuning may use (BioWorld: its values are generated, so another training person's)."""
    if isinstance(world, BioWorld):
        return sorted({getattr(p, attribute) for s in ("memory", "text") for p in world.people_in(s)})
    return list(ATTRIBUTE_VALUES[attribute])


def _fake_pool(name: str) -> str:
    return "probe" if zlib.crc32(name.encode()) % PROBE_POOL_SHARE == 0 else "train"


def fake_names(world: World, n: int, *, seed: int = 0, pool: str = "train") -> list[str]:
    """``n`` distinct ``"First Last"`` names from the world's name pools that no person of ``world`` has.

    Names are split once into a ``"train"`` pool (SFT and DPO) and a ``"probe"`` pool (one in
    :data:`PROBE_POOL_SHARE`, by a hash of the name) so the two never share a name. Deterministic."""
    n = _check_count(n, "n")
    seed = _check_seed(seed)
    if pool not in FAKE_POOLS:
        raise ValueError(f"pool must be one of {FAKE_POOLS}, got {pool!r}")
    real = {p.name for p in world.people}
    if isinstance(world, BioWorld):
        return _bio_fake_names(world, n, seed, pool, real)
    candidates = [f"{f} {l}" for f in FIRST_NAMES for l in LAST_NAMES]
    candidates = [c for c in candidates if c not in real and _fake_pool(c) == pool]
    if n > len(candidates):
        raise ValueError(f"asked for {n} fake names but the {pool!r} pool has only {len(candidates)}")
    return _rng(world, _STREAM_PROBE if pool == "probe" else _STREAM_SFT, seed).sample(candidates, n)


def _bio_fake_names(world: BioWorld, n: int, seed: int, pool: str, real: set[str]) -> list[str]:
    """A BioWorld's fake names: a first and a last name of one pool (training people's for "train", held-out
    people's for "probe") that no person has, drawn without replacement."""
    people = world.people_in("heldout") if pool == "probe" else world.people_in("memory") + world.people_in("text")
    firsts, lasts = sorted({p.first_name for p in people}), sorted({p.last_name for p in people})
    free = len(firsts) * len(lasts) - sum(p.first_name in firsts and p.last_name in lasts for p in world.people)
    if n > free:
        raise ValueError(f"asked for {n} fake names but the {pool!r} pool has only {free}")
    rng = _rng(world, _STREAM_PROBE if pool == "probe" else _STREAM_SFT, seed)
    out: dict[str, None] = {}
    while len(out) < n:
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if name not in real:
            out[name] = None
    return list(out)


# --------------------------------------------------------------------------------------------------
# SFT data
# --------------------------------------------------------------------------------------------------
def sft_examples(world: World | BioWorld, n: int, *, seed: int = 0, mix: dict[str, float] | None = None,
                 splits: Iterable[str] = ("memory", "text"), max_turns: int = 3,
                 skill_kinds: Iterable[str] = SKILL_KINDS) -> list[SFTExample]:
    """``n`` SFT conversations drawn with weights ``mix`` (default :data:`DEFAULT_SFT_MIX`, :data:`BIO_SFT_MIX` in a
    BioWorld) over :data:`SFT_KINDS`. Questions use the world's training phrasings only. See the module docstring."""
    n = _check_count(n, "n")
    seed = _check_seed(seed)
    bio = isinstance(world, BioWorld)
    attributes, style = _attributes(world), _style(world)
    mix = dict((BIO_SFT_MIX if bio else DEFAULT_SFT_MIX) if mix is None else mix)
    if bio and mix.get("skill", 0) > 0:
        raise ValueError("a BioWorld has no skill tasks: mix['skill'] must be 0")
    for k, w in mix.items():
        if k not in SFT_KINDS:
            raise ValueError(f"mix keys must be in {SFT_KINDS}, got {k!r}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ValueError(f"mix[{k!r}] must be a non-negative number, got {w!r}")
    if sum(mix.values()) <= 0:
        raise ValueError(f"mix must have a positive total weight, got {mix}")
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or not 2 <= max_turns <= len(attributes):
        raise ValueError(f"max_turns must be an int in [2, {len(attributes)}], got {max_turns!r}")
    skill_kinds = tuple(skill_kinds)
    for s in skill_kinds:
        if s not in SKILL_KINDS:
            raise ValueError(f"skill_kinds must be in {SKILL_KINDS}, got {s!r}")
    if mix.get("skill", 0) > 0 and not skill_kinds:
        raise ValueError("mix['skill'] must be 0 when skill_kinds is empty")
    people = _people(world, splits) if (mix.get("qa", 0) or mix.get("multi", 0)) else ()
    kinds = [k for k in SFT_KINDS if mix.get(k, 0) > 0]
    weights = [mix[k] for k in kinds]
    rng = _rng(world, _STREAM_SFT, seed)
    drawn = [rng.choices(kinds, weights)[0] for _ in range(n)]
    n_fake = sum(k == "abstain" for k in drawn)
    fakes = iter(fake_names(world, n_fake, seed=seed, pool="train"))
    out = []
    for kind in drawn:
        if kind in ("qa", "multi"):
            p = rng.choice(people)
            n_turns = 1 if kind == "qa" else rng.randint(2, max_turns)
            attrs = rng.sample(attributes, n_turns)
            turns = []
            for i, a in enumerate(attrs):
                q = (_question(world, p.name, a, rng.randrange(_n_question_templates(world, a))) if i == 0
                     else (BIO_FOLLOWUP_TEMPLATES if bio else FOLLOWUP_TEMPLATES)[a].format(he=_pronoun(p)))
                turns.append((q, answer_sentence(p.name, a, _fact(p, a), style)))
            out.append(SFTExample(kind, tuple(turns), p.pid, p.name, ",".join(attrs)))
        elif kind == "abstain":
            name = next(fakes)
            a = rng.choice(attributes)
            q = _question(world, name, a, rng.randrange(_n_question_templates(world, a)))
            out.append(SFTExample(kind, ((q, ABSTAIN),), None, name, a))
        else:
            k = rng.choice(skill_kinds)
            prompt, target = skill_example(rng, k)
            out.append(SFTExample(kind, ((prompt, target),), None, None, k))
    return out


# --------------------------------------------------------------------------------------------------
# DPO data
# --------------------------------------------------------------------------------------------------
def preference_pairs(world: World | BioWorld, n: int, *, seed: int = 0, abstain_fraction: float = 0.3,
                     splits: Iterable[str] = ("memory", "text"),
                     overcautious_fraction: float = 0.0) -> list[PreferencePair]:
    """``n`` preference pairs, a fraction ``abstain_fraction`` about fake people (see the module docstring).

    ``overcautious_fraction`` (a lever, 0 by default): that share of the real-person pairs rejects the abstention
    instead of a wrong value (chosen: the true answer, rejected: "I do not know."), so that abstaining about a
    person the bank holds is dispreferred too (kind ``"overcautious"``). At 0 the pairs are those of before."""
    n = _check_count(n, "n")
    seed = _check_seed(seed)
    for name, v in (("abstain_fraction", abstain_fraction), ("overcautious_fraction", overcautious_fraction)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    rng = _rng(world, _STREAM_DPO, seed)
    is_fake = [rng.random() < abstain_fraction for _ in range(n)]
    people = _people(world, splits) if not all(is_fake) else ()
    n_fake = sum(is_fake)
    # a different sample of the training pool than SFT's (seed offset), same pool: never a probe name
    fakes = iter(fake_names(world, n_fake, seed=seed + 1_000_003, pool="train"))
    style = _style(world)
    pools = {a: _value_pool(world, a) for a in _attributes(world)}
    out = []
    for fake in is_fake:
        a = rng.choice(_attributes(world))
        pool = pools[a]
        template = rng.randrange(_n_question_templates(world, a))
        if fake:
            name = next(fakes)
            made_up = answer_sentence(name, a, rng.choice(pool), style)
            out.append(PreferencePair("abstain", chat_prompt(_question(world, name, a, template)), ABSTAIN, made_up,
                                      a, None, name))
        else:
            p = rng.choice(people)
            truth = _fact(p, a)
            wrong = rng.choice([v for v in pool if v != truth])
            prompt = chat_prompt(_question(world, p.name, a, template))
            chosen = answer_sentence(p.name, a, truth, style)
            if overcautious_fraction and rng.random() < overcautious_fraction:  # no draw at 0: the pairs of before
                out.append(PreferencePair("overcautious", prompt, chosen, ABSTAIN, a, p.pid, p.name))
            else:
                out.append(PreferencePair("fact", prompt, chosen, answer_sentence(p.name, a, wrong, style), a, p.pid,
                                          p.name))
    return out


# --------------------------------------------------------------------------------------------------
# factuality probe questions (mini Table 19)
# --------------------------------------------------------------------------------------------------
def probe_known_questions(world: World | BioWorld, n: int, *, seed: int = 0, split: str = "heldout",
                          phrasing: str = "heldout") -> list[ProbeItem]:
    """(a) questions about real people whose biographies are in the bank (default: ``heldout`` people,
    asked with the evaluation-only phrasing; in a BioWorld, its held-out question wordings)."""
    if phrasing not in ("heldout", "train"):
        raise ValueError(f"phrasing must be 'heldout' or 'train', got {phrasing!r}")
    n, seed = _check_count(n, "n"), _check_seed(seed)
    if isinstance(world, BioWorld):
        items = world.eval_questions(split, n, seed=seed, question_family=phrasing)
        return [ProbeItem(it.question, it.attribute, world.people[it.person].name, it.answer, it.person, "bio")
                for it in items]
    items = world.eval_questions(split, n, seed=seed, phrasing=phrasing)
    return [ProbeItem(it.question, it.attribute, world.person(it.person).name, it.answer, it.person)
            for it in items]


def probe_unknown_questions(world: World | BioWorld, n: int, *, seed: int = 0,
                            phrasing: str = "heldout") -> list[ProbeItem]:
    """(b) questions about people who exist nowhere (fake names from the probe pool, never used in
    fine-tuning). ``phrasing`` "heldout" uses the evaluation-only question wording (a BioWorld: one of its held-out
    question templates), "train" a training one."""
    if phrasing not in ("heldout", "train"):
        raise ValueError(f"phrasing must be 'heldout' or 'train', got {phrasing!r}")
    names = fake_names(world, _check_count(n, "n"), seed=seed, pool="probe")
    rng = _rng(world, _STREAM_PROBE, _check_seed(seed) + 7)
    items = []
    for name in names:
        a = rng.choice(_attributes(world))
        if isinstance(world, BioWorld):
            t = rng.randrange(_n_question_templates(world, a, phrasing))
            items.append(ProbeItem(_question(world, name, a, t, phrasing), a, name, None, None, "bio"))
            continue
        t = HELDOUT_QUESTION_TEMPLATE if phrasing == "heldout" else rng.randrange(N_TRAIN_QUESTION_TEMPLATES)
        items.append(ProbeItem(question_for(name, a, t), a, name, None, None))
    return items


def check_examples(examples: Sequence, kind: type, what: str) -> list:
    """Validate a list of records for finetune (clear errors for the common mistakes)."""
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise TypeError(f"{what} must be a list of {kind.__name__}, got {type(examples).__name__}")
    if len(examples) == 0:
        raise ValueError(f"no {what} given")
    for i, e in enumerate(examples):
        if not isinstance(e, kind):
            raise TypeError(f"{what}[{i}] is a {type(e).__name__}, not a {kind.__name__}")
    return list(examples)


__all__ = [
    "ABSTAIN", "ANSWER_TEMPLATES", "ASSISTANT", "BIO_ANSWER_TEMPLATES", "BIO_FOLLOWUP_TEMPLATES", "BIO_SFT_MIX",
    "DEFAULT_SFT_MIX", "FOLLOWUP_TEMPLATES", "PreferencePair",
    "ProbeItem", "SFTExample", "SFT_KINDS", "USER", "answer_sentence", "asserted_values", "chat_prompt",
    "completion", "extract_reply", "fake_names", "is_abstention", "preference_pairs", "probe_known_questions",
    "probe_unknown_questions", "question_for", "sft_examples",
]
