"""Training data for the embedded model: filler prose plus synthetic needles, questions and answers.

Needles come from templates filled with random words, names, places and invented words, so the
model has to learn to *find and copy* rather than memorise. None of the templates reproduces the
three detection needles or attnkit's built-in evaluation needles; those stay unseen.
"""

from __future__ import annotations

import random
import textwrap

from attnkit.evals.prose import (ADJECTIVES, INTRANSITIVE, NAMES, NOUNS, PLACES, VERBS,
                                 ProseGenerator)

SYLLABLES = [c + v for c in "bdfghklmnprstvwz" for v in "aeiou"] + ["sh", "ch", "th", "qu", "st"]
ORGS = ["UNESCO", "NASA", "the city council", "the IMF", "the Royal Society", "the OECD",
        "the harbor authority", "the weather office", "the museum board", "the railway company"]
DOCS = ["report", "study", "survey", "letter", "memo", "article", "paper", "review", "bulletin"]
REPORT_VERBS = [("shows", "show"), ("says", "say"), ("finds", "find"), ("claims", "claim"),
                ("reveals", "reveal"), ("suggests", "suggest"), ("argues", "argue")]
GROUPS = ["everyone", "the villagers", "all the children", "most people", "the whole town",
          "the teachers", "his neighbors", "her colleagues", "the sailors", "the students"]
FEELINGS = [("dislike", "disliked"), ("admire", "admired"), ("fear", "feared"),
            ("trust", "trusted"), ("avoid", "avoided"), ("praise", "praised"), ("love", "loved")]
SUPERLATIVES = ["oldest", "quietest", "strangest", "finest", "cheapest", "tallest", "best",
                "easiest", "safest", "loveliest", "most famous", "most useful"]
ORDINALS = ["first", "second", "third", "last", "oldest", "strictest"]
ACTIVITY_VERBS = ["visit", "see", "try", "cook", "buy", "learn", "fix", "paint", "find", "grow"]
FUNCTION_WORDS = ["and", "with", "of", "in", "on", "at", "for", "to", "a", "the", "from", "by"]


class NeedleFactory:
    def __init__(self, seed: int, general_fraction: float = 0.0, vocab_words: list[str] | None = None,
                 vocab_fraction: float = 0.0):
        self.rng = random.Random(seed)
        self.prose = ProseGenerator(seed + 7)
        self.general_fraction = general_fraction
        # Words built from the tokenizer's own pieces. The prose grammar uses a few hundred words, so
        # most of the vocabulary's (tied) embeddings never train, and the model cannot copy a needle
        # made of words outside the grammar; needle words drawn from every piece fix that.
        self.vocab_words = vocab_words or []
        self.vocab_fraction = vocab_fraction if self.vocab_words else 0.0

    def pick(self, xs):
        return self.rng.choice(xs)

    def invented(self) -> str:
        w = "".join(self.pick(SYLLABLES) for _ in range(self.rng.randint(2, 4)))
        return w.capitalize() if self.rng.random() < 0.4 else w

    def vocab_word(self) -> str:
        w = "".join(self.pick(self.vocab_words) for _ in range(self.rng.choice((1, 1, 2))))
        return w.capitalize() if self.rng.random() < 0.15 else w

    def word(self) -> str:
        if self.rng.random() < self.vocab_fraction:
            return self.vocab_word()
        r = self.rng.random()
        if r < 0.25:
            return self.pick(NOUNS)
        if r < 0.4:
            return self.pick(ADJECTIVES)
        if r < 0.52:
            return self.pick(self.pick([VERBS, INTRANSITIVE]))[self.rng.randint(0, 2)]
        if r < 0.62:
            return self.pick(NAMES + PLACES)
        if r < 0.8:
            return self.invented()
        if r < 0.85:
            return str(self.rng.randint(0, 9999))
        return self.pick(FUNCTION_WORDS)

    def phrase(self, lo: int = 3, hi: int = 22) -> str:
        words = [self.word() for _ in range(self.rng.randint(lo, hi))]
        for i in range(1, len(words) - 1):
            r = self.rng.random()
            if r < 0.08:
                words[i] += ","
            elif r < 0.14:
                words[i] = "and"
        return " ".join(words)

    def subject(self) -> str:
        return self.pick([self.pick(NAMES), f"{self.pick(['Mr', 'Mrs', 'Dr', 'Miss'])} {self.invented().capitalize()}",
                          f"{self.pick(NAMES)} {self.invented().capitalize()}"])

    def place(self) -> str:
        if self.rng.random() < self.vocab_fraction:
            return self.vocab_word().capitalize()
        return self.pick(PLACES) if self.rng.random() < 0.5 else self.invented().capitalize()

    def make(self) -> tuple[str, str, str]:
        """One (needle, question, answer) triple: a paraphrased-prefix one or a templated one."""
        if self.rng.random() < self.general_fraction:
            return self.general()
        return self.templated()

    def general(self) -> tuple[str, str, str]:
        """Any sentence split into prefix + answer; the question restates the prefix loosely.

        Real needles are asked about in other words ("keeps his keys" -> "keep his keys", the
        subject moved to the end), so the model must find the sentence by its rarest shared words
        and copy what follows the last of them, not match one fixed template.
        """
        rng = self.rng
        sentence = self.prose.sentence() if rng.random() < 0.5 else self.templated()[0]
        words = sentence.rstrip(".").split()
        if len(words) < 6:
            return self.templated()
        k = rng.randint(2, min(len(words) - 3, 10))
        prefix, rest = words[:k], words[k:]
        asked = []
        for w in prefix:
            low = w.lower().strip(",")
            if low in ("the", "a", "an") and rng.random() < 0.3:
                continue
            if rng.random() < 0.2 and len(w) > 3 and w.endswith("s"):
                w = w[:-1]
            asked.append(w.strip(","))
        if asked[0][:1].isupper() and asked[0] not in NAMES and rng.random() < 0.7:
            asked[0] = asked[0].lower()
        if len(asked) > 3 and rng.random() < 0.2:  # subject moved to the end
            cut = rng.randint(1, len(asked) - 2)
            asked = asked[cut:] + asked[:cut]
        wh = self.pick(["What", "Where", "Why", "How", "When", "Who", "What does", "Where does",
                        "Why does", "Why did", "What did", "How does", "What is", "Which"])
        q = f"{wh} {' '.join(asked)}" + (" ?" if rng.random() < 0.5 else "?")
        return sentence, q, " ".join(rest) + "."

    def templated(self) -> tuple[str, str, str]:
        kind = self.rng.randrange(9)
        a = self.phrase()
        p, n, s = self.place(), self.pick(NOUNS), self.subject()
        if kind == 0:
            sup = self.pick(SUPERLATIVES)
            needle, q, ans = f"The {sup} {n} in {p} is {a}.", f"What is the {sup} {n} in {p}", f"{a}."
        elif kind == 1:
            sup, v = self.pick(SUPERLATIVES), self.pick(ACTIVITY_VERBS)
            needle = f"The {sup} way to {v} a {n} in {p} is to {a}."
            q, ans = f"What is the {sup} way to {v} a {n} in {p}", f"to {a}."
        elif kind == 2:
            adj, doc, org = self.pick(ADJECTIVES), self.pick(DOCS), self.pick(ORGS)
            v3, v = self.pick(REPORT_VERBS)
            needle = f"A {adj} {doc} from {org} {v3} that {a}."
            org_q = org.replace("the ", "", 1) if self.rng.random() < 0.5 else org
            q = f"What does a {adj} {doc} from {org_q} {self.pick([v, v3])}"
            ans = f"{a}."
        elif kind == 3:
            g, (base, past) = self.pick(GROUPS), self.pick(FEELINGS)
            needle = f"{s} is {past} by {g} because {a}."
            q, ans = f"Why does {g} {base} {s}", f"because {a}."
        elif kind == 4:
            verb = self.pick(VERBS)
            needle = f"{s} {verb[1]} the {n} because {a}."
            q, ans = f"Why did {s} {verb[0]} the {n}", f"because {a}."
        elif kind == 5:
            needle = f"{s} hid the {n} {self.pick(['under', 'behind', 'inside', 'near'])} {a}."
            q, ans = f"Where did {s} hide the {n}", needle.split(f"the {n} ", 1)[1]
        elif kind == 6:
            verb = self.pick(VERBS)
            needle = f"The {n} of {p} was {verb[1]} by {a}."
            q, ans = f"Who {verb[1]} the {n} of {p}", f"{a}."
        elif kind == 7:
            thing = self.pick(["magic number", "secret word", "password", "lucky number", "code name"])
            val = self.invented() if self.rng.random() < 0.5 else str(self.rng.randint(10, 999999))
            extra = f" and {a}" if self.rng.random() < 0.5 else ""
            needle = f"The {thing} of {p} is {val}{extra}."
            q, ans = f"What is the {thing} of {p}", f"{val}{extra}."
        else:
            needle = f"{s}'s favourite {n} is {a}."
            q, ans = f"What is {s}'s favourite {n}", f"{a}."
        q += " ?" if self.rng.random() < 0.4 else "?"
        return needle, q, ans


def noisy(text: str, rng: random.Random, factory: NeedleFactory) -> str:
    """Prose with invented words mixed in, as unfamiliar vocabulary appears in real haystacks."""
    words = text.split(" ")
    for i in range(len(words)):
        if rng.random() < 0.15:
            words[i] = factory.invented()
    return " ".join(words)


def prose_pieces(seed: int, n_chars: int) -> list[str]:
    """Sentences with their leading separator, so that concatenated pieces equal the running text.

    Every piece starts at a pre-tokenizer boundary (a space or a newline before a word), so
    tokenising pieces one by one gives exactly the tokens of the joined text.
    """
    rng = random.Random(seed)
    gen, factory = ProseGenerator(seed), NeedleFactory(seed + 1)
    pieces, size = [], 0
    while size < n_chars:
        style = rng.random()
        para = gen.paragraph()
        if style < 0.3:
            para = noisy(para, rng, factory)
        if style > 0.6:  # hard-wrapped lines, like many plain-text essays
            para = "\n".join(textwrap.wrap(para, rng.randint(55, 80)))
        sents = para.replace(". ", ".\x00").replace(".\n", ".\x00\n").split("\x00")
        for i, s in enumerate(sents):
            sep = "" if s.startswith("\n") else (" " if i else "\n\n")
            pieces.append(sep + s)
            size += len(s) + 1
    return pieces


def _pieces_job(args):
    return prose_pieces(*args)


def vocab_words(tokenizer) -> list[str]:
    """The tokenizer's purely alphabetic pieces (no leading space), as strings."""
    words = []
    for i in range(len(tokenizer)):
        w = tokenizer.decode([i]).strip()
        if w.isalpha() and w.isascii():
            words.append(w.lower())
    return sorted(set(words))
