"""Synthetic English sentence-classification tasks for the sample LoRA adapters.

Every task is generated deterministically from templates and word lists, so the
same ``(task_name, n, seed)`` always gives the same examples.

The tasks are meant to be learnable by a LoRA-tuned MiniLM in a short CPU run,
but not to saturate: a tuned model should leave a few percent of clean held-out
examples wrong, so that accuracy reacts when the adapter is perturbed (e.g. by
lossy compression).  Three mechanisms provide that graded difficulty:

* **long-tail vocabulary** -- words are drawn from lists ordered common -> rare
  with Zipf-like weights, so many held-out sentences contain words (rare animals,
  irregular past tenses, unusual adjectives) seen only a few times in training;
* **graded magnitudes** -- numbers, clock times, object sizes and sentiment
  intensities, where pairs close to the decision boundary are hard;
* **structure and ambiguity** -- negation scope, main vs. subordinate clause,
  active vs. passive voice, before/after ordering, polysemous words ("the batter",
  "the server", "the chips").

On top of that a small fraction of labels is flipped at random (``LABEL_NOISE``;
pass ``label_noise=0.0`` for clean labels).

Importing this module has no side effects.

Public API
----------
TASKS : dict[str, int]
    task name -> number of labels.
LABEL_NAMES : dict[str, list[str]]
    task name -> label names (index == label id).
make_examples(task_name, n, seed, label_noise=None) -> (list[str], list[int])
"""

from __future__ import annotations

import itertools
import random
import zlib
from typing import Callable, Sequence

__all__ = ["TASKS", "LABEL_NAMES", "LABEL_NOISE", "make_examples", "describe"]

# ---------------------------------------------------------------------------
# helpers and shared word lists
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
_TENS = {20: "twenty", 30: "thirty", 40: "forty", 50: "fifty"}


def _number_word(k: int) -> str:
    if k < len(NUMBER_WORDS):
        return NUMBER_WORDS[k]
    tens, unit = (k // 10) * 10, k % 10
    return _TENS[tens] + ("" if unit == 0 else "-" + NUMBER_WORDS[unit])


def _pick(rng: random.Random, seq: Sequence):
    return seq[rng.randrange(len(seq))]


_ZIPF_CACHE: dict[tuple[int, float], list[float]] = {}


def _zipf(rng: random.Random, seq: Sequence, s: float = 1.0):
    """Pick from ``seq`` (ordered common -> rare) with weights 1/(rank+1)^s."""
    key = (len(seq), s)
    cum = _ZIPF_CACHE.get(key)
    if cum is None:
        cum = list(itertools.accumulate(1.0 / (i + 1) ** s for i in range(len(seq))))
        _ZIPF_CACHE[key] = cum
    return rng.choices(seq, cum_weights=cum, k=1)[0]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


# ---------------------------------------------------------------------------
# task 1: topic4 -- topic of the main clause; a subordinate clause is about
#         another topic; long-tail and polysemous clauses
# ---------------------------------------------------------------------------

_TOPIC_CLAUSES = {
    0: [  # sports (common -> rare; several polysemous ones near the end)
        "the team scored in the final minute",
        "the striker missed an easy penalty",
        "the coach changed the lineup at halftime",
        "the runner finished the marathon in record time",
        "the referee stopped the match for a foul",
        "the goalkeeper saved two shots",
        "the tennis final went to a fifth set",
        "the players trained hard before the tournament",
        "the relay team dropped the baton",
        "the boxer won on points",
        "the pitcher threw a perfect game",
        "the batter struck out twice",
        "the server double-faulted on match point",
        "the heat beat the celtics in overtime",
        "the peloton caught the breakaway",
        "the libero dug out a spike",
        "the fly-half kicked a drop goal",
        "the wicketkeeper stumped the opener",
        "the skip called for a takeout",
        "the coxswain steadied the eight",
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
        "the pancakes came with maple syrup",
        "the stew simmered for hours",
        "the batter was too runny to pour",
        "the chips were too salty to finish",
        "the cookies burned on the bottom",
        "the sommelier decanted the claret",
        "the roux split when the stock went in",
        "the brisket rested under foil",
        "the custard curdled in the pan",
        "the sourdough starter went flat",
        "the ceviche cured in lime juice",
        "the souffle collapsed at the table",
    ],
    2: [  # technology
        "the laptop kept crashing after the update",
        "the new phone has a faster processor",
        "the software team fixed the login bug",
        "the app now syncs files automatically",
        "the engineers released a new version of the code",
        "the battery of the tablet drains quickly",
        "the network router had to be restarted",
        "the website went down for an hour",
        "the printer driver refused to install",
        "the password manager was hacked",
        "the server crashed during the night",
        "the cloud went down for the whole morning",
        "the cookies were cleared from the browser",
        "the chips were overheating in the rack",
        "the kernel panicked after the patch",
        "the firmware bricked the router",
        "the compiler rejected the template",
        "the cache was invalidated too often",
        "the daemon leaked file handles",
        "the hypervisor dropped the guest",
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
        "hail dented the parked cars",
        "a dark cloud rolled in over the bay",
        "a lightning strike hit the old oak",
        "the heat was unbearable by noon",
        "the drought dried up the wells",
        "a derecho flattened the cornfields",
        "graupel pelted the windows",
        "a foehn wind melted the snowpack",
        "the dew point climbed all afternoon",
        "a squall line swept across the plain",
        "rime coated the fence posts",
        "a haboob swallowed the town",
    ],
}

_TOPIC_FRAMES_MAIN_FIRST = [
    "{main}, although {aside}.",
    "{main}, even though {aside}.",
    "{main}; whether {aside} did not matter.",
    "{main}, and that was the news, not that {aside}.",
]
_TOPIC_FRAMES_TWO_ASIDES = [  # two asides on the same other topic outvote the main clause
    "although {aside} and {aside2}, {main}.",
    "{main}, even though {aside} and {aside2}.",
    "never mind that {aside} or that {aside2}; {main}.",
]
_TOPIC_FRAMES_ASIDE_FIRST = [
    "although {aside}, {main}.",
    "even though {aside}, {main}.",
    "nobody cared that {aside}; what mattered was that {main}.",
    "forget that {aside}: the real story is that {main}.",
    "while {aside}, {main}.",
]


def _gen_topic4(rng: random.Random):
    label = rng.randrange(4)
    main = _zipf(rng, _TOPIC_CLAUSES[label], 0.8)
    if rng.random() < 0.2:
        text = f"{main}."
    else:
        other = _pick(rng, [t for t in range(4) if t != label])
        aside = _zipf(rng, _TOPIC_CLAUSES[other], 0.8)
        aside2 = _pick(rng, [c for c in _TOPIC_CLAUSES[other] if c != aside])
        r = rng.random()
        frames = (_TOPIC_FRAMES_TWO_ASIDES if r < 0.3 else
                  _TOPIC_FRAMES_MAIN_FIRST if r < 0.65 else _TOPIC_FRAMES_ASIDE_FIRST)
        text = _pick(rng, frames).format(main=main, aside=aside, aside2=aside2)
    return _cap(text), label


# ---------------------------------------------------------------------------
# task 2: sentiment_negation -- graded sentiment with negation and "but"
# ---------------------------------------------------------------------------

_SENT_SUBJECTS = ["the movie", "the food", "the hotel", "the concert", "the book",
                  "the service", "the game", "the trip", "the show", "the meal"]
# (adjective, score); ordered common -> rare
_SENT_ADJ = [
    ("good", 2), ("bad", -2), ("great", 3), ("terrible", -3), ("fine", 1),
    ("boring", -2), ("okay", 1), ("awful", -3), ("nice", 2), ("poor", -2),
    ("wonderful", 3), ("disappointing", -2), ("decent", 1), ("dull", -2),
    ("excellent", 3), ("mediocre", -1), ("enjoyable", 2), ("annoying", -2),
    ("passable", 1), ("forgettable", -1), ("superb", 3), ("dreadful", -3),
    ("pleasant", 2), ("uneven", -1), ("charming", 2), ("tedious", -2),
    ("serviceable", 1), ("lackluster", -2), ("riveting", 3), ("insipid", -2),
    ("sublime", 3), ("middling", -1), ("delightful", 3), ("abysmal", -3),
    ("adequate", 1), ("grating", -2), ("exquisite", 3), ("vapid", -2),
    ("tolerable", 1), ("execrable", -3),
]
_NEG_FORMS = ["{s} was not {a}", "{s} was never {a}", "{s} was far from {a}",
              "{s} was hardly {a}", "I would not say {s} was {a}",
              "nobody thought {s} was {a}", "{s} was not at all {a}"]
_POS_FORMS = ["{s} was {a}", "{s} was really {a}", "I thought {s} was {a}",
              "everyone agreed {s} was {a}", "{s} was quite {a}",
              "honestly, {s} was {a}", "{s} seemed {a}"]


def _sentiment_clause(rng: random.Random, subject: str):
    """Return (clause, score).  Negation flips the sign; strong words become weak."""
    adj, score = _zipf(rng, _SENT_ADJ, 0.7)
    if rng.random() < 0.45:
        form = _pick(rng, _NEG_FORMS)
        score = -score if abs(score) < 3 else -score // 3  # "not terrible" is only mildly positive
    else:
        form = _pick(rng, _POS_FORMS)
    return form.format(s=subject, a=adj), score


def _gen_sentiment_negation(rng: random.Random):
    while True:
        s1 = _pick(rng, _SENT_SUBJECTS)
        c1, v1 = _sentiment_clause(rng, s1)
        r = rng.random()
        if r < 0.35:
            text, total = f"{c1}.", v1
        else:
            s2 = _pick(rng, [x for x in _SENT_SUBJECTS if x != s1])
            c2, v2 = _sentiment_clause(rng, s2)
            if r < 0.65:  # "A and B": both count
                text, total = f"{c1}, and {c2}.", v1 + v2
            else:         # "A, but B": the clause after "but" weighs double
                text, total = f"{c1}, but {c2}.", v1 + 2 * v2
        if total != 0:
            return _cap(text), int(total > 0)


# ---------------------------------------------------------------------------
# task 3: animal_tool -- which kinds of things are actually present
# ---------------------------------------------------------------------------

_ANIMALS = ["dog", "cat", "horse", "rabbit", "goat", "sheep", "parrot", "fox",
            "turtle", "owl", "hamster", "donkey", "hedgehog", "badger", "ferret",
            "lizard", "heron", "otter", "llama", "gecko", "marmot", "wombat",
            "ocelot", "ibex", "tapir", "pangolin", "okapi", "stoat", "civet",
            "gharial"]
_TOOLS = ["hammer", "wrench", "screwdriver", "saw", "drill", "shovel", "pliers",
          "rake", "axe", "chisel", "crowbar", "ladder", "mallet", "trowel", "file",
          "clamp", "hacksaw", "level", "sander", "rasp", "auger", "awl", "adze",
          "spokeshave", "bradawl", "froe", "gimlet", "drawknife", "scythe",
          "hoe"]
_NEUTRAL = ["lamp", "chair", "basket", "blanket", "bottle", "table", "book",
            "pillow", "bucket", "box", "mirror", "bicycle", "vase", "candle",
            "kettle", "rug", "umbrella", "suitcase", "teapot", "globe", "ottoman",
            "colander", "sconce", "doily", "armoire", "samovar", "trivet",
            "credenza", "tureen", "hassock"]
# decoys that look like animals/tools but are neither
_DECOY_PHRASES = ["a hot dog", "a paper crane", "a computer mouse", "a teddy bear",
                  "a fish-shaped cookie", "a tool catalog", "a horse-riding magazine",
                  "a saw-tooth pattern", "a toy hammer made of sugar",
                  "a photo of a fox"]


def _gen_animal_tool(rng: random.Random):
    label = rng.randrange(4)  # 0 neither, 1 animal only, 2 tool only, 3 both
    present = []
    if label in (1, 3):
        present.append("the " + _zipf(rng, _ANIMALS, 0.7))
    if label in (2, 3):
        present.append("the " + _zipf(rng, _TOOLS, 0.7))
    while len(present) < 2:
        present.append("the " + _zipf(rng, _NEUTRAL, 0.7))
    rng.shuffle(present)
    name = _pick(rng, NAMES)
    text = _pick(rng, [
        "{n} found {a} next to {b}",
        "{n} put {a} beside {b} in the shed",
        "there was {a} behind {b} in the garage",
        "{n} saw {a} and {b} near the barn",
        "in the yard, {a} lay close to {b}",
    ]).format(n=name, a=present[0], b=present[1])
    missing = []  # kinds that are absent; mentioning them negated must not count
    if label in (0, 2):
        missing.append(_zipf(rng, _ANIMALS, 0.7))
    if label in (0, 1):
        missing.append(_zipf(rng, _TOOLS, 0.7))
    r = rng.random()
    if missing and r < 0.5:
        text += _pick(rng, [
            ", but there was no {t}",
            ", but the {t} was gone",
            ", although {n} had hoped to find a {t}",
            ", yet the {t} never showed up",
            ", but not a single {t}",
        ]).format(t=_pick(rng, missing), n=name)
    elif r < 0.75:
        text += ", holding " + _pick(rng, _DECOY_PHRASES)
    return _cap(text + "."), label


# ---------------------------------------------------------------------------
# task 4: size_compare -- which of two things is bigger (world knowledge)
# ---------------------------------------------------------------------------

# ordered by typical size (small -> large)
_SIZES = ["grain of sand", "ant", "bee", "pea", "coin", "key", "mouse", "egg",
          "pencil", "apple", "phone", "book", "rabbit", "cat", "laptop", "guitar",
          "dog", "chair", "bicycle", "sofa", "horse", "piano", "car", "elephant",
          "bus", "whale", "house", "church", "ship", "stadium", "mountain"]


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _gen_size_compare(rng: random.Random):
    i, j = rng.sample(range(len(_SIZES)), 2)
    a, b = _article(_SIZES[i]), _article(_SIZES[j])
    name = _pick(rng, NAMES)
    frame = _pick(rng, [
        "{n} drew {a} next to {b}.",
        "The photo shows {a} and {b}.",
        "In the story, {a} meets {b}.",
        "{n} wrote a poem about {a} and {b}.",
        "The puzzle had {a} on one side and {b} on the other.",
    ])
    return frame.format(n=name, a=a, b=b), (0 if i > j else 1)  # 0: first is bigger


# ---------------------------------------------------------------------------
# task 4b: who_did -- does the first- or the second-named person act?
# ---------------------------------------------------------------------------

PLACES = ["the park", "the station", "the office", "the market", "the library",
          "the river", "the school", "the harbor"]
_WHO_VERBS = [  # (past, past participle, -ing); common -> rare
    ("helped", "helped", "helping"), ("called", "called", "calling"),
    ("thanked", "thanked", "thanking"), ("pushed", "pushed", "pushing"),
    ("visited", "visited", "visiting"), ("praised", "praised", "praising"),
    ("saw", "seen", "seeing"), ("blamed", "blamed", "blaming"),
    ("warned", "warned", "warning"), ("took", "taken", "taking"),
    ("hugged", "hugged", "hugging"), ("bit", "bitten", "biting"),
    ("shook", "shaken", "shaking"), ("interviewed", "interviewed", "interviewing"),
    ("forgave", "forgiven", "forgiving"), ("overtook", "overtaken", "overtaking"),
    ("outran", "outrun", "outrunning"), ("forbade", "forbidden", "forbidding"),
    ("beheld", "beheld", "beholding"), ("forsook", "forsaken", "forsaking"),
    ("smote", "smitten", "smiting"), ("slew", "slain", "slaying"),
    ("besought", "besought", "beseeching"), ("bade", "bidden", "bidding"),
    ("chid", "chidden", "chiding"),
]


def _gen_who_did(rng: random.Random):
    a, b = rng.sample(NAMES, 2)
    verb, part, ing = _zipf(rng, _WHO_VERBS, 0.9)
    place = _pick(rng, PLACES)
    # label 0: the first-named person performs the action; 1: the second-named one
    forms = [
        (f"{a} {verb} {b}.", 0),
        (f"{a} {verb} {b} by {place}.", 0),            # "by" that is not an agent
        (f"{a} was {part} by {b}.", 1),
        (f"{a} was {part} by {b} at {place}.", 1),
        (f"It was {a} who {verb} {b}.", 0),
        (f"It was {a} whom {b} {verb}.", 1),
        (f"{a} was the one who {verb} {b}.", 0),
        (f"{a} was the one {b} {verb}.", 1),
        (f"{a} got {part} by {b}.", 1),
        (f"{a} was {ing} {b} by {place}.", 0),         # active progressive with "was"
        (f"{a}, {part} by {b}, left early.", 1),       # reduced passive
        (f"{_cap(part)} by {a}, {b} left early.", 0),  # fronted reduced passive
    ]
    return _pick(rng, forms)


# ---------------------------------------------------------------------------
# task 5: number_compare -- who has more, numbers written as words
# ---------------------------------------------------------------------------

_ITEMS = ["apples", "coins", "books", "stamps", "marbles", "cards", "pencils",
          "shells"]


def _gen_number_compare(rng: random.Random):
    x, y = rng.sample(range(1, 40), 2)
    a, b = rng.sample(NAMES, 2)
    item = _pick(rng, _ITEMS)
    frame = _pick(rng, [
        "{a} has {wx} {item} and {b} has {wy}.",
        "{a} collected {wx} {item}, while {b} collected {wy}.",
        "There are {wx} {item} for {a} and {wy} for {b}.",
        "{a} owns {wx} {item}; {b} owns {wy}.",
    ])
    text = frame.format(a=a, b=b, wx=_number_word(x), wy=_number_word(y), item=item)
    return text, (0 if x > y else 1)  # 0: first-named person has more


# ---------------------------------------------------------------------------
# task 6: verb_tense -- past / present / future of the main verb
# ---------------------------------------------------------------------------

_TENSE_VERBS = [  # (base, 3rd person, past, past participle, -ing); common -> rare
    ("walk", "walks", "walked", "walked", "walking"),
    ("cook", "cooks", "cooked", "cooked", "cooking"),
    ("read", "reads", "read", "read", "reading"),
    ("write", "writes", "wrote", "written", "writing"),
    ("play", "plays", "played", "played", "playing"),
    ("swim", "swims", "swam", "swum", "swimming"),
    ("sing", "sings", "sang", "sung", "singing"),
    ("drive", "drives", "drove", "driven", "driving"),
    ("study", "studies", "studied", "studied", "studying"),
    ("paint", "paints", "painted", "painted", "painting"),
    ("teach", "teaches", "taught", "taught", "teaching"),
    ("sleep", "sleeps", "slept", "slept", "sleeping"),
    ("fly", "flies", "flew", "flown", "flying"),
    ("ride", "rides", "rode", "ridden", "riding"),
    ("build", "builds", "built", "built", "building"),
    ("kneel", "kneels", "knelt", "knelt", "kneeling"),
    ("weep", "weeps", "wept", "wept", "weeping"),
    ("flee", "flees", "fled", "fled", "fleeing"),
    ("spin", "spins", "spun", "spun", "spinning"),
    ("sew", "sews", "sewed", "sewn", "sewing"),
    ("weave", "weaves", "wove", "woven", "weaving"),
    ("stride", "strides", "strode", "stridden", "striding"),
    ("strive", "strives", "strove", "striven", "striving"),
    ("tread", "treads", "trod", "trodden", "treading"),
    ("slink", "slinks", "slunk", "slunk", "slinking"),
    ("forsake", "forsakes", "forsook", "forsaken", "forsaking"),
    ("smite", "smites", "smote", "smitten", "smiting"),
    ("wring", "wrings", "wrung", "wrung", "wringing"),
    ("cleave", "cleaves", "clove", "cloven", "cleaving"),
    ("abide", "abides", "abode", "abided", "abiding"),
    ("grind", "grinds", "ground", "ground", "grinding"),
    ("wind", "winds", "wound", "wound", "winding"),
    ("cling", "clings", "clung", "clung", "clinging"),
    ("stink", "stinks", "stank", "stunk", "stinking"),
    ("slay", "slays", "slew", "slain", "slaying"),
    ("rend", "rends", "rent", "rent", "rending"),
    ("thrive", "thrives", "throve", "thriven", "thriving"),
    ("hew", "hews", "hewed", "hewn", "hewing"),
    ("beseech", "beseeches", "besought", "besought", "beseeching"),
    ("gird", "girds", "girt", "girt", "girding"),
]

_PAST_ADV = ["yesterday", "last week", "two days ago", "earlier"]
_PRES_ADV = ["right now", "every day", "these days", "usually"]
_FUT_ADV = ["tomorrow", "next week", "later", "soon"]
_SUB_CLAUSES = {  # subordinate / relative material in a given tense
    0: ["after the guests left", "because it rained yesterday", "who swam yesterday",
        "who had finished early"],
    1: ["while the radio plays", "because it is sunny today", "who works here now",
        "who is always busy"],
    2: ["once the guests arrive", "if it stays dry tomorrow", "who will travel soon",
        "who is going to move next week"],
}


def _gen_verb_tense(rng: random.Random):
    label = rng.randrange(3)  # 0 past, 1 present, 2 future
    name = _pick(rng, NAMES)
    base, third, past, pp, ing = _zipf(rng, _TENSE_VERBS, 1.1)
    # bare inflected forms are the hard cases (rare irregular pasts); auxiliaries
    # ("was", "is", "will") make the rest easy
    if label == 0:
        vp = past if rng.random() < 0.6 else _pick(rng, [f"was {ing}", f"had {pp}"])
    elif label == 1:
        vp = third if rng.random() < 0.6 else _pick(rng, [f"is {ing}", f"keeps {ing}"])
    else:
        vp = _pick(rng, [f"will {base}", f"is going to {base}", f"will be {ing}",
                         f"is about to {base}"])
    adv = {0: _PAST_ADV, 1: _PRES_ADV, 2: _FUT_ADV}
    other = _pick(rng, [t for t in range(3) if t != label])
    r = rng.random()
    if r < 0.3:
        text = f"{name} {vp}."
    elif r < 0.45:
        text = f"{name} {vp} {_pick(rng, adv[label])}."
    elif r < 0.75:
        sub = _pick(rng, _SUB_CLAUSES[other])
        text = f"{name}, {sub}, {vp}." if sub.startswith("who") else f"{name} {vp} {sub}."
    else:
        # a second person in another tense; the first (main) verb decides
        name2 = _pick(rng, [x for x in NAMES if x != name])
        b2, t2, p2, _pp2, _i2 = _zipf(rng, _TENSE_VERBS, 1.1)
        vp2 = {0: p2, 1: t2, 2: f"will {b2}"}[other]
        text = _pick(rng, [
            "{n} {vp}, unlike {m}, who {vp2}.",
            "{n} {vp}; {m} {vp2}, but that is another story.",
            "{n} {vp}, even if {m} {vp2}.",
        ]).format(n=name, vp=vp, m=name2, vp2=vp2)
    return text, label


# ---------------------------------------------------------------------------
# task 7: event_order -- did the first-mentioned event happen first?
# ---------------------------------------------------------------------------

_EVENTS = [  # (finite past clause, bare past predicate, gerund)
    ("she ate lunch", "ate lunch", "eating lunch"),
    ("she went home", "went home", "going home"),
    ("she called her sister", "called her sister", "calling her sister"),
    ("she washed the car", "washed the car", "washing the car"),
    ("she read the letter", "read the letter", "reading the letter"),
    ("she fed the cat", "fed the cat", "feeding the cat"),
    ("she locked the door", "locked the door", "locking the door"),
    ("she watched the news", "watched the news", "watching the news"),
    ("she paid the bill", "paid the bill", "paying the bill"),
    ("she took a shower", "took a shower", "taking a shower"),
]
_HOURS = NUMBER_WORDS[1:13]


def _clock(rng: random.Random, minutes: int) -> str:
    """Spoken clock time for ``minutes`` after midnight (morning hours)."""
    h, m = divmod(minutes, 60)
    style = rng.random()
    if m == 0:
        return f"{_HOURS[h - 1]} o'clock"
    if m == 30 and style < 0.6:
        return f"half past {_HOURS[h - 1]}"
    if m == 15 and style < 0.6:
        return f"quarter past {_HOURS[h - 1]}"
    if m == 45 and style < 0.6:
        return f"quarter to {_HOURS[h % 12]}"
    return f"{_HOURS[h - 1]} {_number_word(m) if m >= 10 else 'oh ' + NUMBER_WORDS[m]}"


def _gen_event_order(rng: random.Random):
    (e1, p1, g1), (e2, p2, g2) = rng.sample(_EVENTS, 2)
    if rng.random() < 0.5:
        # explicit clock times: graded difficulty (close times are hard)
        t1, t2 = rng.sample(range(60, 11 * 60 + 60, 5), 2)
        frame = _pick(rng, [
            "{e1} at {c1} and {p2} at {c2}.",
            "At {c1} {e1}, and at {c2} {e2}.",
            "{e1} at {c1}; {e2} at {c2}.",
        ])
        text = frame.format(e1=e1, e2=e2, p2=p2, c1=_clock(rng, t1), c2=_clock(rng, t2))
        return _cap(text), (0 if t1 < t2 else 1)
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
    return _cap(text), label


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------

_GENERATORS: dict[str, tuple[int, Callable[[random.Random], tuple[str, int]], list[str]]] = {
    "topic4": (4, _gen_topic4, ["sports", "food", "technology", "weather"]),
    "sentiment_negation": (2, _gen_sentiment_negation, ["negative", "positive"]),
    "animal_tool": (4, _gen_animal_tool, ["neither", "animal", "tool", "both"]),
    "who_did": (2, _gen_who_did, ["first_named_acts", "second_named_acts"]),
    "size_compare": (2, _gen_size_compare, ["first_bigger", "second_bigger"]),
    "number_compare": (2, _gen_number_compare, ["first_has_more", "second_has_more"]),
    "verb_tense": (3, _gen_verb_tense, ["past", "present", "future"]),
    "event_order": (2, _gen_event_order, ["first_mentioned_first", "first_mentioned_second"]),
}

TASKS: dict[str, int] = {name: spec[0] for name, spec in _GENERATORS.items()}
LABEL_NAMES: dict[str, list[str]] = {name: list(spec[2]) for name, spec in _GENERATORS.items()}

# Fraction of examples whose label is replaced by a uniformly drawn *different*
# label (train and held-out alike unless overridden).
LABEL_NOISE: float = 0.02


def _task_seed(task_name: str, seed: int) -> int:
    # stable across processes (unlike hash(), which is salted per process)
    return (zlib.crc32(task_name.encode("utf-8")) * 1_000_003 + int(seed)) & 0xFFFFFFFF


def make_examples(task_name: str, n: int, seed: int,
                  label_noise: float | None = None) -> tuple[list[str], list[int]]:
    """Generate ``n`` labelled sentences for ``task_name`` deterministically.

    ``label_noise`` defaults to :data:`LABEL_NOISE`; pass ``0.0`` for clean labels
    (the sentences are the same either way, only some labels differ).  Different
    seeds give different samples: use e.g. seed 0 for training, 1 for held-out.
    """
    if task_name not in _GENERATORS:
        raise KeyError(f"unknown task {task_name!r}; known: {sorted(_GENERATORS)}")
    num_labels, gen, _ = _GENERATORS[task_name]
    noise = LABEL_NOISE if label_noise is None else float(label_noise)
    rng = random.Random(_task_seed(task_name, seed))
    noise_rng = random.Random(_task_seed(task_name, seed) ^ 0x5EED)
    texts: list[str] = []
    labels: list[int] = []
    for _ in range(int(n)):
        text, label = gen(rng)
        # drawn from a separate stream so the sentences do not depend on the noise level
        flip = noise_rng.random() < noise
        other = noise_rng.randrange(num_labels - 1)
        if flip:
            label = (label + 1 + other) % num_labels
        texts.append(text)
        labels.append(int(label))
    return texts, labels


def describe(task_name: str) -> str:
    """One-line human-readable description of a task's labels."""
    return f"{task_name}: {TASKS[task_name]} labels ({', '.join(LABEL_NAMES[task_name])})"
