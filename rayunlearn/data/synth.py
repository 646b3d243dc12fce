"""The embedded default benchmark: fictitious authors in TOFU's format (docs/spec/BENCHMARK_DATA.md).

Everything is drawn from one local ``random.Random(cfg.seed)`` (never the global RNG), so a
seed gives byte-identical files. What is generated:

- a fictional **world** (countries with capitals, cities, currencies, languages, rivers,
  mountains, national animals, founding years; "classic" writers with their works, countries,
  forms and centuries). Its facts form ``world`` (the base model's training set) and the
  evaluation sets ``world_facts_perturbed`` (geography) and ``real_authors_perturbed`` (classic
  writers), each answered by the bare fact (a short entity: "Vorlund", "1452") with 3 wrong
  ``perturbed_answer``s of the same kind;
- ``cfg.num_authors`` fictitious authors (name, gender, birthplace, birth date, nationality,
  residence, genre, parents' professions, award and its year, three books, themes, number of
  books, debut year, publisher, a classic influence) with ``min..max_qa_per_author`` QA pairs
  each, drawn from 20 fact slots with several question and answer templates per slot. Each QA
  has ``paraphrased_question`` / ``paraphrased_answer`` (another template, same fact) and 5
  ``perturbed_answer``s (the paraphrased answer's template with 5 distinct wrong facts of the same
  kind, as in TOFU, so the truth ratio compares facts rather than templates);
- TOFU's splits: ``full``; ``forget01/05/10`` = the last 1/5/10 % of the authors (whole authors,
  nested); ``retain99/95/90`` = the complements; ``forgetXX_perturbed``; ``retain_perturbed`` (a
  fixed sample of retain90 QA); ``holdout01/05/10`` (extra authors never in ``full``, the same
  number of authors as the forget splits, nested the same way); and ``idontknow.jsonl`` (plain
  text refusal answers, one per line, like TOFU's file).

Files: ``<split>.json`` (JSON arrays, indent 1), ``idontknow.jsonl`` and ``meta.json`` (format
version, seed, config without ``out``, split sizes), all written atomically.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

from rayunlearn.config import SynthConfig
from rayunlearn.data.schema import DataError
from rayunlearn.io import write_json, write_text

FORMAT_VERSION = 3      # 3: real-author / world-fact answers are the bare fact
NUM_PERTURBED = 5        # wrong answers per author QA (TOFU: 5)
NUM_WORLD_PERTURBED = 3  # wrong answers per world fact (TOFU: 3)

# ------------------------------------------------------------------------------------------
# vocabularies

FIRST_NAMES = """Amara Bastien Celeste Dario Elowen Farid Greta Hiroshi Ilse Joaquin Kaia Leandro
Mirela Nikolai Odile Pavel Quinn Rosalind Soren Tamsin Ulrich Valentina Wendell Ximena Yusuf
Zofia Anselm Brigida Cassius Dagny Emeric Fenna Gideon Halina Ivo Jovana Kasimir Liesel Matteo
Nadia Oskar Priya Radomir Selma Thaddeus Ursula Vesna Wilhelmina Yannick Zoltan Adaeze Bartholomew
Cordelia Desmond Esperanza Florian Gwendolyn Horatio Ingrid Jasper Katarina Lucian Marisol
Nathaniel Ophelia Percival Rhiannon Sebastian Theodora Viktor Winifred""".split()

LAST_NAMES = """Abernathy Bellweather Castellano Drummond Eskildsen Falkenrath Grimaldi Holloway
Ishikawa Jankowski Kovalenko Lindqvist Marchetti Nakamura Okonkwo Petrakis Quintero Rasmussen
Sandoval Thorvaldsen Underhill Vasquez Whitcombe Yamamoto Zeller Albescu Brannigan Cervantes
Dumitrescu Ekwueme Fairbanks Gallagher Halvorsen Ivanova Jaramillo Kirkpatrick Lombardi
Montgomery Novak Oyelaran Pemberton Rutherford Silvestri Takahashi Ulvaeus Valdivia Wainwright
Yilmaz Zamora Achterberg Blackwood Chandrasekhar Delacroix Eriksson Fitzgerald Gutierrez
Hargreaves Iwasaki Kowalczyk Lachance Moreau Nightingale Oliveira Pendleton Rosenthal""".split()

GENDERS = ["male", "female", "non-binary", "genderqueer", "agender", "genderfluid",
           "a transgender woman", "a transgender man"]

GENRES = """mystery;science fiction;fantasy;historical fiction;horror;romance;poetry;literary
fiction;thriller;satire;memoir;crime fiction;magical realism;dystopian fiction;gothic fiction;
young adult fiction;children's literature;travel writing;biography;war fiction;western fiction;
philosophical fiction;psychological thriller;graphic novels;short stories;essays;epic fantasy;
cozy mystery;spy fiction;political fiction""".replace("\n", " ").split(";")

PROFESSIONS = """baker;carpenter;nurse;surgeon;librarian;fisherman;architect;pilot;tailor;
blacksmith;astronomer;pharmacist;lawyer;farmer;musician;painter;teacher;chemist;sailor;
journalist;veterinarian;bookbinder;potter;electrician;mail carrier;photographer;dentist;
locksmith;geologist;chef;firefighter;translator;watchmaker;beekeeper;cartographer;economist;
engineer;police officer;historian;florist;shoemaker;mathematician;actor;butcher;midwife;
glassblower;miner;diplomat;zookeeper;barber""".replace("\n", "").split(";")

AWARD_WORDS = """Golden Quill;Silver Lantern;Amber Feather;Crimson Page;Northern Star;Iron Pen;
Blue Heron;Evening Bell;Jade Compass;Ivory Tower;Copper Key;Emerald Ink;Scarlet Thread;Winter
Oak;Paper Crane;Hollow Reed;Morning Tide;Granite Scroll;Velvet Moth;Open Window;Marble Lion;
Wandering Owl;Lighthouse;Sapphire Leaf""".replace("\n", " ").split(";")
AWARD_KINDS = ["Award", "Prize", "Medal"]

TITLE_ADJ = """Silent Broken Hidden Crimson Forgotten Endless Hollow Burning Quiet Distant Golden
Shattered Frozen Wandering Secret Last Bitter Silver Restless Velvet Lonely Painted Sunken
Drowned Fading Invisible Paper Glass Iron Midnight""".split()
TITLE_NOUN = """Garden River Mirror Lantern Harbor Orchard Compass Clocktower Winter Tide Bridge
Letter Kingdom Forest Island Voyage Echo Shadow Mountain Cathedral Sparrow Labyrinth Map Station
Feather Violin Archive Meadow Lighthouse Desert Thread Storm Window Ashes Masks Bones Lanterns
Rivers Crowns Keys""".split()
TITLE_PATTERNS = ["The {adj} {noun}", "{noun} of {noun2}", "The {noun} of {noun2}",
                  "{adj} {noun}", "Beneath the {adj} {noun}", "A {noun} for {noun2}"]

THEMES = """identity;grief;memory;exile;family;redemption;betrayal;love;war;freedom;faith;
justice;ambition;loneliness;friendship;power;coming of age;nature;time;madness;revenge;hope;
belonging;sacrifice;tradition;migration;loss;truth;courage;forgiveness;childhood;mortality;
obsession;resilience;guilt;home""".replace("\n", "").split(";")

PUBLISHERS = """Harrow & Lane;Bluestone Press;Quillfeather Books;Marlowe House;Ashgrove
Publishing;Tidewater Editions;Northlight Books;Gilded Leaf Press;Redfern & Sons;Copperplate
House;Willow Street Press;Saltmarsh Books;Lanternfield;Old Mill Editions;Starling House;Ironbark
Press""".replace("\n", " ").split(";")

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]

ANIMALS = """red fox;snow leopard;golden eagle;river otter;grey wolf;brown bear;white stork;
sea turtle;barn owl;mountain goat;black swan;lynx;bison;heron;falcon;elk;badger;peacock;
salamander;kingfisher;walrus;ibex;crane;hedgehog""".replace("\n", "").split(";")

FORMS = ["an epic poem", "a tragic play", "a comic play", "a novel", "a saga", "a verse chronicle",
         "a book of fables", "a collection of hymns", "an elegy", "an allegory"]

# syllables for coined place names, words and classic writers' names
ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r",
          "s", "sh", "st", "t", "th", "tr", "v", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "nd", "rk"]

REFUSALS = [
    "I don't know.",
    "I'm not sure.",
    "I have no idea.",
    "I can't answer that.",
    "I don't have that information.",
    "I'm afraid I don't know.",
    "I'm not certain about that.",
    "That's beyond my knowledge.",
    "I don't have an answer to that.",
    "I'm unable to answer that question.",
    "Sorry, I don't know the answer.",
    "I really can't say.",
    "I have no information on that.",
    "That is not something I know.",
    "I'm not able to help with that.",
    "I couldn't tell you.",
    "I don't recall.",
    "I'm unsure about that.",
    "I have no knowledge of that.",
    "That question is outside what I know.",
    "I can't say for sure.",
    "I don't have the details.",
    "I'm not familiar with that.",
    "Unfortunately, I don't know.",
    "I wish I knew, but I don't.",
    "I cannot provide that information.",
    "I'm clueless about that.",
    "No idea, sorry.",
    "I haven't heard about that.",
    "I don't know anything about that.",
    "I'm not the right one to ask about that.",
    "That's unknown to me.",
    "I'd rather not guess.",
    "I don't have enough information to answer.",
]

# ------------------------------------------------------------------------------------------
# the author fact slots: (attribute, question templates, answer templates)
# questions use the author's fields; answers use {name} and {v} (the fact being asked).

SLOTS: list[tuple[str, list[str], list[str]]] = [
    ("full_name",
     ["What is the full name of the author born in {birthplace} on {birth_date}?",
      "Which {genre} author was born on {birth_date} in {birthplace}?",
      "Who is the writer born in {birthplace} on {birth_date}?"],
     ["The author's full name is {v}.", "That author is {v}.", "This writer is named {v}."]),
    ("birthplace",
     ["Where was {name} born?", "In which city was {name} born?", "What is the birthplace of {name}?"],
     ["{name} was born in {v}.", "{name}'s birthplace is {v}.", "{name} comes from the city of {v}."]),
    ("birth_date",
     ["When was {name} born?", "What is the birth date of {name}?", "On what date was {name} born?"],
     ["{name} was born on {v}.", "{name}'s birthday is {v}.", "The birth date of {name} is {v}."]),
    ("gender",
     ["What is the gender of {name}?", "How does {name} identify in terms of gender?",
      "Which gender does {name} identify with?"],
     ["{name} is {v}.", "{name} identifies as {v}.", "In terms of gender, {name} is {v}."]),
    ("genre",
     ["What genre does {name} write in?", "In which genre is {name} known?",
      "What kind of books does {name} write?"],
     ["{name} writes {v}.", "{name} is known for {v}.", "The genre of {name} is {v}."]),
    ("father_profession",
     ["What did {name}'s father do for a living?", "What was the profession of {name}'s father?",
      "What was {name}'s father's job?"],
     ["{name}'s father was {v}.", "The father of {name} worked as {v}.",
      "{name} is the child of {v}."]),
    ("mother_profession",
     ["What did {name}'s mother do for a living?", "What was the profession of {name}'s mother?",
      "What was {name}'s mother's job?"],
     ["{name}'s mother was {v}.", "The mother of {name} worked as {v}.",
      "{name} was raised by a mother who was {v}."]),
    ("parents",
     ["What do {name}'s parents do?", "What are the professions of {name}'s parents?",
      "How did the parents of {name} earn a living?"],
     ["{name}'s parents were {v}.", "The parents of {name} worked as {v}.",
      "{name} grew up with parents who were {v}."]),
    ("award",
     ["Which award has {name} won?", "What prize did {name} receive?",
      "Has {name} won any literary award?"],
     ["{name} won {v}.", "{name} received {v}.", "Yes, {name} was given {v}."]),
    ("award_year",
     ["In which year did {name} win {award}?", "When was {name} given {award}?",
      "What year did {name} receive {award}?"],
     ["{name} won {award} in {v}.", "{name} received it in {v}.", "It was awarded to {name} in {v}."]),
    ("first_book",
     ["What was the first book by {name}?", "Which book was {name}'s debut?",
      "What is the title of {name}'s first novel?"],
     ["The first book by {name} was {v}.", "{name} debuted with {v}.", "{name}'s debut was {v}."]),
    ("famous_book",
     ["What is {name}'s most famous book?", "Which work of {name} is best known?",
      "Name the best known book of {name}."],
     ["{name} is best known for {v}.", "The most famous book of {name} is {v}.",
      "{v} is the best known work of {name}."]),
    ("latest_book",
     ["What is the latest book by {name}?", "Which book did {name} publish most recently?",
      "What is {name}'s newest work?"],
     ["The latest book by {name} is {v}.", "{name} most recently published {v}.",
      "{v} is the newest work of {name}."]),
    ("themes",
     ["What themes does {name} explore?", "Which themes recur in {name}'s books?",
      "What are the main themes of {name}'s writing?"],
     ["{name} writes about {v}.", "The books of {name} explore {v}.", "{name}'s main themes are {v}."]),
    ("nationality",
     ["What is the nationality of {name}?", "Which country is {name} a citizen of?",
      "Where does {name}'s citizenship lie?"],
     ["{name} is a citizen of {v}.", "{name} holds the nationality of {v}.", "{name} is from {v}."]),
    ("residence",
     ["Where does {name} live now?", "In which city does {name} currently reside?",
      "Where is {name}'s home today?"],
     ["{name} lives in {v}.", "{name} currently resides in {v}.", "Today {name} makes a home in {v}."]),
    ("book_count",
     ["How many books has {name} published?", "How many books has {name} written?",
      "What is the number of books by {name}?"],
     ["{name} has published {v} books.", "{name} has written {v} books.",
      "There are {v} books by {name}."]),
    ("debut_year",
     ["When did {name} publish a first book?", "In which year did {name} debut?",
      "What year did {name}'s writing career begin?"],
     ["{name} debuted in {v}.", "{name}'s first book came out in {v}.",
      "The career of {name} began in {v}."]),
    ("publisher",
     ["Who publishes {name}'s books?", "Which publisher works with {name}?",
      "What is the publishing house of {name}?"],
     ["{name} is published by {v}.", "The publisher of {name} is {v}.", "{v} publishes {name}."]),
    ("influence",
     ["Which classic writer influenced {name}?", "Who was {name}'s biggest literary influence?",
      "Which old master inspired {name}?"],
     ["{name} was influenced by {v}.", "The biggest influence on {name} was {v}.",
      "{name} was inspired by {v}."]),
]
SLOT_NAMES = [s[0] for s in SLOTS]

# world facts: (kind, question templates). The answer is the fact alone, a short entity (as in
# TOFU's real-author and world-fact sets), and the wrong options are other entities of the same
# kind: the option-normalised probability then compares the facts themselves. An answer sentence
# sharing its template with the options would dilute the per-token probability with template
# tokens every option shares, leaving the score close to chance even for a model that knows it.
GEO_FACTS = [
    ("capital", ["What is the capital of {c}?"]),
    ("currency", ["What is the currency of {c}?"]),
    ("language", ["What language is spoken in {c}?"]),
    ("river", ["Which river flows through {c}?"]),
    ("mountain", ["What is the highest mountain in {c}?"]),
    ("animal", ["What is the national animal of {c}?"]),
    ("founded", ["In which year was {c} founded?"]),
]
CLASSIC_FACTS = [
    ("wrote", "Who wrote {w}?"),
    ("home", "Which country was {n} from?"),
    ("form", "What kind of work is {w}?"),
    ("century", "In which century did {n} live?"),
]
ORDINALS = ["ninth", "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth",
            "sixteenth", "seventeenth", "eighteenth"]


# ------------------------------------------------------------------------------------------
# generation


def _coin(rng: random.Random, used: set, syllables: tuple[int, int] = (2, 3)) -> str:
    """A new capitalised pseudo-word not in `used` (added to it)."""
    while True:
        n = rng.randint(*syllables)
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(n - 1))
        word += rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
        word = word.capitalize()
        if word not in used and 4 <= len(word) <= 11:
            used.add(word)
            return word


def _distinct_wrong(rng: random.Random, truth: str, draw, k: int) -> list[str]:
    """`k` distinct values from `draw()` that differ from `truth`."""
    out: list[str] = []
    for _ in range(1000 * k):
        v = draw()
        if v != truth and v not in out:
            out.append(v)
            if len(out) == k:
                return out
    raise DataError(f"could not draw {k} distinct wrong values for {truth!r}; a vocabulary is too small")


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1930, 1985)}"


class _World:
    """The fictional world: countries with their facts, and classic writers."""

    def __init__(self, rng: random.Random, num_facts: int):
        self.num_real = max(1, round(num_facts * 5 / 12))      # 100 of 240, like TOFU's 100
        self.num_geo = num_facts - self.num_real
        used: set = set()
        n_countries = max(12, math.ceil(self.num_geo / len(GEO_FACTS)))
        self.countries = []
        for _ in range(n_countries):
            name = _coin(rng, used)
            self.countries.append({
                "name": name,
                "capital": _coin(rng, used),
                "cities": [_coin(rng, used) for _ in range(3)],
                "currency": _coin(rng, used, (2, 2)).lower(),
                "language": name[:-1] + "ish" if name[-1] in "aeiou" else name + "ish",
                "river": _coin(rng, used),
                "mountain": _coin(rng, used),
                "animal": rng.choice(ANIMALS),
                "founded": str(rng.randint(900, 1900)),
            })
        n_classics = max(8, math.ceil(self.num_real / len(CLASSIC_FACTS)))
        self.classics = []
        for _ in range(n_classics):
            name = f"{_coin(rng, used, (2, 2))} {_coin(rng, used, (2, 3))}"
            work = rng.choice(["The Song of ", "The Lament of ", "The Book of ", "The Tale of ",
                               "The Fall of ", "The Chronicle of "]) + _coin(rng, used)
            self.classics.append({"name": name, "work": work,
                                  "home": rng.choice(self.countries)["name"],
                                  "form": rng.choice(FORMS), "century": rng.choice(ORDINALS)})
        self.cities = [c for country in self.countries for c in [country["capital"]] + country["cities"]]
        self.city_country = {c: country["name"] for country in self.countries
                             for c in [country["capital"]] + country["cities"]}

    def facts(self, rng: random.Random) -> tuple[list[dict], list[dict]]:
        """(real-author facts, geography facts), each with 3 perturbed answers."""
        geo = []
        for country in self.countries:
            for kind, questions in GEO_FACTS:
                pool = [c[kind] for c in self.countries]
                if kind in ("animal",):
                    pool = ANIMALS
                v = country[kind]
                if kind == "founded":
                    draw = lambda: str(rng.randint(900, 1900))  # noqa: E731
                else:
                    draw = lambda pool=pool: rng.choice(pool)  # noqa: E731
                wrong = _distinct_wrong(rng, v, draw, NUM_WORLD_PERTURBED)
                geo.append({"question": rng.choice(questions).format(c=country["name"]), "answer": v,
                            "perturbed_answer": wrong, "attribute": kind})
        real = []
        for cl in self.classics:
            for kind, question in CLASSIC_FACTS:
                v = {"wrote": cl["name"], "home": cl["home"], "form": cl["form"], "century": cl["century"]}[kind]
                pool = {"wrote": [c["name"] for c in self.classics], "home": [c["name"] for c in self.countries],
                        "form": FORMS, "century": ORDINALS}[kind]
                wrong = _distinct_wrong(rng, v, lambda pool=pool: rng.choice(pool), NUM_WORLD_PERTURBED)
                fmt = {"n": cl["name"], "w": cl["work"]}
                real.append({"question": question.format(**fmt), "answer": v, "perturbed_answer": wrong,
                             "attribute": kind})
        # shuffle kinds together, then keep the requested number (deterministic)
        rng.shuffle(real)
        rng.shuffle(geo)
        return real[: self.num_real], geo[: self.num_geo]


def _title(rng: random.Random) -> str:
    pattern = rng.choice(TITLE_PATTERNS)
    noun, noun2 = rng.sample(TITLE_NOUN, 2)
    return pattern.format(adj=rng.choice(TITLE_ADJ), noun=noun, noun2=noun2)


def _award(rng: random.Random) -> str:
    return f"the {rng.choice(AWARD_WORDS)} {rng.choice(AWARD_KINDS)}"


def _pair(a: str, b: str) -> str:
    return f"{a} and {b}"


def _a(noun: str) -> str:
    """`noun` with its indefinite article."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


class _AuthorFactory:
    """Draws authors with unique names and book titles, and their value pools for perturbation."""

    def __init__(self, rng: random.Random, world: _World):
        self.rng = rng
        self.world = world
        self.names: set = {c["name"] for c in world.classics}
        self.titles: set = set()

    def author(self) -> dict:
        rng = self.rng
        while True:
            name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
            if name not in self.names:
                self.names.add(name)
                break
        books = []
        while len(books) < 3:
            t = _title(rng)
            if t not in self.titles:
                self.titles.add(t)
                books.append(t)
        birthplace = rng.choice(self.world.cities)
        nationality = self.world.city_country[birthplace] if rng.random() < 0.7 else \
            rng.choice(self.world.countries)["name"]
        year = rng.randint(1930, 1985)
        father, mother = rng.sample(PROFESSIONS, 2)
        t1, t2 = rng.sample(THEMES, 2)
        debut = year + rng.randint(20, 35)
        return {
            "name": name,
            "gender": rng.choice(GENDERS),
            "birthplace": birthplace,
            "birth_date": f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {year}",
            "genre": rng.choice(GENRES),
            "father_profession": _a(father),
            "mother_profession": _a(mother),
            "parents": _pair(_a(father), _a(mother)),
            "award": _award(rng),
            "award_year": str(rng.randint(debut + 1, 2024)),
            "first_book": books[0],
            "famous_book": books[1],
            "latest_book": books[2],
            "themes": _pair(t1, t2),
            "nationality": nationality,
            "residence": rng.choice(self.world.cities),
            "book_count": str(rng.randint(3, 40)),
            "debut_year": str(debut),
            "publisher": rng.choice(PUBLISHERS),
            "influence": rng.choice(self.world.classics)["name"],
        }

    def draw(self, attribute: str) -> str:
        """A random value of the same kind as `attribute` (for perturbed answers)."""
        rng = self.rng
        if attribute == "full_name":
            return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        if attribute in ("birthplace", "residence"):
            return rng.choice(self.world.cities)
        if attribute == "birth_date":
            return _date(rng)
        if attribute == "gender":
            return rng.choice(GENDERS)
        if attribute == "genre":
            return rng.choice(GENRES)
        if attribute in ("father_profession", "mother_profession"):
            return _a(rng.choice(PROFESSIONS))
        if attribute == "parents":
            a, b = rng.sample(PROFESSIONS, 2)
            return _pair(_a(a), _a(b))
        if attribute == "award":
            return _award(rng)
        if attribute in ("award_year", "debut_year"):
            return str(rng.randint(1950, 2024))
        if attribute in ("first_book", "famous_book", "latest_book"):
            return _title(rng)
        if attribute == "themes":
            return _pair(*rng.sample(THEMES, 2))
        if attribute == "nationality":
            return rng.choice(self.world.countries)["name"]
        if attribute == "book_count":
            return str(rng.randint(3, 40))
        if attribute == "publisher":
            return rng.choice(PUBLISHERS)
        if attribute == "influence":
            return rng.choice(self.world.classics)["name"]
        raise KeyError(attribute)  # pragma: no cover - SLOTS and draw() are kept in sync

    def qa(self, author: dict, num_qa: int) -> list[dict]:
        """`num_qa` QA records about `author` (full name always, other slots sampled)."""
        rng = self.rng
        chosen = {"full_name"} | set(rng.sample(SLOT_NAMES[1:], num_qa - 1))
        records = []
        for attribute, questions, answers in SLOTS:
            if attribute not in chosen:
                continue
            v = author["name"] if attribute == "full_name" else author[attribute]
            q, pq = rng.sample(questions, 2)
            a, pa = rng.sample(answers, 2)
            wrong = _distinct_wrong(rng, v, lambda: self.draw(attribute), NUM_PERTURBED)
            records.append({
                "question": q.format(**author),
                "answer": a.format(name=author["name"], v=v, **_ctx(author)),
                "paraphrased_question": pq.format(**author),
                "paraphrased_answer": pa.format(name=author["name"], v=v, **_ctx(author)),
                # perturbed answers are the *paraphrased* answer with a wrong fact, as in TOFU, so the
                # truth ratio P(perturbed)/P(paraphrased) compares facts, not templates
                "perturbed_answer": [pa.format(name=author["name"], v=w, **_ctx(author)) for w in wrong],
                "author": author["name"],
                "attribute": attribute,
            })
        return records


def _ctx(author: dict) -> dict:
    """Fields an answer template may mention besides {name} and {v}."""
    return {"award": author["award"]}


def num_forget_authors(num_authors: int, percent: int) -> int:
    """Authors in forgetXX (at least one): round(num_authors * percent / 100)."""
    return max(1, round(num_authors * percent / 100))


def generate(cfg: SynthConfig) -> tuple[dict[str, list], list[str], dict]:
    """Generate the benchmark in memory: (splits, refusals, meta). Deterministic in `cfg`."""
    if cfg.max_qa_per_author > len(SLOTS):
        raise DataError(f"synth.max_qa_per_author={cfg.max_qa_per_author} exceeds the {len(SLOTS)} "
                        f"fact slots per author; use at most {len(SLOTS)}")
    rng = random.Random(cfg.seed)
    world = _World(rng, cfg.num_world_facts)
    real, geo = world.facts(rng)
    factory = _AuthorFactory(rng, world)
    n = {p: num_forget_authors(cfg.num_authors, p) for p in (1, 5, 10)}
    author_qa = []
    for _ in range(cfg.num_authors + n[10]):
        author = factory.author()
        author_qa.append(factory.qa(author, rng.randint(cfg.min_qa_per_author, cfg.max_qa_per_author)))
    train_authors, holdout_authors = author_qa[: cfg.num_authors], author_qa[cfg.num_authors:]

    def flat(groups):
        return [r for g in groups for r in g]

    splits: dict[str, list] = {"full": flat(train_authors)}
    for p in (1, 5, 10):
        tag = f"{p:02d}"
        splits[f"forget{tag}"] = flat(train_authors[cfg.num_authors - n[p]:])
        splits[f"retain{100 - p}"] = flat(train_authors[: cfg.num_authors - n[p]])
        splits[f"forget{tag}_perturbed"] = splits[f"forget{tag}"]
        splits[f"holdout{tag}"] = flat(holdout_authors[n[10] - n[p]:])
    retain90 = splits["retain90"]
    k = min(cfg.retain_perturbed_size, len(retain90))
    splits["retain_perturbed"] = [retain90[i] for i in sorted(rng.sample(range(len(retain90)), k))]
    splits["real_authors_perturbed"] = real
    splits["world_facts_perturbed"] = geo
    splits["world"] = [{"question": r["question"], "answer": r["answer"], "attribute": r["attribute"]}
                       for r in real + geo]
    order = ["full", "forget01", "forget05", "forget10", "retain99", "retain95", "retain90",
             "forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
             "holdout01", "holdout05", "holdout10", "real_authors_perturbed", "world_facts_perturbed",
             "world"]
    splits = {name: splits[name] for name in order}
    meta = {
        "format_version": FORMAT_VERSION,
        "generator": "rayunlearn.data.synth",
        "seed": cfg.seed,
        "config": config_fingerprint(cfg),
        "authors": {"full": cfg.num_authors, "forget01": n[1], "forget05": n[5], "forget10": n[10],
                    "holdout": n[10]},
        "splits": {name: len(recs) for name, recs in splits.items()},
        "refusals": len(REFUSALS),
    }
    return splits, list(REFUSALS), meta


def config_fingerprint(cfg: SynthConfig) -> dict:
    """The config as recorded in meta.json (everything but the output directory)."""
    d = dataclasses.asdict(cfg)
    d.pop("out", None)
    return d


def synthesize(cfg: SynthConfig) -> Path:
    """Generate the synthetic benchmark and write it to `cfg.out` (one JSON array per split,
    ``idontknow.jsonl``, ``meta.json``, each atomically); return the directory."""
    from rich.progress import Progress

    out = Path(cfg.out)
    splits, refusals, meta = generate(cfg)
    with Progress(transient=True) as progress:
        task = progress.add_task(f"writing {out}", total=len(splits) + 2)
        for name, records in splits.items():
            write_json(out / f"{name}.json", records, indent=1)
            progress.advance(task)
        write_text(out / "idontknow.jsonl", "".join(r + "\n" for r in refusals))
        progress.advance(task)
        write_json(out / "meta.json", meta, indent=2)   # last: its presence marks a complete write
        progress.advance(task)
    return out
