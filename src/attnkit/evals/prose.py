"""Deterministic generator of varied English-like filler prose.

It is the built-in haystack for needle-in-a-haystack runs and the plain text the embedded model is
trained on. Sentences come from a small grammar over hand-written word lists, so the text is
grammatical-looking but carries no facts a needle could collide with.
"""

from __future__ import annotations

import random

NOUNS = """river garden window letter village teacher market bridge lantern harbor orchard
kitchen library mountain forest meadow engine painter farmer sailor student doctor baker
merchant soldier traveler neighbor child story question answer morning evening winter summer
autumn spring journey road path field valley island city street corner table chair door
candle mirror clock notebook pencil basket bottle blanket carpet ladder wagon bicycle boat
train station museum theater hospital school office factory workshop bakery castle tower
cottage cabin barn fence stone pebble shell feather leaf branch root seed flower tree
cloud storm rain snow wind thunder shadow light fire smoke ash dust sand wave tide moon star
planet comet map compass coin ticket parcel song poem painting photograph sketch melody
drum violin piano trumpet festival holiday dinner breakfast supper picnic recipe bread
cheese apple pear plum cherry lemon onion potato carrot soup tea coffee honey salt pepper
sugar butter idea plan promise rumor secret habit memory dream reason method problem
solution lesson chapter page margin border mountain council committee company team crowd
family friend stranger guest host captain pilot clerk judge mayor poet scholar gardener""".split()

ADJECTIVES = """old young quiet loud bright dark warm cold small large narrow wide tall short
heavy light gentle rough smooth soft hard early late ancient modern simple careful patient
curious eager tired busy lazy clever plain strange familiar distant nearby hidden open closed
empty crowded silent noisy golden silver wooden stony dusty muddy sunny rainy windy foggy
pale deep shallow steep flat crooked straight round square broken mended polished faded
fresh stale sweet bitter salty sour calm restless humble proud honest lucky careful sleepy
cheerful gloomy brave timid rare common useful useless precious ordinary remarkable modest
generous stubborn thoughtful""".split()

# (base, past, third-person) for the verbs the grammar conjugates
VERBS = [tuple(v.split("/")) for v in """walk/walked/walks carry/carried/carries watch/watched/watches
open/opened/opens close/closed/closes paint/painted/paints visit/visited/visits
clean/cleaned/cleans follow/followed/follows answer/answered/answers repair/repaired/repairs
explain/explained/explains describe/described/describes notice/noticed/notices
remember/remembered/remembers collect/collected/collects measure/measured/measures
study/studied/studies borrow/borrowed/borrows deliver/delivered/delivers
prepare/prepared/prepares arrange/arranged/arranges discover/discovered/discovers
build/built/builds find/found/finds keep/kept/keeps leave/left/leaves bring/brought/brings
buy/bought/buys sell/sold/sells read/read/reads write/wrote/writes draw/drew/draws
hear/heard/hears see/saw/sees hold/held/holds send/sent/sends teach/taught/teaches
tell/told/tells choose/chose/chooses forget/forgot/forgets""".split()]

INTRANSITIVE = [tuple(v.split("/")) for v in """wait/waited/waits laugh/laughed/laughs
rest/rested/rests travel/traveled/travels listen/listened/listens wander/wandered/wanders
arrive/arrived/arrives return/returned/returns sing/sang/sings sleep/slept/sleeps
run/ran/runs swim/swam/swims smile/smiled/smiles argue/argued/argues work/worked/works""".split()]

ADVERBS = """slowly quickly quietly carefully gently suddenly often rarely always never
sometimes usually happily sadly patiently eagerly loudly softly briefly again together
early late still almost nearly""".split()

PREPOSITIONS = """near beside behind across along under over through around beyond toward
inside outside past against among between""".split()

NAMES = """Anna Boris Clara Daniel Elena Felix Greta Hugo Irene Jonas Katya Lukas Mira Nora
Oskar Paula Quentin Rosa Stefan Tilda Ulrich Vera Walter Xenia Yusuf Zora Amelia Bruno
Cecilia Dmitri Edith Franz Gisela Henrik Ida Jakob Lena Milan Olga Peter Ruth Simon Tomas""".split()

PLACES = """Ashford Brightwater Coldharbor Dunmore Eastwick Fairhaven Glenmoor Highbury Ironvale
Juniper Kingsbridge Larkspur Millbrook Northfield Oakridge Pinecrest Queensmoor Redwater
Stonebridge Thornbury Upton Westmere Yarrow Zennor""".split()

CONNECTIVES = """However, Meanwhile, Later, Afterwards, In the end, For a while, At first,
Even so, Still, Of course, By then, That year, Once again, Before long,""".split("\n")
CONNECTIVES = [c.strip() for line in CONNECTIVES for c in line.split(",") if c.strip()]

SAYINGS = ["said", "replied", "whispered", "remarked", "asked", "added", "admitted"]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


class ProseGenerator:
    """Yields sentences of filler prose; the same seed always gives the same text."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def _pick(self, words):
        return self.rng.choice(words)

    def _noun_phrase(self) -> str:
        r = self.rng.random()
        if r < 0.45:
            return f"the {self._pick(ADJECTIVES)} {self._pick(NOUNS)}"
        if r < 0.7:
            return f"the {self._pick(NOUNS)}"
        if r < 0.8:
            return _with_article(f"{self._pick(ADJECTIVES)} {self._pick(NOUNS)}")
        if r < 0.92:
            return self._pick(NAMES)
        return f"the {self._pick(NOUNS)} of {self._pick(PLACES)}"

    def _clause(self) -> str:
        subject = self._noun_phrase()
        r = self.rng.random()
        if r < 0.5:
            verb = self._pick(VERBS)[1]
            clause = f"{subject} {verb} {self._noun_phrase()}"
        elif r < 0.75:
            verb = self._pick(INTRANSITIVE)[1]
            clause = f"{subject} {verb} {self._pick(PREPOSITIONS)} {self._noun_phrase()}"
        elif r < 0.9:
            clause = f"{subject} was {self._pick(ADJECTIVES)}"
        else:
            verb = self._pick(VERBS)[2]
            clause = f"{subject} {self._pick(ADVERBS)} {verb} {self._noun_phrase()}"
        if self.rng.random() < 0.3:
            clause += f" {self._pick(ADVERBS)}"
        return clause

    def sentence(self) -> str:
        r = self.rng.random()
        if r < 0.55:
            body = self._clause()
        elif r < 0.75:
            joiner = self._pick(["and", "but", "while", "because", "so", "until", "after"])
            body = f"{self._clause()}, {joiner} {self._clause()}"
        elif r < 0.85:
            body = f"{self._pick(CONNECTIVES)} {self._clause()}"
        elif r < 0.93:
            quote = self._clause()
            body = f"\"{quote[0].upper()}{quote[1:]},\" {self._pick(SAYINGS)} {self._pick(NAMES)}"
            return body + "."
        else:
            body = f"in {self.rng.randint(1801, 1999)} {self._clause()} {self.rng.randint(2, 90)} times"
        return body[0].upper() + body[1:] + "."

    def paragraph(self, min_sentences: int = 3, max_sentences: int = 8) -> str:
        n = self.rng.randint(min_sentences, max_sentences)
        return " ".join(self.sentence() for _ in range(n))

    def text(self, n_chars: int) -> str:
        """At least `n_chars` characters of prose, in paragraphs separated by blank lines."""
        parts, size = [], 0
        while size < n_chars:
            p = self.paragraph()
            parts.append(p)
            size += len(p) + 2
        return "\n\n".join(parts)


def filler_text(n_chars: int = 200_000, seed: int = 0) -> str:
    """The built-in haystack: `n_chars` of deterministic filler prose."""
    return ProseGenerator(seed).text(n_chars)
