"""Prompt templates for System 2 Attention (Weston & Sukhbaatar 2023, arXiv 2311.11829).

The wording is ours; what each template asks for follows the paper's description of the variant.
The field labels of `s2a` and `s2a-relevance` are the paper's, because the parser and the step-2
prompt depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

class Label(str):
    """A field label as the prompts write it, carrying the key words (a regex) by which the parser finds
    it in a model's output whatever decoration surrounds it: label and parser come from one record."""

    pattern: str

    def __new__(cls, text: str, pattern: str):
        label = super().__new__(cls, text)
        label.pattern = pattern
        return label


CONTEXT_LABEL = Label("Unbiased text context (includes all content except user's bias):",
                      r"unbiased\s+(?:text\s+)?context")
QUESTION_LABEL = Label("Question/Query (does not include user bias/preference):", r"question\s*/\s*query")
RELEVANT_CONTEXT_LABEL = Label("Context text related to the question (includes all content except unrelated sentences):",
                               r"context\s+text\s+related\s+to\s+the\s+question|related\s+context")
DETAILED_QUESTION_LABEL = Label("Detailed question:", r"detailed\s+question")
ANSWER_INSTRUCTION = "Answer in an unbiased way."
INSTRUCTED = ("Answer the question below. Do not let any opinion the user states, or any sentence that has "
              "nothing to do with the question, influence your answer.\n\n{text}")
GSM_ANSWER_FORMAT = "Give your answer as:\nSolution: <your reasoning>\nFinal answer (in numbers): <number>"

_S2A = """Below is a text written by a user. Pull out the part of it that is unbiased and is not the \
user's own opinion, so that this part by itself is good context for an unbiased answer. Keep the \
user's actual question too.

Write exactly two sections, with these labels and nothing else:
{context_label} <the unbiased context>
{question_label} <the question, without the user's opinion or preference>

User text:
{text}"""

_RELEVANCE = """Below is a text written by a user. Pull out the part of it that is related to the \
question and useful for answering it accurately and correctly; leave out every sentence that has \
nothing to do with the question. Keep the full question.

Write exactly two sections, with these labels and nothing else:
{context_label} <the related context>
{question_label} <the question, stated in full>

User text:
{text}"""

_SINGLE = """Below is a text written by a user. Rewrite it keeping only the part that is unbiased and \
is not the user's own opinion, and make sure the rewrite still contains the user's actual question. \
Reply with the rewritten text only.

User text:
{text}"""


@dataclass(frozen=True)
class Variant:
    name: str
    rewrite: str | None  # step-1 template; None for one-call variants
    context_label: str = CONTEXT_LABEL
    question_label: str = QUESTION_LABEL
    split: bool = True  # step 1 output has context + question fields
    instruction: str = ANSWER_INSTRUCTION  # appended in step 2 ("" for none)
    keep_original: bool = False
    description: str = ""
    # variants without a rewrite: the one prompt they send, from the user's text and the oracle prompt
    direct: Callable[[str, str | None], str] | None = None
    needs_oracle: bool = False


VARIANTS = {
    "s2a": Variant("s2a", _S2A, description="context/question rewrite, answer from it (paper Fig. 2, 13)"),
    "s2a-single": Variant("s2a-single", _SINGLE, split=False, description="one rewrite, no split (Fig. 12)"),
    "s2a-keep-original": Variant("s2a-keep-original", _S2A, keep_original=True,
                                 description="step 2 sees the original and the rewrite (Fig. 14)"),
    "s2a-ni": Variant("s2a-ni", _S2A, instruction="", description="s2a without the step-2 instruction"),
    "s2a-relevance": Variant("s2a-relevance", _RELEVANCE, RELEVANT_CONTEXT_LABEL, DETAILED_QUESTION_LABEL,
                             instruction="", description="keep what is relevant (Fig. 15, GSM-IC)"),
    "baseline": Variant("baseline", None, description="the prompt as given", direct=lambda text, oracle: text),
    "oracle": Variant("oracle", None, description="the task's prompt without opinion or distractor",
                      direct=lambda text, oracle: oracle, needs_oracle=True),
    "instructed": Variant("instructed", None, description="one call, told to ignore opinions and irrelevant text",
                          direct=lambda text, oracle: INSTRUCTED.format(text=text)),
}


def rewrite_prompt(variant: Variant, text: str) -> str:
    return variant.rewrite.format(text=text, context_label=variant.context_label,
                                  question_label=variant.question_label)


def strip_parenthetical(label: str) -> str:
    """'Question/Query (does not include ...):' -> 'Question/Query:'"""
    head = label.split(" (", 1)[0].rstrip(":")
    return head + ":"
