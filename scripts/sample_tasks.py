"""Synthetic English sentence-classification tasks for the sample LoRA adapters.

Every task is generated deterministically from templates and word lists, so the
same ``(task_name, n, seed)`` always gives the same examples.  The tasks are meant
to be learnable by a LoRA-tuned MiniLM but not solvable from surface word
statistics alone: most of them hinge on word order, negation scope, voice or
number magnitude, and a small fraction of labels is flipped at random (see
``LABEL_NOISE``) so that a tuned model lands below 100% on held-out data.

Importing this module has no side effects.

Public API
----------
TASKS : dict[str, int]
    task name -> number of labels.
LABEL_NAMES : dict[str, list[str]]
    task name -> human-readable label names (index == label id).
make_examples(task_name, n, seed, label_noise=None) -> (list[str], list[int])
"""

from __future__ import annotations

import random
import zlib
from typing import Callable

__all__ = ["TASKS", "LABEL_NAMES", "LABEL_NOISE", "make_examples", "describe"]

# ---------------------------------------------------------------------------
# shared word lists
# ---------------------------------------------------------------------------

NAMES = [
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry",
    "Irene", "Jack", "Karen", "Leo", "Maria", "Nick", "Olivia", "Peter",
    "Rachel", "Sam", "Tina", "Victor",
]

NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen",
    "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
]

PLACES = ["the park", "the station", "the office", "the market", "the library",
          "the river", "the school", "the harbor"]


def _pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


# ---------------------------------------------------------------------------
# task 1: topic4 -- topic of the main clause, with a distracting aside
# ---------------------------------------------------------------------------

_TOPIC_CLAUSES = {
    0: [  # sports
        "the team scored in the final minute",
        "the striker missed an easy penalty",
        "the coach changed the lineup at halftime",
        "the runner finished the marathon in record time",
        "the referee stopped the match for a foul",
        "the goalkeeper saved two shots",
        "the players trained hard before the tournament",
        "the tennis final went to a fifth set",
    ],
    1: [  # food
        "the soup needed more salt",
        "the chef baked fresh bread for dinner",
        "the pasta was cooked with garlic and basil",
        "the bakery ran out of croissants early",
        "the recipe called for two cups of flour",
        "the restaurant served grilled fish",
        "the cake was left in the oven too long",
        "the curry was far too spicy",
    ],
    2: [  # technology
        "the laptop kept crashing after the update",
        "the new phone has a faster processor",
        "the software team fixed the login bug",
        "the server went offline during the night",
        "the app now syncs files to the cloud",
        "the engineers released a new version of the code",
        "the battery of the tablet drains quickly",
        "the network router had to be restarted",
    ],
    3: [  # weather
        "heavy rain flooded the streets",
        "the storm knocked down several trees",
        "a cold wind blew from the north",
        "the forecast promised sunshine all week",
        "thick fog covered the valley",
        "snow fell through the whole night",
        "the heat wave broke another record",
        "thunder rolled over the hills",
    ],
}

_TOPIC_ASIDES = {
    0: ["the football game", "the match", "the race", "the score"],
    1: ["lunch", "the menu", "dessert", "the groceries"],
    2: ["the computer", "an email", "the phone", "the website"],
    3: ["the rain", "the weather", "the storm", "the temperature"],
}

_TOPIC_FRAMES = [
    "{main}.",
    "{Main}, although everyone was talking about {aside}.",
    "Nobody cared about {aside}; {main}.",
    "Forget {aside}: {main}.",
    "While we were discussing {aside}, {main}.",
    "{Main}, which mattered more than {aside}.",
    "Even with {aside} on our minds, {main}.",
]


def _gen_topic4(rng: random.Random):
    label = rng.randrange(4)
    main = _pick(rng, _TOPIC_CLAUSES[label])
    frame = _pick(rng, _TOPIC_FRAMES)
    other = _pick(rng, [t for t in range(4) if t != label])
    aside = _pick(rng, _TOPIC_ASIDES[other])
    text = frame.format(main=main, Main=main[0].upper() + main[1:], aside=aside)
    return text[0].upper() + text[1:], label


# ---------------------------------------------------------------------------
# task 2: sentiment_negation -- polarity with negation and "but" clauses
# ---------------------------------------------------------------------------

_SENT_SUBJECTS = ["the movie", "the food", "the hotel", "the concert", "the book",
                  "the service", "the game", "the trip", "the show", "the meal"]
_POS_ADJ = ["good", "great", "wonderful", "enjoyable", "excellent", "pleasant",
            "fun", "impressive"]
_NEG_ADJ = ["bad", "awful", "boring", "terrible", "disappointing", "dull",
            "annoying", "poor"]


def _sentiment_clause(rng: random.Random, subject: str):
    """Return (clause, polarity) where polarity 1 = positive."""
    base_pol = rng.randrange(2)
    adj = _pick(rng, _POS_ADJ if base_pol else _NEG_ADJ)
    negated = rng.random() < 0.5
    if negated:
        form = _pick(rng, [
            "{s} was not {a}",
            "{s} was never {a}",
            "{s} was far from {a}",
            "{s} was hardly {a}",
            "I would not say {s} was {a}",
            "nobody thought {s} was {a}",
            "{s} was not at all {a}",
        ])
        pol = 1 - base_pol
    else:
        form = _pick(rng, [
            "{s} was {a}",
            "{s} was really {a}",
            "I thought {s} was {a}",
            "everyone agreed {s} was {a}",
            "{s} was quite {a}",
            "honestly, {s} was {a}",
            "{s} was not just {a} but very {a}",
        ])
        pol = base_pol
    return form.format(s=subject, a=adj), pol


def _gen_sentiment_negation(rng: random.Random):
    s1 = _pick(rng, _SENT_SUBJECTS)
    c1, p1 = _sentiment_clause(rng, s1)
    if rng.random() < 0.35:
        # "A but B": the clause after "but" decides the label.
        s2 = _pick(rng, _SENT_SUBJECTS)
        c2, p2 = _sentiment_clause(rng, s2)
        text, label = f"{c1}, but {c2}.", p2
    else:
        text, label = f"{c1}.", p1
    return text[0].upper() + text[1:], label


# ---------------------------------------------------------------------------
# task 3: animal_tool -- does the sentence mention an animal, a tool, both, neither
# ---------------------------------------------------------------------------

_ANIMALS = ["dog", "cat", "horse", "rabbit", "goat", "parrot", "fox", "turtle",
            "sheep", "owl", "hamster", "donkey"]
_TOOLS = ["hammer", "wrench", "screwdriver", "saw", "drill", "shovel", "chisel",
          "pliers", "rake", "ladder", "axe", "crowbar"]
_NEUTRAL = ["lamp", "chair", "basket", "blanket", "bottle", "table", "book",
            "pillow", "bucket", "box", "mirror", "bicycle"]
# words that look like animals/tools but are used figuratively or as other things
_DECOY_PHRASES = ["a hot dog", "a paper crane", "a computer mouse", "a teddy bear",
                  "a fish-shaped cookie", "a tool catalog", "a horse-riding magazine",
                  "a saw-tooth pattern"]


def _gen_animal_tool(rng: random.Random):
    label = rng.randrange(4)  # 0 neither, 1 animal only, 2 tool only, 3 both
    objs = []
    if label in (1, 3):
        objs.append("the " + _pick(rng, _ANIMALS))
    if label in (2, 3):
        objs.append("the " + _pick(rng, _TOOLS))
    while len(objs) < 2:
        objs.append("the " + _pick(rng, _NEUTRAL))
    rng.shuffle(objs)
    name = _pick(rng, NAMES)
    frame = _pick(rng, [
        "{n} found {a} next to {b}.",
        "{n} put {a} beside {b} in the shed.",
        "There was {a} behind {b} in the garage.",
        "{n} saw {a} and {b} near the barn.",
        "{n} moved {a} away from {b}.",
        "In the yard, {a} lay close to {b}.",
    ])
    text = frame.format(n=name, a=objs[0], b=objs[1])
    if rng.random() < 0.4:
        text = text[:-1] + f", holding {_pick(rng, _DECOY_PHRASES)}."
    return text[0].upper() + text[1:], label


# ---------------------------------------------------------------------------
# task 4: who_did -- did the first- or the second-mentioned person act?
# ---------------------------------------------------------------------------

_VERBS = [("helped", "helped"), ("called", "called"), ("thanked", "thanked"),
          ("pushed", "pushed"), ("visited", "visited"), ("praised", "praised"),
          ("blamed", "blamed"), ("warned", "warned"), ("hugged", "hugged"),
          ("interviewed", "interviewed")]


def _gen_who_did(rng: random.Random):
    a, b = rng.sample(NAMES, 2)
    verb, part = _pick(rng, _VERBS)
    place = _pick(rng, PLACES)
    form = rng.randrange(6)
    if form == 0:    # active
        text, label = f"{a} {verb} {b}.", 0
    elif form == 1:  # active with a distracting "by"
        text, label = f"{a} {verb} {b} by {place}.", 0
    elif form == 2:  # passive: the agent comes second
        text, label = f"{a} was {part} by {b}.", 1
    elif form == 3:  # passive with a location
        text, label = f"{a} was {part} by {b} at {place}.", 1
    elif form == 4:  # cleft, agent first
        text, label = f"It was {a} who {verb} {b}.", 0
    else:            # cleft, agent second
        text, label = f"It was {a} whom {b} {verb}.", 1
    return text, label


# ---------------------------------------------------------------------------
# task 5: number_compare -- who has more, numbers written as words
# ---------------------------------------------------------------------------

_ITEMS = ["apples", "coins", "books", "stamps", "marbles", "cards", "pencils",
          "shells"]


def _gen_number_compare(rng: random.Random):
    x, y = rng.sample(range(1, len(NUMBER_WORDS)), 2)
    a, b = rng.sample(NAMES, 2)
    item = _pick(rng, _ITEMS)
    wx, wy = NUMBER_WORDS[x], NUMBER_WORDS[y]
    frame = _pick(rng, [
        "{a} has {wx} {item} and {b} has {wy}.",
        "{a} collected {wx} {item}, while {b} collected {wy}.",
        "There are {wx} {item} for {a} and {wy} for {b}.",
        "{a} owns {wx} {item}; {b} owns {wy} {item}.",
    ])
    text = frame.format(a=a, b=b, wx=wx, wy=wy, item=item)
    label = 0 if x > y else 1  # 0: first-named person has more
    return text, label


# ---------------------------------------------------------------------------
# task 6: verb_tense -- past / present / future of the main verb,
#         with time adverbs that do not always agree with obvious cues
# ---------------------------------------------------------------------------

_TENSE_VERBS = [  # (base, 3rd person, past, past participle, -ing)
    ("walk", "walks", "walked", "walked", "walking"),
    ("cook", "cooks", "cooked", "cooked", "cooking"),
    ("paint", "paints", "painted", "painted", "painting"),
    ("read", "reads", "read", "read", "reading"),
    ("write", "writes", "wrote", "written", "writing"),
    ("swim", "swims", "swam", "swum", "swimming"),
    ("sing", "sings", "sang", "sung", "singing"),
    ("study", "studies", "studied", "studied", "studying"),
    ("drive", "drives", "drove", "driven", "driving"),
    ("play", "plays", "played", "played", "playing"),
]

_PAST_ADV = ["yesterday", "last week", "two days ago", "earlier"]
_PRES_ADV = ["right now", "every day", "these days", "usually"]
_FUT_ADV = ["tomorrow", "next week", "later", "soon"]


def _gen_verb_tense(rng: random.Random):
    label = rng.randrange(3)  # 0 past, 1 present, 2 future
    name = _pick(rng, NAMES)
    base, third, past, pp, ing = _pick(rng, _TENSE_VERBS)
    if label == 0:
        vp = _pick(rng, [past, f"was {ing}", f"had {pp}"])
        adv = _PAST_ADV
    elif label == 1:
        vp = _pick(rng, [third, f"is {ing}", f"keeps {ing}"])
        adv = _PRES_ADV
    else:
        vp = _pick(rng, [f"will {base}", f"is going to {base}", f"will be {ing}"])
        adv = _FUT_ADV
    r = rng.random()
    if r < 0.45:
        text = f"{name} {vp}."
    elif r < 0.8:
        text = f"{name} {vp} {_pick(rng, adv)}."
    else:
        # a subordinate clause in a *different* tense; the main verb decides
        other = _pick(rng, [t for t in range(3) if t != label])
        sub = {0: "after the guests left", 1: "while the radio plays",
               2: "once the guests arrive"}[other]
        sub = _pick(rng, [sub, {0: "because it rained", 1: "because it is sunny",
                                2: "if it stays dry"}[other]])
        text = f"{name} {vp} {sub}."
    return text, label


# ---------------------------------------------------------------------------
# task 7: event_order -- did the first-mentioned event happen first?
# ---------------------------------------------------------------------------

_EVENTS = [  # (finite past clause, gerund)
    ("she ate lunch", "eating lunch"),
    ("she went home", "going home"),
    ("she called her sister", "calling her sister"),
    ("she washed the car", "washing the car"),
    ("she read the letter", "reading the letter"),
    ("she fed the cat", "feeding the cat"),
    ("she locked the door", "locking the door"),
    ("she watched the news", "watching the news"),
    ("she paid the bill", "paying the bill"),
    ("she took a shower", "taking a shower"),
]


def _gen_event_order(rng: random.Random):
    (e1, g1), (e2, g2) = rng.sample(_EVENTS, 2)
    form = rng.randrange(6)
    # label 0: the event mentioned first happened first; 1: it happened second
    if form == 0:
        text, label = f"{e1} before {e2}.", 0
    elif form == 1:
        text, label = f"{e1} after {e2}.", 1
    elif form == 2:
        text, label = f"Before {e2}, {e1}.", 1   # e2 mentioned first, happened second
    elif form == 3:
        text, label = f"After {e2}, {e1}.", 0    # e2 first in text and in time
    elif form == 4:
        text, label = f"{e1}, and then {e2}.", 0
    else:
        text, label = f"{e1}, but only after {g2}.", 1
    return text[0].upper() + text[1:], label


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------

_GENERATORS: dict[str, tuple[int, Callable[[random.Random], tuple[str, int]], list[str]]] = {
    "topic4": (4, _gen_topic4, ["sports", "food", "technology", "weather"]),
    "sentiment_negation": (2, _gen_sentiment_negation, ["negative", "positive"]),
    "animal_tool": (4, _gen_animal_tool, ["neither", "animal", "tool", "both"]),
    "who_did": (2, _gen_who_did, ["first_named_acts", "second_named_acts"]),
    "number_compare": (2, _gen_number_compare, ["first_has_more", "second_has_more"]),
    "verb_tense": (3, _gen_verb_tense, ["past", "present", "future"]),
    "event_order": (2, _gen_event_order, ["first_mentioned_first", "first_mentioned_second"]),
}

TASKS: dict[str, int] = {name: spec[0] for name, spec in _GENERATORS.items()}
LABEL_NAMES: dict[str, list[str]] = {name: list(spec[2]) for name, spec in _GENERATORS.items()}

# Fraction of examples whose label is replaced by a uniformly drawn *different*
# label.  Applied identically to train and held-out sets, so it caps attainable
# accuracy at about 1 - LABEL_NOISE.
LABEL_NOISE: float = 0.04


def _task_seed(task_name: str, seed: int) -> int:
    # stable across processes (unlike hash(), which is salted per process)
    return (zlib.crc32(task_name.encode("utf-8")) * 1_000_003 + int(seed)) & 0xFFFFFFFF


def make_examples(task_name: str, n: int, seed: int,
                  label_noise: float | None = None) -> tuple[list[str], list[int]]:
    """Generate ``n`` labelled sentences for ``task_name`` deterministically.

    ``label_noise`` defaults to :data:`LABEL_NOISE`; pass ``0.0`` for clean labels.
    Different seeds give (almost surely) different samples, so use e.g. seed 0 for
    training and seed 1 for held-out evaluation.
    """
    if task_name not in _GENERATORS:
        raise KeyError(f"unknown task {task_name!r}; known: {sorted(_GENERATORS)}")
    num_labels, gen, _ = _GENERATORS[task_name]
    noise = LABEL_NOISE if label_noise is None else float(label_noise)
    rng = random.Random(_task_seed(task_name, seed))
    texts: list[str] = []
    labels: list[int] = []
    for _ in range(int(n)):
        text, label = gen(rng)
        if noise > 0 and rng.random() < noise:
            label = (label + 1 + rng.randrange(num_labels - 1)) % num_labels
        texts.append(text)
        labels.append(int(label))
    return texts, labels


def describe(task_name: str) -> str:
    """One-line human-readable description of a task's labels."""
    return f"{task_name}: {TASKS[task_name]} labels ({', '.join(LABEL_NAMES[task_name])})"
