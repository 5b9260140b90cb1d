"""Reading the step-1 rewrite back out of what a model actually writes.

Real outputs bend the format: labels with or without their parenthesised part, in bold or as
markdown headers, numbered, fields in the other order, a friendly preamble, a closing remark, or no
question field at all. We find the labels by their key words and cut the fields between them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .prompts import Variant

_DECOR = r"[ \t>*#_`\-]*(?:\d+[.)]\s*)?[*_`]*"
_COMMENTARY = re.compile(r"^\s*[(*_]*\s*(note|explanation|i (?:have |')?(?:removed|excluded|kept|omitted)|"
                         r"this (?:version|rewrite)|hope this|let me know)\b", re.I)
_PREAMBLE = re.compile(r"^\s*(sure|certainly|okay|ok|here(?:'s| is| are)|of course)\b.*$", re.I)


@dataclass
class Parsed:
    context: str
    question: str
    ok: bool  # both fields found (split variants) / non-empty rewrite (single)
    problem: str = ""  # why not ok, or what was repaired


def _label_regex(label: str) -> re.Pattern:
    """A `prompts.Label` is found by its key words; any other label by its text up to "(" or ":"."""
    key = getattr(label, "pattern", None) or r"\s+".join(map(re.escape, re.split(r"[(:]", label)[0].split()))
    # the label runs to its colon when there is one on the line (parenthesised part included)
    return re.compile(rf"^{_DECOR}(?:{key})(?:[^\n:]{{0,90}}:)?[ \t]*[*_`]*[ \t]*(?:-[ \t]+)?", re.I | re.M)


def _clean_field(text: str, first_paragraph: bool = False) -> str:
    text = text.strip().strip("*_` ")
    if first_paragraph:
        text = re.split(r"\n\s*\n", text, maxsplit=1)[0]
    lines = text.splitlines()
    while lines and (_COMMENTARY.match(lines[-1]) or not lines[-1].strip()):
        lines.pop()
    # a commentary paragraph after the field
    kept = []
    for line in lines:
        if _COMMENTARY.match(line) and kept and not kept[-1].strip():
            break
        kept.append(line)
    return "\n".join(kept).strip().strip('"').strip()


def parse_split(output: str, variant: Variant) -> Parsed:
    """Context and question fields of a two-field rewrite."""
    spans = {}
    for which, label in (("context", variant.context_label), ("question", variant.question_label)):
        m = _label_regex(label).search(output)
        if m:
            spans[which] = m
    if not spans:
        return Parsed("", "", False, "no field labels found")
    ordered = sorted(spans.items(), key=lambda kv: kv[1].start())
    fields = {}
    for n, (which, m) in enumerate(ordered):
        end = ordered[n + 1][1].start() if n + 1 < len(ordered) else len(output)
        fields[which] = output[m.end():end]
    context = _clean_field(fields.get("context", ""))
    question = _clean_field(fields.get("question", ""), first_paragraph="question" == ordered[-1][0])
    if not question:
        return Parsed(context, "", False, "no question field")
    return Parsed(context, question, True, "" if "context" in fields else "no context field")


def parse_single(output: str) -> Parsed:
    """The rewritten text of a one-field rewrite, without a chatty first line."""
    lines = output.strip().splitlines()
    if lines and _PREAMBLE.match(lines[0]) and (lines[0].rstrip().endswith(":") or len(lines) > 1):
        lines = lines[1:]
    text = _clean_field("\n".join(lines))
    return Parsed(text, "", bool(text), "" if text else "empty rewrite")


def parse(output: str, variant: Variant) -> Parsed:
    return parse_split(output, variant) if variant.split else parse_single(output)
