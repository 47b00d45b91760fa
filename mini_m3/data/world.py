"""Synthetic knowledge world for the §3.6 / §4.4 / §7 experiments: people, facts, a memory bank of biographies, QA and skill text.

A small world of people and facts (in the spirit of the bioS biographies of "Physics of Language Models")
on which a tiny Memory³ model can be trained on a CPU in minutes, to measure whether explicit memory
delivers knowledge the model never saw in training.

Every person has a unique ``"First Last"`` name and six single-answer attributes (:data:`ATTRIBUTES`).
People are split into three disjoint populations (:data:`SPLITS`):

* ``"text"`` (small, default 15 %): their biographies appear in the training text, so the model may
  memorise them (implicit memory, the paper's "model parameters" tier). QA about them is also in training.
* ``"memory"`` (the majority): their biographies live ONLY in the memory bank. Training text contains
  questions and answers about them but never their biography, so the easiest way to answer is to read the
  retrieved biography (the paper's externalised knowledge). This follows lesson 1 of
  ``shared/notes/feasibility.md``: if every biography is also in the training text, the model memorises
  instead of reading.
* ``"heldout"`` (default 20 %): biographies only in the memory bank; these people appear NOWHERE in the
  training documents (no QA, no biography). They measure reading memory for truly new knowledge.

Every person, whatever the split, has one biography in the memory bank (:meth:`World.references`, index = pid).

Text formats (used everywhere, so exact match is easy):

* one QA pair: ``format_qa(q, a) == f"Q: {q} A: {a}"``; the prompt is ``qa_prompt(q) == f"Q: {q} A:"``
  and the answer follows the prompt after ONE space and ends at ``"\\n"`` or at the end of the text
  (:func:`extract_answer`, :func:`exact_match`). Several QA pairs in one document are joined with ``"\\n"``.
* skill texts: ``prompt + " " + target`` (:func:`skill_example`), e.g. ``"Words: a b c\\nCopy: a b c"``.

Everything is deterministic from integer seeds (``random.Random`` seeded through ``numpy.random.SeedSequence``);
no global random state is touched. Pure Python + numpy, no torch.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------------
# Value pools (hand-written, plain English). Pools are disjoint word-wise (checked in the tests) and the
# last names are prefix-free, so a full name never occurs inside another full name.
# --------------------------------------------------------------------------------------------------

FEMALE_FIRST_NAMES: tuple[str, ...] = (
    "Alice", "Beatrice", "Clara", "Diana", "Elena", "Fiona", "Grace", "Hannah", "Irene", "Julia",
    "Karen", "Laura", "Monica", "Nora", "Olivia", "Paula", "Rachel", "Sarah", "Tessa", "Ursula",
    "Vera", "Wendy", "Yvonne", "Zoe", "Abigail", "Brenda", "Carmen", "Daisy", "Emma", "Flora",
    "Gloria", "Helen", "Ingrid", "Jessica", "Kathy", "Lucy", "Maria", "Nadia", "Ophelia", "Priya",
    "Rosa", "Sofia", "Tina", "Valerie", "Wanda", "Amelia", "Bianca", "Celine", "Doris", "Esther",
    "Frances", "Greta", "Hazel", "Isla", "Joanna", "Leah", "Mabel", "Naomi", "Petra", "Ruth",
)
MALE_FIRST_NAMES: tuple[str, ...] = (
    "Aaron", "Bruno", "Carl", "Daniel", "Edward", "Felix", "George", "Henry", "Ivan", "James",
    "Kevin", "Louis", "Martin", "Nathan", "Oscar", "Peter", "Quentin", "Robert", "Samuel", "Thomas",
    "Victor", "Walter", "Xavier", "Yusuf", "Adam", "Boris", "Colin", "Dennis", "Elliot", "Frank",
    "Gordon", "Hugo", "Isaac", "Jonas", "Kenneth", "Leon", "Marcus", "Neil", "Owen", "Patrick",
    "Ralph", "Simon", "Theo", "Vincent", "Warren", "Albert", "Bernard", "Caleb", "Derek", "Ethan",
    "Gregory", "Harold", "Jacob", "Keith", "Lionel", "Miles", "Noel", "Philip", "Roger", "Stefan",
)
FIRST_NAMES: tuple[str, ...] = FEMALE_FIRST_NAMES + MALE_FIRST_NAMES

LAST_NAMES: tuple[str, ...] = (
    "Smith", "Johnson", "Williams", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez", "Hernandez",
    "Lopez", "Gonzalez", "Wilson", "Anderson", "Taylor", "Moore", "Jackson", "Thompson", "Harris", "Clark",
    "Ramirez", "Lewis", "Robinson", "Walker", "Allen", "Wright", "Scott", "Torres", "Nguyen", "Hill",
    "Flores", "Adams", "Nelson", "Baker", "Campbell", "Mitchell", "Carter", "Roberts", "Gomez", "Phillips",
    "Evans", "Turner", "Diaz", "Parker", "Cruz", "Edwards", "Collins", "Reyes", "Stewart", "Morris",
    "Morales", "Murphy", "Cook", "Rogers", "Gutierrez", "Ortiz", "Morgan", "Cooper", "Peterson", "Bailey",
    "Reed", "Kelly", "Howard", "Ramos", "Kim", "Cox", "Ward", "Richardson", "Watson", "Brooks",
    "Chavez", "Bennett", "Gray", "Mendoza", "Ruiz", "Hughes", "Price", "Alvarez", "Castillo", "Sanders",
    "Patel", "Myers", "Ross", "Foster", "Jimenez", "Powell", "Jenkins", "Perry", "Russell", "Sullivan",
    "Bell", "Coleman", "Butler", "Henderson", "Barnes", "Fisher", "Vasquez", "Simmons", "Romero", "Patterson",
    "Hamilton", "Graham", "Reynolds", "Griffin", "Wallace", "Moreno", "Hayes", "Bryant", "Herrera", "Gibson",
    "Ellis", "Tran", "Medina", "Aguilar", "Stevens", "Murray", "Castro", "Marshall", "Owens", "Fletcher",
)

CITIES: tuple[str, ...] = (
    "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo",
    "Stockholm", "Helsinki", "Warsaw", "Athens", "Amsterdam", "Brussels", "Zurich", "Munich", "Milan", "Barcelona",
    "Boston", "Chicago", "Denver", "Seattle", "Houston", "Atlanta", "Miami", "Toronto", "Montreal", "Vancouver",
    "Sydney", "Melbourne", "Tokyo", "Osaka", "Seoul", "Mumbai", "Cairo", "Nairobi", "New York", "San Francisco",
)
UNIVERSITIES: tuple[str, ...] = (
    "Stanford University", "Harvard University", "Yale University", "Princeton University", "Cornell University",
    "Columbia University", "Duke University", "Purdue University", "Emory University", "Tufts University",
    "Vanderbilt University", "Georgetown University", "Northwestern University", "Oxford University",
    "Cambridge University", "Rutgers University", "Auburn University", "Baylor University", "Clemson University",
    "Dartmouth College", "Amherst College", "Bowdoin College", "Oberlin College", "Wesleyan University",
    "Tulane University", "Villanova University", "Fordham University", "Trinity College", "Carleton College",
    "Brandeis University",
)
MAJORS: tuple[str, ...] = (
    "Biology", "Chemistry", "Physics", "Mathematics", "History", "Philosophy", "Economics", "Psychology",
    "Sociology", "Linguistics", "Geology", "Astronomy", "Computer Science", "Mechanical Engineering",
    "Civil Engineering", "Architecture", "Music", "Art History", "Political Science", "Anthropology",
    "Statistics", "Nursing", "Law", "Medicine", "Journalism", "Literature", "Ecology", "Neuroscience",
    "Finance", "Accounting",
)
EMPLOYERS: tuple[str, ...] = (
    "Google", "Microsoft", "Amazon", "Apple", "Netflix", "Intel", "Oracle", "IBM", "Adobe", "Nvidia",
    "Siemens", "Bosch", "Nokia", "Ericsson", "Philips", "Sony", "Toyota", "Honda", "Samsung", "Boeing",
    "Airbus", "Pfizer", "Novartis", "Unilever", "Nestle", "Visa", "Deloitte", "Accenture", "Spotify", "Uber",
    "Airbnb", "Tesla", "Cisco", "Dell", "Lenovo", "Panasonic", "Heineken", "Ikea", "Lufthansa", "Adidas",
)
BIRTH_YEARS: tuple[str, ...] = tuple(str(y) for y in range(1950, 2000))

#: The six attributes, in a fixed order; every answer is exactly the attribute value (1-3 words).
ATTRIBUTES: tuple[str, ...] = ("birth_year", "birth_city", "university", "major", "employer", "work_city")
#: Value pool of each attribute.
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "birth_year": BIRTH_YEARS,
    "birth_city": CITIES,
    "university": UNIVERSITIES,
    "major": MAJORS,
    "employer": EMPLOYERS,
    "work_city": CITIES,
}
#: The three populations (see the module docstring).
SPLITS: tuple[str, ...] = ("text", "memory", "heldout")
#: Number of unique names available (upper bound on ``n_people``).
MAX_PEOPLE: int = len(FIRST_NAMES) * len(LAST_NAMES)

# Words for the skill texts: common nouns plus made-up words (no names, no attribute values).
COMMON_WORDS: tuple[str, ...] = (
    "table", "chair", "window", "garden", "pencil", "cloud", "river", "mountain", "candle", "basket",
    "mirror", "ladder", "button", "blanket", "bottle", "bridge", "castle", "forest", "island", "lemon",
    "marble", "needle", "ocean", "pepper", "rabbit", "saddle", "tiger", "tunnel", "violin", "wagon",
    "anchor", "barrel", "copper", "dragon", "engine", "feather", "hammer", "jacket", "kettle", "lantern",
    "meadow", "orange", "parrot", "pillow", "puzzle", "rocket", "silver", "spoon", "thunder", "tomato",
    "turtle", "valley", "velvet", "whistle", "yellow", "zebra", "cactus", "helmet", "magnet", "walnut",
)
MADE_UP_WORDS: tuple[str, ...] = (
    "blick", "zorp", "frindle", "mulk", "tazzo", "quib", "snorf", "dravel", "plonk", "vexa",
    "grubble", "wimzy", "tork", "flimp", "zandor", "kresh", "yumble", "pafto", "glim", "norv",
    "skree", "bamtu", "dorble", "fenzi", "hoxa", "jiblet", "kwan", "lurp", "mozzle", "nibbet",
    "oxil", "prandle", "quazz", "rulbo", "sniv", "trelk", "umbo", "vantle", "wuzz", "xarn",
    "zimbo", "brask", "clune", "drisk", "flamb", "gorve", "hintle", "jorby", "klamp", "mirtle",
    "nuxo", "plib", "rask", "swib", "tupo", "vorn", "wembly", "yaxo", "zeft", "grelp",
)
SKILL_WORDS: tuple[str, ...] = COMMON_WORDS + MADE_UP_WORDS

# --------------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------------

#: Biography templates: each mentions the full name and ALL six attributes; 30-40 words, so one biography
#: fits both a 128-token reference and a 64-token training chunk of a BPE tokenizer trained on the world.
#: Placeholders: {name} {first} {he} {He} {his} {His} {him} and the attribute names.
BIO_TEMPLATES: tuple[str, ...] = (
    "{name} was born in {birth_city} in {birth_year}. {He} studied {major} at {university} and later "
    "joined {employer}. Today {he} lives and works in {work_city}, where {his} colleagues know {him} as "
    "a careful and friendly person.",
    "Born in {birth_year} in {birth_city}, {name} went on to study {major} at {university}. After "
    "graduating, {he} took a job at {employer} and moved to {work_city}. {first} still enjoys long walks "
    "and quiet evenings at home.",
    "{name} is an employee of {employer} in {work_city}. {He} was born in {birth_year} in the city of "
    "{birth_city} and earned a degree in {major} from {university}. Friends describe {him} as curious, "
    "patient and generous.",
    "The records show that {name} came into the world in {birth_year} in {birth_city}. {His} studies at "
    "{university} focused on {major}. Later {he} started working for {employer}, and {his} office is in "
    "{work_city}.",
    "{name} grew up in {birth_city}, where {he} was born in {birth_year}. {He} chose {university} to study "
    "{major}. Since then {he} has been with {employer}, working in {work_city} and helping many people "
    "along the way.",
    "Here is a short profile of {name}. Year of birth: {birth_year}. Place of birth: {birth_city}. "
    "Education: {major} at {university}. Employer: {employer}. Work location: {work_city}. {first} is "
    "known for a calm and steady manner.",
)

#: Question templates per attribute. The first :data:`N_TRAIN_QUESTION_TEMPLATES` are used in training
#: documents; the last one (:data:`HELDOUT_QUESTION_TEMPLATE`) is never used in training, so evaluation can
#: ask with a phrasing the model has not seen.
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_year": ("In what year was {name} born?", "When was {name} born?",
                   "What is the birth year of {name}?"),
    "birth_city": ("Where was {name} born?", "In which city was {name} born?",
                   "What is the birthplace of {name}?"),
    "university": ("Which university did {name} attend?", "Where did {name} go to university?",
                   "At which university was {name} educated?"),
    "major": ("What did {name} study?", "What was the major of {name}?",
              "Which field did {name} major in?"),
    "employer": ("Which company does {name} work for?", "Who employs {name}?",
                 "For which company does {name} work?"),
    "work_city": ("In which city does {name} work?", "Which city does {name} work in?",
                  "What city is the workplace of {name} in?"),
}
N_TRAIN_QUESTION_TEMPLATES: int = 2
HELDOUT_QUESTION_TEMPLATE: int = 2

SKILL_KINDS: tuple[str, ...] = ("copy", "induction", "arithmetic", "reverse", "sort")
DOC_KINDS: tuple[str, ...] = ("bio", "qa", "skill", "reading")
#: Default mixture of training documents (mostly QA, see :meth:`World.training_documents`).
#: Longest reading-comprehension document (words), so it fits one 64-token chunk.
READING_MAX_WORDS: int = 46
DEFAULT_MIX: dict[str, float] = {"qa": 0.7, "bio": 0.15, "skill": 0.15}

_FORMAT_VERSION = 1

# --------------------------------------------------------------------------------------------------
# Small records and text helpers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    """One person of the world. ``split`` is one of :data:`SPLITS`; ``bio_template`` is the template of
    the person's memory-bank biography; ``gender`` only selects pronouns."""

    pid: int
    name: str
    first_name: str
    last_name: str
    gender: str
    birth_year: str
    birth_city: str
    university: str
    major: str
    employer: str
    work_city: str
    split: str
    bio_template: int

    def attribute(self, attribute: str) -> str:
        if attribute not in ATTRIBUTES:
            raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
        return getattr(self, attribute)

    def facts(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


@dataclass(frozen=True)
class Document:
    """A training document (fits one 64-token chunk). ``person`` is the pid the document is about (None for
    skill texts) -- for analysis only; retrieval at train time must use the retriever, not this label.
    ``kind`` is one of :data:`DOC_KINDS`; ``detail`` is ``"template=i"`` (bio), the comma-separated asked
    attributes (qa) or the skill kind (skill)."""

    text: str
    person: int | None
    kind: str
    detail: str = ""


@dataclass(frozen=True)
class QAItem:
    """An evaluation question: feed ``prompt`` (== ``qa_prompt(question)``), expect ``" " + answer``."""

    person: int
    attribute: str
    question: str
    answer: str
    prompt: str


def format_qa(question: str, answer: str) -> str:
    """One QA pair as it appears in training text: ``"Q: {question} A: {answer}"``."""
    return f"Q: {question} A: {answer}"


def qa_prompt(question: str) -> str:
    """The text before the answer: ``"Q: {question} A:"``. The answer follows after one space."""
    return f"Q: {question} A:"


def extract_answer(continuation: str) -> str:
    """The answer in a generated continuation of :func:`qa_prompt`: up to the first ``"\\n"``, stripped."""
    return continuation.split("\n", 1)[0].strip()


def exact_match(continuation: str, answer: str) -> bool:
    """True iff the continuation's answer (see :func:`extract_answer`) equals ``answer`` exactly."""
    return extract_answer(continuation) == answer.strip()


def word_count(text: str) -> int:
    return len(text.split())


def _derive_rng(*keys: int) -> random.Random:
    """A ``random.Random`` seeded from a tuple of non-negative ints (deterministic, no global state)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return random.Random(int(state[0]) << 32 | int(state[1]))


def _random_person(rng: random.Random, pid: int, name_id: int, split: str) -> Person:
    """A person with name number ``name_id`` (first x last) and random attributes."""
    fi, li = divmod(name_id, len(LAST_NAMES))
    first, last = FIRST_NAMES[fi], LAST_NAMES[li]
    birth_city = rng.choice(CITIES)
    work_city = rng.choice([c for c in CITIES if c != birth_city])
    return Person(
        pid=pid, name=f"{first} {last}", first_name=first, last_name=last,
        gender="female" if fi < len(FEMALE_FIRST_NAMES) else "male",
        birth_year=rng.choice(BIRTH_YEARS), birth_city=birth_city,
        university=rng.choice(UNIVERSITIES), major=rng.choice(MAJORS),
        employer=rng.choice(EMPLOYERS), work_city=work_city,
        split=split, bio_template=rng.randrange(len(BIO_TEMPLATES)),
    )


# Stream ids for _derive_rng, so different uses of the same seed do not share random numbers.
_STREAM_PEOPLE, _STREAM_DOCS, _STREAM_EVAL, _STREAM_TOKENIZER = 1, 2, 3, 4


def _check_seed(seed: int, field: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{field} must be a non-negative int, got {seed!r}")
    return int(seed)


# --------------------------------------------------------------------------------------------------
# Skill texts (abstract skills that are not facts)
# --------------------------------------------------------------------------------------------------


def skill_example(rng: random.Random, kind: str) -> tuple[str, str]:
    """A skill text split into ``(prompt, target)``; the full text is ``prompt + " " + target``.

    Kinds (all 25-44 words; <= ~60 tokens with a byte-level BPE of >= 2048 tokens trained on
    :meth:`World.tokenizer_corpus`):

    * ``"copy"``: ``"Words: w1 ... wk\\nCopy:"`` -> ``"w1 ... wk"``
    * ``"reverse"``: ``"Words: w1 ... wk\\nReverse:"`` -> ``"wk ... w1"``
    * ``"induction"``: ``"Pairs: a1 -> b1, ..., an -> bn\\nRecall:"`` -> ``"ai -> bi, aj -> bj, ..."``
      (a subset of the pairs in random order)
    * ``"arithmetic"``: lines ``"a + b = c"`` (0 <= a, b <= 99); the prompt ends with the last ``"a + b ="``
      and the target is the last sum
    * ``"sort"``: ``"Numbers: n1 ... nk\\nSorted:"`` -> the numbers in ascending order
    """
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    if kind in ("copy", "reverse"):
        words = [rng.choice(SKILL_WORDS) for _ in range(rng.randint(12, 21))]
        target = words if kind == "copy" else words[::-1]
        label = "Copy:" if kind == "copy" else "Reverse:"
        return f"Words: {' '.join(words)}\n{label}", " ".join(target)
    if kind == "induction":
        n_pairs = rng.randint(5, 7)
        keys = rng.sample(SKILL_WORDS, n_pairs)
        values = [rng.choice(SKILL_WORDS) for _ in keys]
        pairs = [f"{k} -> {v}" for k, v in zip(keys, values)]
        recall = rng.sample(pairs, rng.randint(3, min(5, n_pairs)))
        return f"Pairs: {', '.join(pairs)}\nRecall:", ", ".join(recall)
    if kind == "arithmetic":
        lines = []
        for _ in range(rng.randint(5, 7)):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            lines.append((a, b))
        body = "\n".join(f"{a} + {b} = {a + b}" for a, b in lines[:-1])
        a, b = lines[-1]
        return f"{body}\n{a} + {b} =", str(a + b)
    if kind == "sort":
        nums = [rng.randint(0, 99) for _ in range(rng.randint(12, 16))]
        return f"Numbers: {' '.join(map(str, nums))}\nSorted:", " ".join(map(str, sorted(nums)))
    raise ValueError(f"kind must be one of {SKILL_KINDS}, got {kind!r}")


def skill_text(rng: random.Random, kind: str) -> str:
    """A full skill text (``prompt + " " + target`` of :func:`skill_example`)."""
    prompt, target = skill_example(rng, kind)
    return f"{prompt} {target}"


# --------------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------------


class World:
    """A deterministic synthetic world of people, their biographies (the memory bank) and training text.

    Build it with :meth:`World.generate`; see the module docstring for the three populations.
    """

    def __init__(self, people: Sequence[Person], *, seed: int, config: dict | None = None):
        self.people: tuple[Person, ...] = tuple(people)
        self.seed = int(seed)
        self.config = dict(config or {})
        for i, p in enumerate(self.people):
            if p.pid != i:
                raise ValueError(f"people[{i}].pid must equal its index, got {p.pid}")
            if p.split not in SPLITS:
                raise ValueError(f"people[{i}].split must be one of {SPLITS}, got {p.split!r}")
        self._by_name = {p.name: p for p in self.people}
        if len(self._by_name) != len(self.people):
            raise ValueError("people: names must be unique")
        self._by_split = {s: tuple(p for p in self.people if p.split == s) for s in SPLITS}

    # ---- construction -----------------------------------------------------------------------------

    @classmethod
    def generate(
        cls,
        n_people: int = 2000,
        *,
        seed: int = 0,
        text_fraction: float = 0.15,
        heldout_fraction: float = 0.2,
    ) -> "World":
        """Generate ``n_people`` people with unique names and random attributes, and split them.

        Splits (disjoint, sizes ``round(n * fraction)``):

        * ``text``  -- ``text_fraction`` of the people: biographies (several templates) and QA in training.
        * ``heldout`` -- ``heldout_fraction``: biography only in the memory bank, nowhere in training.
        * ``memory`` -- all the rest (``1 - text_fraction - heldout_fraction``): biography only in the memory
          bank, QA about them in training.

        ``birth_city`` and ``work_city`` always differ, so a question about one cannot be answered with the other.
        """
        if isinstance(n_people, bool) or not isinstance(n_people, (int, np.integer)):
            raise ValueError(f"n_people must be an int, got {n_people!r}")
        n_people = int(n_people)
        if not 1 <= n_people <= MAX_PEOPLE:
            raise ValueError(f"n_people must be in [1, {MAX_PEOPLE}] (unique names available), got {n_people}")
        seed = _check_seed(seed)
        for field, value in (("text_fraction", text_fraction), ("heldout_fraction", heldout_fraction)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{field} must be a number in [0, 1], got {value!r}")
        if text_fraction + heldout_fraction > 1.0 + 1e-12:
            raise ValueError(
                f"text_fraction + heldout_fraction must be <= 1, got {text_fraction} + {heldout_fraction}")

        rng = _derive_rng(seed, _STREAM_PEOPLE)
        name_ids = rng.sample(range(MAX_PEOPLE), n_people)
        n_text = min(n_people, int(round(n_people * text_fraction)))
        n_heldout = min(n_people - n_text, int(round(n_people * heldout_fraction)))
        order = rng.sample(range(n_people), n_people)
        split_of = {}
        for rank, pid in enumerate(order):
            split_of[pid] = "heldout" if rank < n_heldout else ("text" if rank < n_heldout + n_text else "memory")

        people = [_random_person(rng, pid, k, split_of[pid]) for pid, k in enumerate(name_ids)]
        config = {"n_people": n_people, "text_fraction": float(text_fraction),
                  "heldout_fraction": float(heldout_fraction)}
        return cls(people, seed=seed, config=config)

    # ---- lookup -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.people)

    def person(self, key: int | str | Person) -> Person:
        """A person by pid, by full name, or a Person passed through."""
        if isinstance(key, Person):
            return key
        if isinstance(key, str):
            try:
                return self._by_name[key]
            except KeyError:
                raise KeyError(f"no person named {key!r}") from None
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not 0 <= key < len(self.people):
            raise KeyError(f"no person with pid {key!r}")
        return self.people[int(key)]

    def people_in(self, split: str) -> tuple[Person, ...]:
        """People of one split (in pid order)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._by_split[split]

    # ---- texts ------------------------------------------------------------------------------------

    def biography(self, person: int | str | Person, template: int | None = None) -> str:
        """The biography of ``person`` with ``template`` (None -> the person's own ``bio_template``)."""
        p = self.person(person)
        t = p.bio_template if template is None else template
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < len(BIO_TEMPLATES):
            raise ValueError(f"template must be in [0, {len(BIO_TEMPLATES)}), got {template!r}")
        female = p.gender == "female"
        return BIO_TEMPLATES[int(t)].format(
            name=p.name, first=p.first_name,
            he="she" if female else "he", He="She" if female else "He",
            his="her" if female else "his", His="Her" if female else "His",
            him="her" if female else "him", **p.facts())

    def fictitious_person(self, rng: random.Random) -> Person:
        """A made-up person whose name nobody in this world has (pid -1, split ``"fiction"``), for the
        reading-comprehension texts: facts that exist only inside one training document."""
        if len(self.people) >= MAX_PEOPLE:
            raise ValueError("every name is taken: a world of MAX_PEOPLE people has no room for fictitious people")
        while True:
            k = rng.randrange(MAX_PEOPLE)
            fi, li = divmod(k, len(LAST_NAMES))
            if f"{FIRST_NAMES[fi]} {LAST_NAMES[li]}" not in self._by_name:
                return _random_person(rng, -1, k, "fiction")

    def references(self) -> list[str]:
        """The memory bank: one biography per person (index = pid), all people of all splits."""
        return [self.biography(p) for p in self.people]

    def qa(self, person: int | str | Person, attribute: str, template: int | None = None) -> tuple[str, str]:
        """``(question, answer)`` about ``attribute`` of ``person``; the answer is exactly the attribute value.

        ``template`` None -> a deterministic per-(person, attribute) choice among the training templates
        (indices ``< N_TRAIN_QUESTION_TEMPLATES``); ``HELDOUT_QUESTION_TEMPLATE`` is the evaluation-only phrasing.
        """
        p = self.person(person)
        if attribute not in ATTRIBUTES:
            raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
        templates = QUESTION_TEMPLATES[attribute]
        if template is None:
            template = (p.pid + ATTRIBUTES.index(attribute)) % N_TRAIN_QUESTION_TEMPLATES
        if isinstance(template, bool) or not isinstance(template, (int, np.integer)) \
                or not 0 <= template < len(templates):
            raise ValueError(f"template must be in [0, {len(templates)}), got {template!r}")
        return templates[int(template)].format(name=p.name), p.attribute(attribute)

    # ---- training documents -----------------------------------------------------------------------

    def training_documents(
        self,
        n_docs: int,
        *,
        seed: int = 0,
        mix: dict[str, float] | None = None,
        qa_splits: Iterable[str] = ("memory", "text"),
        skill_kinds: Iterable[str] = SKILL_KINDS,
        qa_min_words: int = 25,
        qa_max_words: int = 45,
    ) -> list[Document]:
        """A deterministic stream of ``n_docs`` short training documents (each fits a 64-token chunk).

        Kinds, drawn with weights ``mix`` (default :data:`DEFAULT_MIX` = 70 % qa, 15 % bio, 15 % skill):

        * ``"bio"``: a biography of a ``text`` person with a random template (paraphrase-robust facts).
        * ``"qa"``: QA pairs (training phrasings only) about ONE person drawn uniformly from ``qa_splits``
          (default ``memory`` and ``text`` people), distinct attributes, joined with ``"\\n"``; pairs are added
          until the document has at least ``qa_min_words`` words without exceeding ``qa_max_words`` (so one
          retrieved reference -- that person's biography -- covers the whole chunk).
        * ``"skill"``: a skill text (:func:`skill_text`) of a kind drawn uniformly from ``skill_kinds``.
        * ``"reading"``: reading comprehension, an abstract skill: the biography of a fictitious person (a name
          no one in the world has, :meth:`fictitious_person`) followed by one QA pair about it, so the fact is
          needed only inside this document (``person`` is None, ``detail`` the asked attribute).

        ``heldout`` people never appear, and ``memory`` people's biographies never appear.
        """
        if isinstance(n_docs, bool) or not isinstance(n_docs, (int, np.integer)) or n_docs < 0:
            raise ValueError(f"n_docs must be a non-negative int, got {n_docs!r}")
        seed = _check_seed(seed)
        mix = dict(DEFAULT_MIX if mix is None else mix)
        for k, w in mix.items():
            if k not in DOC_KINDS:
                raise ValueError(f"mix keys must be in {DOC_KINDS}, got {k!r}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                raise ValueError(f"mix[{k!r}] must be a non-negative number, got {w!r}")
        if sum(mix.values()) <= 0:
            raise ValueError(f"mix must have a positive total weight, got {mix}")
        qa_splits = tuple(qa_splits)
        for s in qa_splits:
            if s not in ("memory", "text"):
                raise ValueError(f"qa_splits may contain only 'memory' and 'text' (never 'heldout'), got {s!r}")
        skill_kinds = tuple(skill_kinds)
        for s in skill_kinds:
            if s not in SKILL_KINDS:
                raise ValueError(f"skill_kinds must be in {SKILL_KINDS}, got {s!r}")
        if not 1 <= qa_min_words <= qa_max_words:
            raise ValueError(f"qa_min_words/qa_max_words must satisfy 1 <= min <= max, got "
                             f"{qa_min_words}/{qa_max_words}")
        text_people = self._by_split["text"]
        qa_people = tuple(p for s in dict.fromkeys(qa_splits) for p in self._by_split[s])
        if mix.get("bio", 0) > 0 and not text_people:
            raise ValueError("mix['bio'] must be 0: the world has no 'text' people")
        if mix.get("qa", 0) > 0 and not qa_people:
            raise ValueError(f"mix['qa'] must be 0: no people in qa_splits={qa_splits}")
        if mix.get("skill", 0) > 0 and not skill_kinds:
            raise ValueError("mix['skill'] must be 0 when skill_kinds is empty")

        kinds = [k for k in DOC_KINDS if mix.get(k, 0) > 0]
        weights = [mix[k] for k in kinds]
        rng = _derive_rng(self.seed, _STREAM_DOCS, seed)
        docs: list[Document] = []
        for _ in range(int(n_docs)):
            kind = rng.choices(kinds, weights)[0]
            if kind == "bio":
                p = rng.choice(text_people)
                t = rng.randrange(len(BIO_TEMPLATES))
                docs.append(Document(self.biography(p, t), p.pid, "bio", f"template={t}"))
            elif kind == "qa":
                p = rng.choice(qa_people)
                lines, asked, n_words = [], [], 0
                for attribute in rng.sample(ATTRIBUTES, len(ATTRIBUTES)):
                    q, a = self.qa(p, attribute, rng.randrange(N_TRAIN_QUESTION_TEMPLATES))
                    line = format_qa(q, a)
                    w = word_count(line)
                    if lines and n_words + w > qa_max_words:
                        continue
                    lines.append(line)
                    asked.append(attribute)
                    n_words += w
                    if n_words >= qa_min_words:
                        break
                docs.append(Document("\n".join(lines), p.pid, "qa", ",".join(asked)))
            elif kind == "reading":
                fits = []
                while not fits:  # keep it within one 64-token chunk (a new person if no template fits)
                    p = self.fictitious_person(rng)
                    a = rng.choice(ATTRIBUTES)
                    q, ans = self.qa(p, a, rng.randrange(N_TRAIN_QUESTION_TEMPLATES))
                    texts = [self.biography(p, t) + "\n" + format_qa(q, ans) for t in range(len(BIO_TEMPLATES))]
                    fits = [t for t in texts if word_count(t) <= READING_MAX_WORDS]
                text = rng.choice(fits)
                docs.append(Document(text, None, "reading", a))
            else:
                k = rng.choice(skill_kinds)
                docs.append(Document(skill_text(rng, k), None, "skill", k))
        return docs

    # ---- evaluation -------------------------------------------------------------------------------

    def group_lookalikes(self, docs: Sequence[Document], group_size: int, *, seed: int = 0) -> list[Document]:
        """The same documents, reordered so that each run of ``group_size`` consecutive documents is, where
        possible, about people who share a first or a last name (documents about no one form their own runs).

        Packed ``group_size`` chunks to a sequence, this makes the references of the earlier chunks -- which
        continual training lets each chunk read besides its own (§3.6) -- look-alikes of the right one: the
        same hard distractors that retrieval returns next to it at test time (issue 4, deviation 57).
        """
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        rng = _derive_rng(self.seed, _STREAM_DOCS, _check_seed(seed) + 7919)
        buckets: dict[tuple[str, str], list[Document]] = {}
        rest: list[Document] = []
        for d in docs:
            if d.person is None:
                rest.append(d)
                continue
            p = self.people[d.person]
            key = ("last", p.last_name) if rng.random() < 0.5 else ("first", p.first_name)
            buckets.setdefault(key, []).append(d)
        groups: list[list[Document]] = []
        for key in sorted(buckets):
            ds = buckets[key]
            rng.shuffle(ds)
            full = len(ds) - len(ds) % group_size
            groups += [ds[i:i + group_size] for i in range(0, full, group_size)]
            rest += ds[full:]
        rng.shuffle(rest)
        full = len(rest) - len(rest) % group_size
        groups += [rest[i:i + group_size] for i in range(0, full, group_size)]
        rng.shuffle(groups)
        return [d for g in groups for d in g] + rest[full:]  # a short last run stays last: runs keep aligned

    def eval_questions(
        self,
        split: str,
        n: int | None = None,
        *,
        seed: int = 0,
        phrasing: str = "heldout",
        attributes: Iterable[str] = ATTRIBUTES,
    ) -> list[QAItem]:
        """Evaluation questions about the people of ``split``.

        ``n`` None -> every (person, attribute) pair in pid order; else a seeded sample of ``n`` distinct pairs.
        ``phrasing="heldout"`` (default) uses the evaluation-only template :data:`HELDOUT_QUESTION_TEMPLATE`,
        a phrasing never seen in training (so ``memory``/``text`` scores are not phrasing recall);
        ``phrasing="train"`` uses the person's default training template (:meth:`qa` with ``template=None``).
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if phrasing not in ("heldout", "train"):
            raise ValueError(f"phrasing must be 'heldout' or 'train', got {phrasing!r}")
        attributes = tuple(attributes)
        for a in attributes:
            if a not in ATTRIBUTES:
                raise ValueError(f"attributes must be in {ATTRIBUTES}, got {a!r}")
        seed = _check_seed(seed)
        pairs = [(p, a) for p in self._by_split[split] for a in attributes]
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= len(pairs):
                raise ValueError(f"n must be an int in [0, {len(pairs)}] for split {split!r}, got {n!r}")
            pairs = _derive_rng(self.seed, _STREAM_EVAL, seed).sample(pairs, int(n))
        template = HELDOUT_QUESTION_TEMPLATE if phrasing == "heldout" else None
        items = []
        for p, a in pairs:
            q, ans = self.qa(p, a, template)
            items.append(QAItem(person=p.pid, attribute=a, question=q, answer=ans, prompt=qa_prompt(q)))
        return items

    # ---- tokenizer --------------------------------------------------------------------------------

    def tokenizer_corpus(self, *, n_skill_texts: int = 2000, seed: int = 0) -> list[str]:
        """Texts to train the BPE tokenizer on: every biography template of every person, every QA phrasing
        (including the evaluation-only one) of every (person, attribute), and ``n_skill_texts`` skill texts.

        It includes ``heldout`` people on purpose, so every name is tokenised compactly. This is not a leak of
        facts: a BPE tokenizer only learns merges of frequent strings, not which city belongs to whom.
        """
        if isinstance(n_skill_texts, bool) or not isinstance(n_skill_texts, (int, np.integer)) or n_skill_texts < 0:
            raise ValueError(f"n_skill_texts must be a non-negative int, got {n_skill_texts!r}")
        seed = _check_seed(seed)
        texts = [self.biography(p, t) for p in self.people for t in range(len(BIO_TEMPLATES))]
        for p in self.people:
            for a in ATTRIBUTES:
                for t in range(len(QUESTION_TEMPLATES[a])):
                    texts.append(format_qa(*self.qa(p, a, t)))
        rng = _derive_rng(self.seed, _STREAM_TOKENIZER, seed)
        texts.extend(skill_text(rng, SKILL_KINDS[i % len(SKILL_KINDS)]) for i in range(int(n_skill_texts)))
        return texts

    # ---- persistence and summary ------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({"format_version": _FORMAT_VERSION, "seed": self.seed, "config": self.config,
                           "people": [asdict(p) for p in self.people]})

    @classmethod
    def from_json(cls, text: str) -> "World":
        data = json.loads(text)
        if data.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"format_version must be {_FORMAT_VERSION}, got {data.get('format_version')!r}")
        return cls([Person(**p) for p in data["people"]], seed=data["seed"], config=data.get("config"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "World":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, World) and self.people == other.people and self.seed == other.seed

    __hash__ = None  # mutable-looking container; equality by content

    def summary(self) -> dict:
        """Counts per split and biography length statistics (words)."""
        bio_words = [word_count(b) for b in self.references()]
        return {
            "seed": self.seed,
            "n_people": len(self.people),
            **{f"n_{s}": len(self._by_split[s]) for s in SPLITS},
            "n_attributes": len(ATTRIBUTES),
            "n_bio_templates": len(BIO_TEMPLATES),
            "mean_bio_words": float(np.mean(bio_words)) if bio_words else 0.0,
            "min_bio_words": min(bio_words, default=0),
            "max_bio_words": max(bio_words, default=0),
            "values_per_attribute": {a: len(ATTRIBUTE_VALUES[a]) for a in ATTRIBUTES},
            "max_people": MAX_PEOPLE,
        }

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={len(self._by_split[s])}" for s in SPLITS)
        return f"World(n_people={len(self.people)}, seed={self.seed}, {counts})"


__all__ = [
    "ATTRIBUTES", "ATTRIBUTE_VALUES", "BIO_TEMPLATES", "DEFAULT_MIX", "DOC_KINDS", "Document",
    "HELDOUT_QUESTION_TEMPLATE", "MAX_PEOPLE", "N_TRAIN_QUESTION_TEMPLATES", "Person", "QAItem",
    "QUESTION_TEMPLATES", "SKILL_KINDS", "SKILL_WORDS", "SPLITS", "World", "exact_match", "extract_answer",
    "format_qa", "qa_prompt", "skill_example", "skill_text", "word_count",
]
