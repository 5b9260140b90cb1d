"""The two-step S2A pipeline over any chat backend.

Step 1: x' ~ LLM(P(x)), the model rewrites the user's text; step 2: y ~ LLM(x'), it answers from the
rewrite alone (the original is dropped, except in `s2a-keep-original`). Defaults follow the paper:
temperature 0.6 and top-p 0.9 for every call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import AttnkitError
from .backends import Backend, ChatSampling
from .parse import parse
from .prompts import VARIANTS, Variant, rewrite_prompt, strip_parenthetical


@dataclass
class S2AResult:
    variant: str
    final_prompt: str  # what the answering call saw
    answer: str
    rewrite: str | None = None  # raw step-1 output
    parsed: dict | None = None
    parse_ok: bool = True
    fell_back: bool = False
    tokens: dict = field(default_factory=lambda: {"prompt": 0, "completion": 0})
    truncated: bool = False  # the answer was cut by the token budget

    def to_dict(self) -> dict:
        return asdict(self)


def step2_prompt(variant: Variant, original: str, context: str, question: str) -> str:
    if variant.split:
        parts = []
        if context:
            parts.append(f"{strip_parenthetical(variant.context_label)} {context}")
        parts.append(f"{strip_parenthetical(variant.question_label)} {question}")
        rewrite = "\n\n".join(parts)
    else:
        rewrite = context
    if variant.keep_original:
        text = (f"Original text from the user:\n{original}\n\n"
                f"A version of that text without the user's bias:\n{rewrite}")
    else:
        text = rewrite
    return f"{text}\n\n{variant.instruction}" if variant.instruction else text


class S2A:
    """`S2A(backend, "s2a").run(["..."])` rewrites then answers each text."""

    def __init__(self, backend: Backend, variant: str = "s2a", sampling: ChatSampling | None = None,
                 fallback: bool = True, answer_suffix: str = ""):
        if variant not in VARIANTS:
            raise AttnkitError(f"unknown S2A variant {variant!r}: choose from {', '.join(VARIANTS)}")
        self.backend, self.variant = backend, VARIANTS[variant]
        self.sampling = sampling or ChatSampling()
        self.fallback = fallback  # answer from the original prompt when the rewrite cannot be parsed
        self.answer_suffix = answer_suffix  # e.g. an answer format a task needs in the final call

    def _final(self, text: str) -> str:
        return f"{text}\n\n{self.answer_suffix}" if self.answer_suffix else text

    def prepare(self, texts: list[str]) -> list[S2AResult]:
        """Step 1 only: rewrite and parse each text; `final_prompt` is what step 2 will be asked."""
        v = self.variant
        step1 = self.backend.chat([[{"role": "user", "content": rewrite_prompt(v, t)}] for t in texts], self.sampling)
        results = []
        for t, out in zip(texts, step1):
            parsed = parse(out.text, v)
            usable = parsed.ok or (parsed.context and not v.split)
            if usable:
                final = step2_prompt(v, t, parsed.context, parsed.question)
            elif self.fallback:
                final = t
            else:
                final = step2_prompt(v, t, parsed.context, parsed.question or "")
            results.append(S2AResult(v.name, self._final(final), "", out.text,
                                     {"context": parsed.context, "question": parsed.question, "problem": parsed.problem},
                                     parse_ok=bool(usable), fell_back=not usable and self.fallback,
                                     tokens=dict(out.usage)))
        return results

    def run(self, texts: list[str], oracles: list[str | None] | None = None) -> list[S2AResult]:
        v = self.variant
        oracles = oracles or [None] * len(texts)
        if v.rewrite is None:
            if v.needs_oracle and any(o is None for o in oracles):
                raise AttnkitError(f"the {v.name} variant needs a task with opinion-free prompts")
            prompts = [self._final(v.direct(t, o)) for t, o in zip(texts, oracles)]
            outs = self.backend.chat([[{"role": "user", "content": p}] for p in prompts], self.sampling)
            return [S2AResult(v.name, p, o.text, tokens=o.usage, truncated=o.truncated) for p, o in zip(prompts, outs)]

        results = self.prepare(texts)
        finals = [r.final_prompt for r in results]
        step2 = self.backend.chat([[{"role": "user", "content": f}] for f in finals], self.sampling)
        for r, out in zip(results, step2):
            r.answer, r.truncated = out.text, out.truncated
            r.tokens = {k: r.tokens.get(k, 0) + out.usage.get(k, 0) for k in ("prompt", "completion")}
        return results
