"""§3.6 / §7 a knowledge world that teaches *reading* explicit memory: generated names and values, many wordings.

The first world (:mod:`mini_m3.data.world`) has 120 first names, 120 last names, six biography templates and two
question templates per attribute; its tokenizer sees every person. A model trained there learns to copy a slot
from its one memory, and falls to chance on new names or new wordings (``shared/notes/reading-diagnostics.md``).
This world follows the lesson of Allen-Zhu & Li, *Physics of Language Models* 3.1 (knowledge becomes usable only
when it is told in diverse text):

* **names are generated** from syllables, so the space is practically unbounded. Training people and held-out
  people draw their first and last names from *disjoint* pools, and the tokenizer is trained on training text
  only (:meth:`BioWorld.tokenizer_corpus`): a held-out name is a string the tokenizer never saw, cut into
  sub-word pieces. Names are shared inside each pool, so look-alikes (same first or same last name) are common.
* **values are multi-token spans**: a birth date ``"14 March 1987"``, a generated birth city, a university
  ``"University of Velmora"``, a field of study, an employer ``"Zentrix Robotics"``. Held-out people's cities
  and company names come from held-out pools too, so the answer must be *copied* from memory, not picked
  from a list the model learned.
* **wordings come in families**: each attribute has training sentence and question templates and a held-out
  family of each that no training text uses. A biography is an introduction plus one sentence per fact, in a
  random order, each from a random template, naming the person by full name, first name or pronoun.
  ``wordings="wide"`` (a lever) gives the training family 2-3x more templates, ``"compositional"`` hundreds, and
  ``"neutral"`` tells some training facts in sentences that name no attribute (:func:`wording_templates`).

Populations (:data:`SPLITS`): ``"text"`` people have biographies and QA in the training text; ``"memory"``
people have their biography only in the bank and QA in training (the model must read to answer); ``"heldout"``
people exist only in the bank: new names, new values, and half of them told with the held-out biography
wording (:attr:`BioPerson.bio_family`). Evaluation (:meth:`BioWorld.eval_questions`) reports each generalisation
axis separately: new people, new biography wording, new question wording, names in another style.

Text formats are those of :mod:`mini_m3.data.world` (``"Q: ... A: ..."``, :func:`~mini_m3.data.world.qa_prompt`,
:func:`~mini_m3.data.world.exact_match`), so the evaluation code is shared. Deterministic from integer seeds.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .world import Document, QAItem, format_qa, qa_prompt

ATTRIBUTES: tuple[str, ...] = ("birth_date", "birth_city", "university", "major", "employer")
SPLITS: tuple[str, ...] = ("text", "memory", "heldout")
FAMILIES: tuple[str, ...] = ("train", "heldout")
MONTHS: tuple[str, ...] = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
                           "October", "November", "December")
MAJORS: tuple[str, ...] = (
    "Biology", "Chemistry", "Physics", "Mathematics", "History", "Philosophy", "Economics", "Psychology",
    "Sociology", "Linguistics", "Geology", "Astronomy", "Computer Science", "Mechanical Engineering",
    "Civil Engineering", "Architecture", "Music", "Art History", "Political Science", "Anthropology",
    "Statistics", "Nursing", "Law", "Medicine", "Journalism", "Comparative Literature", "Ecology", "Neuroscience",
    "Finance", "Accounting", "Marine Biology", "Electrical Engineering", "Classics", "Theology", "Dentistry",
    "Veterinary Science", "Graphic Design", "Urban Planning", "Public Health", "Materials Science",
)
UNIVERSITY_FORMS: tuple[str, ...] = ("University of {}", "{} Institute of Technology", "{} State University",
                                     "{} College", "Royal Academy of {}")
COMPANY_SUFFIXES: tuple[str, ...] = ("Labs", "Systems", "Group", "Industries", "Partners", "Foods", "Motors",
                                     "Analytics", "Bank", "Media", "Robotics", "Energy", "Pharma", "Logistics",
                                     "Studios", "Insurance")

# Syllables of generated names (places and companies use the same inventory with other shapes).
_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "cr",
           "dr", "fr", "gr", "kr", "pr", "tr", "st", "sh", "ch", "th", "bl", "cl", "fl", "gl", "pl", "sl", "")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "ia", "io", "ee", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th", "k", "nd", "rt", "ss", "x")
_LAST_ENDINGS = ("", "", "", "son", "berg", "ova", "ez", "ini", "ford", "ley", "ski", "ton", "wick", "ard")
_PLACE_ENDINGS = ("", "", "ville", "burg", "mouth", "haven", "field", "ia", "grad", "stead", "port")

# Names in another style than the generator's (real names from many languages): evaluation only, never in
# any training text or tokenizer corpus. They test names that are not syllable strings at all.
OTHER_STYLE_FIRST: tuple[str, ...] = (
    "Xiomara", "Oluwaseun", "Siobhan", "Dagrun", "Yevgenia", "Thandiwe", "Rustam", "Itzel", "Kwabena", "Saoirse",
    "Bogdana", "Nnamdi", "Ingeborg", "Tupac", "Wojciech", "Aigerim", "Eszter", "Mahmoud", "Leilani", "Radek",
)
OTHER_STYLE_LAST: tuple[str, ...] = (
    "Okonkwo", "Szczepanski", "Nakagawa", "Vuorinen", "Oyelaran", "Przybylski", "Hakobyan", "Quispe",
    "Mbeki", "Zhivkov", "Achterberg", "Ferreira", "Nyambura", "Xochitl", "Bjornsdottir", "Tshabalala",
    "Kowalczyk", "Ramanathan", "Obradovic", "Uchenna",
)

# --------------------------------------------------------------------------------------------------
# Wordings. {N} full name, {S} subject (full name, first name or pronoun, capitalised; {s} the same in lower case),
# {P} possessive (capitalised: "Her", "Anna's"), {p} possessive lower case ("her"), {v} the value.
# --------------------------------------------------------------------------------------------------
INTRO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "train": ("{N} is a person in our records.", "This is the profile of {N}.", "Meet {N}.",
              "Here is a short biography of {N}.", "{N} is the subject of this note.",
              "Our files hold an entry on {N}."),
    "heldout": ("The following concerns {N}.", "Some facts about {N} follow."),
}
SENTENCE_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {
        "birth_date": ("{S} was born on {v}.", "{S} came into the world on {v}.", "{P} date of birth is {v}.",
                       "The birth of {N} took place on {v}.", "{S} first opened {p} eyes on {v}."),
        "birth_city": ("{S} was born in {v}.", "{P} hometown is {v}.", "{S} is a native of {v}.",
                       "{S} spent {p} childhood in {v}, the city of {p} birth.", "The birthplace of {N} is {v}."),
        "university": ("{S} studied at {v}.", "{S} graduated from {v}.", "{S} attended {v}.",
                       "{S} earned a degree at {v}.", "{P} alma mater is {v}."),
        "major": ("{S} majored in {v}.", "{P} field of study was {v}.", "{S} focused on {v} as a student.",
                  "{S} holds a degree in {v}.", "The subject {N} studied was {v}."),
        "employer": ("{S} works for {v}.", "{S} is employed by {v}.", "{P} employer is {v}.",
                     "{S} took a job at {v}.", "{S} has worked at {v} for years."),
    },
    "heldout": {
        "birth_date": ("{P} life began on {v}.", "Records list {v} as the day {N} was born."),
        "birth_city": ("{S} hails from {v}.", "The city of {v} is where {N} was born."),
        "university": ("{S} completed {p} education at {v}.", "A diploma from {v} hangs on {p} wall."),
        "major": ("{S} specialised in {v}.", "The discipline {N} chose was {v}."),
        "employer": ("{S} earns a living at {v}.", "Today {S} draws a salary from {v}."),
    },
}
QUESTION_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {
        "birth_date": ("When was {N} born?", "What is the date of birth of {N}?", "On what date was {N} born?",
                       "What is the birthday of {N}?", "Which day was {N} born on?",
                       "Tell me the birth date of {N}."),
        "birth_city": ("Where was {N} born?", "In which city was {N} born?", "What is the birthplace of {N}?",
                       "What is the hometown of {N}?", "Which city is {N} a native of?",
                       "Name the city where {N} was born."),
        "university": ("Which university did {N} attend?", "Where did {N} study?", "Where did {N} go to college?",
                       "Which school did {N} graduate from?", "What is the alma mater of {N}?",
                       "At which university did {N} earn a degree?"),
        "major": ("What did {N} study?", "What was the major of {N}?", "Which subject did {N} study?",
                  "What is the field of study of {N}?", "In which field does {N} hold a degree?",
                  "What did {N} major in?"),
        "employer": ("Which company does {N} work for?", "Who employs {N}?", "Where does {N} work?",
                     "What is the employer of {N}?", "Which firm hired {N}?", "For which company does {N} work?"),
    },
    "heldout": {
        "birth_date": ("{N} was born on which date?", "Could you say on which day {N} was born?"),
        "birth_city": ("{N} was born in which city?", "From which city does {N} originally come?"),
        "university": ("{N} graduated from which university?", "Which institution gave {N} a diploma?"),
        "major": ("{N} studied which subject?", "Which discipline did {N} specialise in?"),
        "employer": ("{N} works for which company?", "Which organisation pays the salary of {N}?"),
    },
}


# More training wordings (``BioWorld.generate(wordings="wide")``, a lever of issue 15): added to the "train" family
# only, so the held-out family stays what no training text uses. Written after the held-out family existed, they
# share none of its own words ("hails", "salary", "diploma", ...: checked in tests/test_bios.py) and none starts a
# question with the name, the held-out questions' frame.
WORDINGS: tuple[str, ...] = ("base", "wide", "compositional", "neutral")
WIDE_INTRO_TEMPLATES: tuple[str, ...] = (
    "This note describes {N}.", "A brief account of {N}.", "Profile: {N}.", "Entry for {N}.",
    "We present {N} here.", "The person described below is {N}.")
WIDE_SENTENCE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("{N} entered the world on {v}.", "{S} was born on the morning of {v}.",
                   "According to the registry, {N} was born on {v}.", "{v} is the date on which {N} was born.",
                   "The date of birth of {N} is given as {v}.", "Born on {v}, {N} is the person described here.",
                   "{S} arrived on {v}, the date of {p} birth.", "{P} birthday is {v}."),
    "birth_city": ("{N} was born and raised in {v}.", "{S} grew up in {v}, where {p} family lived.",
                   "{v} is the birthplace of {N}.", "Born in {v}, {N} is the person described here.",
                   "{S} is from {v}.", "{P} place of birth is {v}.", "{N} was born in the town of {v}.",
                   "{S} was brought up in {v}, the place of {p} birth."),
    "university": ("{S} went to {v}.", "{S} enrolled at {v}.", "{N} is a graduate of {v}.",
                   "{v} is the university {N} attended.", "{P} degree is from {v}.",
                   "{S} received {p} training at {v}.", "{N} spent four years at {v}.",
                   "After school, {N} studied at {v}."),
    "major": ("{S} studied {v}.", "{P} major was {v}.", "{v} was the main subject of {N}.",
              "{N} read {v} at university.", "{S} trained in {v}.", "{S} took {p} degree in {v}.",
              "As a student, {N} concentrated on {v}.", "{N} has a background in {v}."),
    "employer": ("{S} is on the staff of {v}.", "{S} joined {v} after graduating.", "{v} employs {N}.",
                 "{N} holds a position at {v}.", "{S} was hired by {v}.", "{P} workplace is {v}.",
                 "{N} is part of the team at {v}.", "{S} currently works at {v}."),
}
WIDE_QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("I would like to know when {N} was born.", "What date was {N} born on?",
                   "Give the birth date of {N}.", "When is the birthday of {N}?",
                   "What is the date of birth of the person named {N}?"),
    "birth_city": ("I would like to know where {N} was born.", "What city was {N} born in?",
                   "Give the birthplace of {N}.", "Where is {N} from?", "What is the place of birth of {N}?"),
    "university": ("I would like to know which university {N} attended.", "What university did {N} go to?",
                   "Give the university of {N}.", "Where did {N} earn a degree?",
                   "Which university is {N} a graduate of?"),
    "major": ("I would like to know what {N} studied.", "What subject did {N} major in?",
              "Give the field of study of {N}.", "Which field did {N} study?", "What was the main subject of {N}?"),
    "employer": ("I would like to know who employs {N}.", "What company does {N} work for?",
                 "Give the employer of {N}.", "Where is {N} employed?", "Which company employs {N}?"),
}


# Compositional training wordings (``wordings="compositional"``, a lever of issue 15 item 1: *Physics of Language
# Models* 3.1's "many wordings", so that no template can be memorised): a sentence is one of 9 core clauses per
# attribute, alone, after one of 10 openers or before one of 5 closers; a question is a direct one, alone or in one of
# 6 frames, or an indirect one in one of 5 frames: 144 sentence and 44-56 question wordings per attribute, added to the
# base and wide "train" templates. Like the wide set they share no word of the held-out family, and no question
# starts with the name (tests/test_bios.py). {s} is the subject in lower case ("she", "Anna", "Anna Kowal").
COMPOSITIONAL_OPENERS: tuple[str, ...] = (
    "Notably,", "In fact,", "As it happens,", "For the record,", "By all accounts,", "As the file notes,",
    "We note that", "It is known that", "The file shows that", "Of note,")
COMPOSITIONAL_CLOSERS: tuple[str, ...] = (
    ", as the file notes", ", we are told", ", it seems", ", by all accounts", ", as far as we know")
COMPOSITIONAL_CORES: dict[str, tuple[str, ...]] = {
    "birth_date": ("{s} was born on {v}", "{s} came into the world on {v}", "{s} entered the world on {v}",
                   "{s} was born in the early hours of {v}", "{s} arrived on {v}",
                   "the birth of {N} was recorded on {v}", "the date of birth of {N} is {v}",
                   "{v} is the birthday of {N}", "{v} is the birth date of {N}"),
    "birth_city": ("{s} was born in {v}", "{s} grew up in {v}", "{s} is a native of {v}", "{s} was raised in {v}",
                   "{s} was born and bred in {v}", "{s} is from {v}", "the hometown of {N} is {v}",
                   "the birthplace of {N} is {v}", "{v} is the hometown of {N}"),
    "university": ("{s} studied at {v}", "{s} graduated from {v}", "{s} attended {v}", "{s} enrolled at {v}",
                   "{s} earned a degree at {v}", "{s} went to college at {v}", "{s} is a graduate of {v}",
                   "the alma mater of {N} is {v}", "{v} is the university of {N}"),
    "major": ("{s} majored in {v}", "{s} studied {v}", "{s} holds a degree in {v}", "{s} trained in {v}",
              "{s} took a degree in {v}", "{s} focused on {v} as a student", "the field of study of {N} was {v}",
              "the major of {N} was {v}", "{v} was the subject {N} studied"),
    "employer": ("{s} works for {v}", "{s} is employed by {v}", "{s} works at {v}", "{s} took a job at {v}",
                 "{s} has a position at {v}", "{s} holds a job at {v}", "the employer of {N} is {v}",
                 "{v} employs {N}", "{v} is the company {N} works for"),
}
COMPOSITIONAL_QUESTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # (direct questions, indirect wh-clauses, noun phrases)
    "birth_date": (("When was {N} born?", "What is the date of birth of {N}?", "What date was {N} born on?",
                    "When is the birthday of {N}?"),
                   ("when {N} was born", "what the birth date of {N} is"),
                   ("the date of birth of {N}", "the birthday of {N}")),
    "birth_city": (("Where was {N} born?", "In which city was {N} born?", "What city was {N} born in?",
                    "What is the hometown of {N}?", "Where did {N} grow up?", "What is the birthplace of {N}?"),
                   ("where {N} was born", "which city {N} is a native of"),
                   ("the hometown of {N}", "the birthplace of {N}")),
    "university": (("Which university did {N} attend?", "Where did {N} study?", "What university did {N} go to?",
                    "Where did {N} earn a degree?", "What is the alma mater of {N}?"),
                   ("which university {N} attended", "where {N} earned a degree"),
                   ("the alma mater of {N}", "the university of {N}")),
    "major": (("What did {N} study?", "What was the major of {N}?", "Which subject did {N} major in?",
               "In which field does {N} hold a degree?", "What is the field of study of {N}?"),
              ("what {N} studied", "which subject {N} majored in"),
              ("the major of {N}", "the field of study of {N}")),
    "employer": (("Which company does {N} work for?", "Who employs {N}?", "Where does {N} work?",
                  "What is the employer of {N}?", "Which firm hired {N}?"),
                 ("which company {N} works for", "who employs {N}"),
                 ("the employer of {N}", "the company {N} works for")),
}
COMPOSITIONAL_DIRECT_FRAMES: tuple[str, ...] = (
    "{q}", "Quick question: {q}", "Tell me this: {q}", "One more thing: {q}", "Please answer: {q}",
    "{q} Answer in a few words.")
COMPOSITIONAL_CLAUSE_FRAMES: tuple[str, ...] = (
    "Tell me {q}.", "I wonder {q}.", "I need to know {q}.", "Please find out {q}.", "I am asking {q}.")
COMPOSITIONAL_PHRASE_FRAMES: tuple[str, ...] = (
    "Tell me {q}.", "Please state {q}.", "Name {q}.", "Give {q}.", "I need {q}.")
COMPOSITIONAL_INTRO_TEMPLATES: tuple[str, ...] = (
    "This entry describes {N}.", "A note on {N}.", "Here is what we know of {N}.", "{N}: a profile.",
    "The lines below describe {N}.", "We describe {N} in this note.", "A short record of {N}.",
    "Here is an entry on {N}.")


# Neutral training sentences (``wordings="neutral"``, a lever of issue 15: the compositional wordings, and each
# biography sentence of the training family is, with probability NEUTRAL_SHARE, one of these templates, the same for
# every attribute). Such a sentence says which attribute it tells only through its value's own shape (a date, a
# "University of ...", a field, a company): a reader that must find the birth date in it cannot key on the verb,
# the shortcut that fails on the held-out family's verbs ("hails from", "draws a salary from"). They share no word
# of the held-out family either (tests/test_bios.py).
NEUTRAL_SHARE = 0.3
NEUTRAL_SENTENCE_TEMPLATES: tuple[str, ...] = (
    "{S} is linked to {v}.", "The file on {N} mentions {v}.", "{v} appears in the file of {N}.",
    "Another detail of {N} is {v}.", "{P} entry also names {v}.", "{S} is associated with {v}.",
    "{v} is connected with {N}.", "One more item in {p} profile: {v}.")


def _sentence_case(text: str) -> str:
    """A core clause at the start of a sentence: {s} becomes {S} (the capitalised subject), a word gets a capital."""
    return "{S}" + text[3:] if text.startswith("{s}") else text[:1].upper() + text[1:]


def _compositional_sentences(attribute: str) -> tuple[str, ...]:
    out = []
    for core in COMPOSITIONAL_CORES[attribute]:
        out.append(_sentence_case(core) + ".")
        out += [f"{o} {core}." for o in COMPOSITIONAL_OPENERS]
        out += [_sentence_case(core) + c + "." for c in COMPOSITIONAL_CLOSERS]
    return tuple(out)


def _compositional_questions(attribute: str) -> tuple[str, ...]:
    direct, clauses, phrases = COMPOSITIONAL_QUESTIONS[attribute]
    out = [f.replace("{q}", q) for q in direct for f in COMPOSITIONAL_DIRECT_FRAMES]
    out += [f.replace("{q}", q) for q in clauses for f in COMPOSITIONAL_CLAUSE_FRAMES]
    out += [f.replace("{q}", q) for q in phrases for f in COMPOSITIONAL_PHRASE_FRAMES]
    return tuple(out)


def _unique(*groups: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t for g in groups for t in g))


def wording_templates(wordings: str, kind: str, family: str, attribute: str | None = None) -> tuple[str, ...]:
    """The templates of one wording ``family`` under ``wordings`` ("base"; "wide": the "train" family gets the WIDE_*
    templates too; "compositional": the WIDE_* and the COMPOSITIONAL_* ones too; "neutral": the compositional ones
    and the NEUTRAL_* sentences, which a biography draws with probability NEUTRAL_SHARE, see
    :meth:`BioWorld.biography`). kind: "intro", "sentence" or "question" (the last two per ``attribute``). The
    held-out family is the same under every ``wordings``."""
    if wordings not in WORDINGS:
        raise ValueError(f"wordings must be one of {WORDINGS}, got {wordings!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if kind not in ("intro", "sentence", "question"):
        raise ValueError(f"kind must be 'intro', 'sentence' or 'question', got {kind!r}")
    if kind != "intro" and attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    pick = lambda table: table if kind == "intro" else table[attribute]  # noqa: E731
    base = pick({"intro": INTRO_TEMPLATES, "sentence": SENTENCE_TEMPLATES,
                 "question": QUESTION_TEMPLATES}[kind][family])
    if wordings == "base" or family != "train":
        return base
    wide = pick({"intro": WIDE_INTRO_TEMPLATES, "sentence": WIDE_SENTENCE_TEMPLATES,
                 "question": WIDE_QUESTION_TEMPLATES}[kind])
    if wordings == "wide":
        return base + wide
    more = (COMPOSITIONAL_INTRO_TEMPLATES if kind == "intro" else
            (_compositional_sentences if kind == "sentence" else _compositional_questions)(attribute))
    neutral = NEUTRAL_SENTENCE_TEMPLATES if wordings == "neutral" and kind == "sentence" else ()
    return _unique(base, wide, more, neutral)


# --------------------------------------------------------------------------------------------------
# People
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BioPerson:
    pid: int
    first_name: str
    last_name: str
    female: bool
    split: str
    bio_family: str  # the wording family of this person's biography in the bank
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str

    @property
    def name(self) -> str:
        return f"{self.first_name} {self.last_name}"

    def facts(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


def _derive_rng(*keys: int) -> random.Random:
    return random.Random(int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]))


def _syllables(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(n))


def _word(rng: random.Random, lo: int, hi: int, endings: Sequence[str], max_len: int = 10) -> str:
    """A pronounceable generated word of lo..hi syllables plus an ending (3..max_len letters), capitalised."""
    while True:
        w = _syllables(rng, rng.randint(lo, hi)) + rng.choice(endings)
        if 3 <= len(w) <= max_len:
            return w.capitalize()


def _pool(rng: random.Random, n: int, make, taken: set[str]) -> list[str]:
    """`n` distinct strings from `make(rng)` that are not in `taken` (and are added to it)."""
    out = []
    while len(out) < n:
        w = make(rng)
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


@dataclass
class _Pools:
    first: list[str]
    last: list[str]
    places: list[str]
    companies: list[str]


def _make_pools(rng: random.Random, n_people: int, taken: set[str], name_share: int, value_share: int) -> _Pools:
    """Name and value pools: each first (last) name is shared by ~`name_share` people (look-alikes), each generated
    place or company by ~`value_share`. Small shares keep training names and values rare enough that the tokenizer
    cuts them into sub-word pieces as it cuts held-out ones (with 2 and 2 and 1,024 tokens: 2.9 vs 3.1 tokens per
    first name, 3.5 vs 3.4 per last name); large shares turn training names into single tokens, and a model then
    learns to match whole-name tokens, which held-out names never are."""
    n_names, n_values = max(8, n_people // name_share), max(8, n_people // value_share)
    return _Pools(
        first=_pool(rng, n_names, lambda r: _word(r, 1, 2, ("",), 8), taken),
        last=_pool(rng, n_names, lambda r: _word(r, 1, 2, _LAST_ENDINGS, 10), taken),
        places=_pool(rng, n_values, lambda r: _word(r, 1, 2, _PLACE_ENDINGS, 10), taken),
        companies=_pool(rng, n_values, lambda r: _word(r, 1, 2, ("", "", "ix", "ora", "tek"), 9), taken),
    )


def _person(rng: random.Random, pid: int, split: str, family: str, pools: _Pools, names: set[str]) -> BioPerson:
    while True:
        first, last = rng.choice(pools.first), rng.choice(pools.last)
        if f"{first} {last}" not in names:
            names.add(f"{first} {last}")
            break
    return BioPerson(
        pid=pid, first_name=first, last_name=last, female=rng.random() < 0.5, split=split, bio_family=family,
        birth_date=f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1920, 2005)}",
        birth_city=rng.choice(pools.places),
        university=rng.choice(UNIVERSITY_FORMS).format(rng.choice(pools.places)),
        major=rng.choice(MAJORS),
        employer=f"{rng.choice(pools.companies)} {rng.choice(COMPANY_SUFFIXES)}",
    )


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


_STREAM_PEOPLE, _STREAM_DOCS, _STREAM_EVAL, _STREAM_BIO = 11, 12, 13, 14


class BioWorld:
    """People with generated names and multi-token facts; biographies in the bank; QA and biographies as
    training text. Build with :meth:`generate`; see the module docstring."""

    def __init__(self, people: Sequence[BioPerson], *, seed: int, config: dict | None = None):
        self.people = tuple(people)
        self.seed = _check_seed(seed)
        self.config = dict(config or {})
        self.wordings = self.config.get("wordings", "base")
        if self.wordings not in WORDINGS:
            raise ValueError(f"config wordings must be one of {WORDINGS}, got {self.wordings!r}")
        for i, p in enumerate(self.people):
            if p.pid != i:
                raise ValueError(f"people[{i}].pid must equal its index, got {p.pid}")
            if p.split not in SPLITS or p.bio_family not in FAMILIES:
                raise ValueError(f"people[{i}]: bad split {p.split!r} or bio_family {p.bio_family!r}")
        self._by_split = {s: tuple(p for p in self.people if p.split == s) for s in SPLITS}
        if len({p.name for p in self.people}) != len(self.people):
            raise ValueError("people: full names must be unique")

    @classmethod
    def generate(cls, n_people: int = 6000, *, seed: int = 0, text_fraction: float = 0.1,
                 heldout_fraction: float = 0.1, name_share: int = 2, value_share: int = 2,
                 wordings: str = "base") -> "BioWorld":
        """``n_people`` people: ``heldout_fraction`` of them held out (own name and value pools, half told with
        the held-out biography wording), ``text_fraction`` with biographies in the training text, the rest
        ``memory`` people (biography only in the bank). ``name_share`` / ``value_share``: people per first or
        last name / per generated place or company (see ``_make_pools``). ``wordings``: "base", "wide" for the
        WIDE_* training templates as well, "compositional" for those and the COMPOSITIONAL_* ones, or "neutral"
        for those and the NEUTRAL_* sentences (:func:`wording_templates`); people and facts do not depend on it."""
        if wordings not in WORDINGS:
            raise ValueError(f"wordings must be one of {WORDINGS}, got {wordings!r}")
        for f, v in (("name_share", name_share), ("value_share", value_share)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be an int >= 1, got {v!r}")
        if isinstance(n_people, bool) or not isinstance(n_people, (int, np.integer)) or n_people < 10:
            raise ValueError(f"n_people must be an int >= 10, got {n_people!r}")
        for f, v in (("text_fraction", text_fraction), ("heldout_fraction", heldout_fraction)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ValueError(f"{f} must be a number in (0, 1), got {v!r}")
        if text_fraction + heldout_fraction >= 1:
            raise ValueError("text_fraction + heldout_fraction must be < 1")
        seed = _check_seed(seed)
        rng = _derive_rng(seed, _STREAM_PEOPLE)
        n_held = max(2, int(round(n_people * heldout_fraction)))
        n_text = max(1, int(round(n_people * text_fraction)))
        taken: set[str] = set(OTHER_STYLE_FIRST) | set(OTHER_STYLE_LAST)
        train_pools = _make_pools(rng, n_people - n_held, taken, name_share, value_share)
        held_pools = _make_pools(rng, n_held, taken, name_share, value_share)  # disjoint from the training pools
        names: set[str] = set()
        people = []
        for pid in range(n_people):
            if pid < n_held:
                split, family, pools = "heldout", FAMILIES[pid % 2], held_pools
            else:
                split, family, pools = ("text" if pid < n_held + n_text else "memory"), "train", train_pools
            people.append(_person(rng, pid, split, family, pools, names))
        order = list(range(n_people))  # shuffle pids so that splits are interleaved
        rng.shuffle(order)
        people = [BioPerson(**{**asdict(people[j]), "pid": i}) for i, j in enumerate(order)]
        cfg = {"n_people": int(n_people), "text_fraction": float(text_fraction),
               "heldout_fraction": float(heldout_fraction), "name_share": name_share, "value_share": value_share}
        if wordings != "base":  # a base world's config (and JSON) is what it was before wordings existed
            cfg["wordings"] = wordings
        return cls(people, seed=seed, config=cfg)

    # ---- lookup
    def __len__(self) -> int:
        return len(self.people)

    def people_in(self, split: str) -> tuple[BioPerson, ...]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._by_split[split]

    # ---- texts
    def templates(self, kind: str, family: str, attribute: str | None = None) -> tuple[str, ...]:
        """This world's templates of one kind and family (:func:`wording_templates` under ``self.wordings``)."""
        return wording_templates(self.wordings, kind, family, attribute)

    def biography(self, person: int | BioPerson, *, family: str | None = None, seed: int = 0) -> str:
        """A biography of ``person`` in wording ``family`` (default: the person's own). The sentence order,
        templates and naming are drawn from ``seed``: seed 0 is the bank's version."""
        p = person if isinstance(person, BioPerson) else self.people[person]
        family = family or p.bio_family
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        rng = _derive_rng(self.seed, _STREAM_BIO, p.pid, seed, FAMILIES.index(family))
        pron, poss = ("She", "Her") if p.female else ("He", "His")
        attrs = list(ATTRIBUTES)
        rng.shuffle(attrs)
        parts = [rng.choice(self.templates("intro", family)).format(N=p.name)]
        for a in attrs:
            subject = rng.choice((p.name, p.first_name, pron, pron, pron))
            P = poss if subject == pron else f"{subject}'s"
            parts.append(rng.choice(self._sentence_templates(family, a, rng)).format(
                N=p.name, S=subject, s=pron.lower() if subject == pron else subject, P=P, p=poss.lower(),
                v=getattr(p, a)))
        return " ".join(parts)

    def _sentence_templates(self, family: str, attribute: str, rng) -> tuple[str, ...]:
        """The templates one biography sentence is drawn from. A "neutral" world's training family draws a
        NEUTRAL_* template with probability NEUTRAL_SHARE, else a compositional one (an extra draw that other
        worlds do not make: their biographies are unchanged)."""
        if self.wordings != "neutral" or family != "train":
            return self.templates("sentence", family, attribute)
        if rng.random() < NEUTRAL_SHARE:
            return NEUTRAL_SENTENCE_TEMPLATES
        return wording_templates("compositional", "sentence", family, attribute)

    def bank_biography(self, person: int | BioPerson, fits=None, tries: int = 64) -> str:
        """The person's biography in the bank: the first wording draw (seed 0, 1, ...) that ``fits`` (e.g. a
        128-token reference limit under some tokenizer); every draw has the same facts."""
        for seed in range(tries):
            text = self.biography(person, seed=seed)
            if fits is None or fits(text):
                return text
        p = person if isinstance(person, BioPerson) else self.people[person]
        raise ValueError(f"no biography of {p.name!r} fits after {tries} wording draws")

    def references(self, fits=None, people: Sequence[BioPerson] | None = None) -> list[str]:
        """The memory bank: one biography per person (index = pid), in the person's own wording family
        (:meth:`bank_biography`); ``people`` defaults to the world's."""
        return [self.bank_biography(p, fits) for p in (self.people if people is None else people)]

    def qa(self, person: int | BioPerson, attribute: str, *, family: str = "train",
           template: int | None = None, rng: random.Random | None = None) -> tuple[str, str]:
        p = person if isinstance(person, BioPerson) else self.people[person]
        if attribute not in ATTRIBUTES:
            raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
        templates = self.templates("question", family, attribute)
        t = template if template is not None else (rng or random).randrange(len(templates))
        return templates[t].format(N=p.name), getattr(p, attribute)

    def training_documents(self, n_docs: int, *, seed: int = 0, bio_fraction: float = 0.1,
                           max_qa: int = 3) -> list[Document]:
        """``n_docs`` training documents: QA about ``text`` and ``memory`` people (1..max_qa questions about one
        person, training wordings), and a ``bio_fraction`` of biographies of ``text`` people (each a fresh
        wording draw). Held-out people and held-out wordings never appear."""
        rng = _derive_rng(self.seed, _STREAM_DOCS, _check_seed(seed))
        askable = self.people_in("memory") + self.people_in("text")
        text_people = self.people_in("text")
        docs = []
        for i in range(n_docs):
            if rng.random() < bio_fraction:
                p = rng.choice(text_people)
                docs.append(Document(self.biography(p, family="train", seed=1 + rng.randrange(1 << 30)),
                                     p.pid, "bio", "train"))
                continue
            p = rng.choice(askable)
            attrs = rng.sample(ATTRIBUTES, rng.randint(1, max_qa))
            text = "\n".join(format_qa(*self.qa(p, a, rng=rng)) for a in attrs)
            docs.append(Document(text, p.pid, "qa", ",".join(attrs)))
        return docs

    def tokenizer_corpus(self, docs: Sequence[Document]) -> list[str]:
        """What the tokenizer may learn from: the training documents and the bank biographies of the people
        training reads (``text`` and ``memory``). Never a held-out person, value or wording."""
        return [d.text for d in docs] + [self.bank_biography(p) for p in self.people if p.split != "heldout"]

    def eval_questions(self, split: str, n: int, *, seed: int = 0, question_family: str = "train",
                       bio_family: str | None = None) -> list[QAItem]:
        """``n`` questions about people of ``split`` (those whose bank biography has wording ``bio_family``, if
        given), one random attribute each, asked in ``question_family`` wording."""
        rng = _derive_rng(self.seed, _STREAM_EVAL, _check_seed(seed), SPLITS.index(split),
                          FAMILIES.index(question_family), 0 if bio_family is None else 1 + FAMILIES.index(bio_family))
        pool = [p for p in self.people_in(split) if bio_family is None or p.bio_family == bio_family]
        if not pool:
            raise ValueError(f"no {split} people with biography wording {bio_family!r}")
        items = []
        for i in range(n):
            p = pool[i % len(pool)] if n <= len(pool) else rng.choice(pool)
            a = ATTRIBUTES[rng.randrange(len(ATTRIBUTES))]
            q, ans = self.qa(p, a, family=question_family, rng=rng)
            items.append(QAItem(p.pid, a, q, ans, qa_prompt(q)))
        if n <= len(pool):
            rng.shuffle(items)
        return items

    def other_style_people(self, n: int, *, seed: int = 0) -> list[BioPerson]:
        """People with names in another style (:data:`OTHER_STYLE_FIRST` x :data:`OTHER_STYLE_LAST`) and
        held-out-pool values, pids from ``len(self)`` on: added to a bank after training."""
        rng = _derive_rng(self.seed, 99, _check_seed(seed))
        held = self.people_in("heldout")
        combos = [(f, l) for f in OTHER_STYLE_FIRST for l in OTHER_STYLE_LAST]
        rng.shuffle(combos)
        out = []
        for i, (f, l) in enumerate(combos[:n]):
            src = rng.choice(held)  # values from the held-out pools, re-drawn per fact
            vals = {a: getattr(rng.choice(held), a) for a in ATTRIBUTES}
            out.append(BioPerson(pid=len(self) + i, first_name=f, last_name=l, female=rng.random() < 0.5,
                                 split="heldout", bio_family=src.bio_family, **vals))
        return out

    # ---- persistence
    def to_json(self) -> str:
        return json.dumps({"format": "mini_m3.bioworld", "version": 1, "seed": self.seed, "config": self.config,
                           "people": [asdict(p) for p in self.people]})

    @classmethod
    def from_json(cls, text: str, what: str = "BioWorld JSON") -> "BioWorld":
        from ..config import parse_json
        d = parse_json(text, what)
        if not isinstance(d, dict):
            raise ValueError(f"{what}: not a mini_m3 BioWorld file (format mini_m3.bioworld, version 1)")
        if d.get("format") != "mini_m3.bioworld" or d.get("version") != 1:
            raise ValueError("not a mini_m3 BioWorld file (format mini_m3.bioworld, version 1)")
        return cls([BioPerson(**p) for p in d["people"]], seed=d["seed"], config=d["config"])

    def save(self, path: str | Path) -> None:
        from ..utils import atomic_write_text
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "BioWorld":
        return cls.from_json(Path(path).read_text(encoding="utf-8"), str(path))

    def summary(self) -> dict:
        return {"n_people": len(self), **{f"n_{s}": len(self._by_split[s]) for s in SPLITS},
                "wordings": self.wordings,
                "n_intro_templates": {f: len(self.templates("intro", f)) for f in FAMILIES},
                "n_sentence_templates": {f: sum(len(self.templates("sentence", f, a)) for a in ATTRIBUTES)
                                         for f in FAMILIES},
                "n_question_templates": {f: sum(len(self.templates("question", f, a)) for a in ATTRIBUTES)
                                         for f in FAMILIES}}


__all__ = ["ATTRIBUTES", "BioPerson", "BioWorld", "COMPOSITIONAL_CLAUSE_FRAMES", "COMPOSITIONAL_CLOSERS",
           "COMPOSITIONAL_CORES", "COMPOSITIONAL_DIRECT_FRAMES", "COMPOSITIONAL_INTRO_TEMPLATES",
           "COMPOSITIONAL_OPENERS", "COMPOSITIONAL_PHRASE_FRAMES", "COMPOSITIONAL_QUESTIONS", "FAMILIES",
           "INTRO_TEMPLATES", "OTHER_STYLE_FIRST", "OTHER_STYLE_LAST", "QUESTION_TEMPLATES", "SENTENCE_TEMPLATES",
           "SPLITS", "WIDE_INTRO_TEMPLATES", "WIDE_QUESTION_TEMPLATES", "WIDE_SENTENCE_TEMPLATES", "WORDINGS",
           "wording_templates"]
