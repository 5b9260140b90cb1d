import pytest

from attnkit.s2a.parse import parse
from attnkit.s2a.prompts import VARIANTS

S2A, REL, SINGLE = VARIANTS["s2a"], VARIANTS["s2a-relevance"], VARIANTS["s2a-single"]
CONTEXT = "The Great Wall was built over many centuries by several dynasties."
QUESTION = "Which dynasty built most of the Great Wall that stands today?"

# (model output, expected context, expected question), as chat models really write them
SPLIT_CASES = [
    (f"Unbiased text context (includes all content except user's bias): {CONTEXT}\n"
     f"Question/Query (does not include user bias/preference): {QUESTION}", CONTEXT, QUESTION),
    (f"Unbiased text context: {CONTEXT}\n\nQuestion/Query: {QUESTION}", CONTEXT, QUESTION),
    (f"**Unbiased text context (includes all content except user's bias):**\n{CONTEXT}\n\n"
     f"**Question/Query (does not include user bias/preference):**\n{QUESTION}", CONTEXT, QUESTION),
    (f"Sure! Here is the text split as you asked.\n\n### Unbiased text context\n{CONTEXT}\n\n"
     f"### Question/Query\n{QUESTION}\n\nI removed the user's opinion that it was the Qin dynasty.",
     CONTEXT, QUESTION),
    (f"Question/Query (does not include user bias/preference): {QUESTION}\n"
     f"Unbiased text context (includes all content except user's bias): {CONTEXT}", CONTEXT, QUESTION),
    (f"1. Unbiased text context: {CONTEXT}\n2. Question/Query: {QUESTION}", CONTEXT, QUESTION),
    (f"unbiased text context - {CONTEXT}\nquestion/query - {QUESTION}", None, None),  # no colon: still found?
    (f"Unbiased text context (includes all content except user's bias):\n\"{CONTEXT}\"\n\n"
     f"Question/Query (does not include user bias/preference):\n\"{QUESTION}\"\n\n"
     "Note: the original text contained the user's guess, which I left out.", CONTEXT, QUESTION),
    (f"Unbiased text context (includes all content except user's bias): None\n"
     f"Question/Query (does not include user bias/preference): {QUESTION}", "None", QUESTION),
    (f"Question/Query: {QUESTION}", "", QUESTION),  # no context field: usable, flagged
]


@pytest.mark.parametrize("output,context,question", [c for c in SPLIT_CASES if c[1] is not None])
def test_split_outputs_parse(output, context, question):
    p = parse(output, S2A)
    assert p.ok, p.problem
    assert p.context == context and p.question == question


def test_labels_without_colon_are_found_by_their_key_words():
    p = parse(SPLIT_CASES[6][0], S2A)
    assert p.ok and QUESTION in p.question and CONTEXT in p.context


def test_missing_question_field_fails_and_keeps_the_context():
    p = parse(f"Unbiased text context: {CONTEXT}", S2A)
    assert not p.ok and p.problem == "no question field" and p.context == CONTEXT


def test_no_labels_at_all_fails():
    p = parse("The answer is the Ming dynasty.", S2A)
    assert not p.ok and p.problem == "no field labels found"


def test_relevance_labels():
    out = ("Context text related to the question (includes all content except unrelated sentences): "
           "Tom has 3 apples. He buys 4 more.\nDetailed question: How many apples does Tom have now?")
    p = parse(out, REL)
    assert p.ok and p.context == "Tom has 3 apples. He buys 4 more."
    assert p.question == "How many apples does Tom have now?"


def test_single_rewrite_drops_a_chatty_first_line():
    p = parse(f"Here is the rewritten text:\n{CONTEXT} {QUESTION}", SINGLE)
    assert p.ok and p.context == f"{CONTEXT} {QUESTION}"
    assert not parse("   ", SINGLE).ok


def test_a_variant_with_labels_of_its_own_parses():
    """Labels carry their own key words (prompts.Label); a plain-text label is found by its words, so a
    new variant never needs the parser edited (it raised StopIteration before)."""
    from attnkit.s2a.parse import parse
    from attnkit.s2a.prompts import Label, Variant

    v = Variant("mine", "{text}", Label("Facts only (no opinions):", r"facts?\s+only"), "Ask (plainly):")
    got = parse("**Facts Only:** Paris is in France.\n**Ask:** What is the capital of France?", v)
    assert got.ok and got.context == "Paris is in France." and got.question == "What is the capital of France?"
