"""Attention Buckets inference: one model, N RoPE bases, one batched forward per step.

`BucketsConfig` is a technique of `core.generate`: inside `prepare(model)` batch row i*N + b holds
prompt i under base b (the rotary module is swapped for a per-row one, see core/rope.py), every row
keeps its own KV cache, the N next-token outputs of a prompt are combined by confidence, and the
chosen token is fed to all N rows. `BucketedModel` is the same for text prompts.

Combination modes:
- `paper` (default; the paper's equation): confidence of base b = its largest token probability;
  weights = confidences / their sum; combined distribution = sum_b w_b p_b.
- `reference` (the authors' code): weights = softmax over bases of each base's largest raw logit;
  combined logits = sum_b w_b logits_b.
`paper` is the default because the paper is the method of record; `reference` reproduces the
published numbers' code path.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..core.decode import last_logits_only
from ..core.generate import GREEDY, Sampling, Session, answer_text, encode_prompts, generate
from ..core.rope import per_row_bases, require_rope
from ..errors import AttnkitError

COMBINE_MODES = ("paper", "reference")


@dataclass
class BucketsConfig:
    bases: list[float]
    combine: Literal["paper", "reference"] = "paper"

    def __post_init__(self):
        if not self.bases:
            raise AttnkitError("Attention Buckets needs at least one RoPE base")
        if any(b <= 0 for b in self.bases):
            raise AttnkitError(f"RoPE bases must be positive, got {self.bases}")
        if self.combine not in COMBINE_MODES:
            raise AttnkitError(f"unknown combine mode {self.combine!r}: use one of {', '.join(COMBINE_MODES)}")

    @property
    def label(self) -> str:
        """Names the system in result rows, so that resumed runs match on bases and combine mode."""
        return f"buckets {self.combine} " + ",".join(f"{b:g}" for b in self.bases)

    @contextmanager
    def prepare(self, model):
        """The technique hook of `core.generate`: N rows per prompt, one base each."""
        require_rope(model)
        with per_row_bases(model, self.bases):
            yield BucketsSession(model, self)

    @property
    def rows_per_request(self) -> int:
        """Model rows one prompt takes (one per base): what a server's KV budget must count."""
        return len(self.bases)

    def describe(self) -> dict:
        return {"technique": "attention buckets", "bases": self.bases, "combine": self.combine}


class BucketsSession(Session):
    """Rows i*N .. i*N + N-1 are prompt i under each base; their outputs combine into one score row."""

    def __init__(self, model, config: BucketsConfig):
        super().__init__(model)
        self.config, self.rows = config, config.rows_per_request

    def scores(self, logits: torch.Tensor):
        return combine(logits.view(-1, self.rows, logits.shape[-1]), self.config.combine)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    weights: list[list[float]] = field(default_factory=list)  # per step, one weight per base


def combine(logits: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [prompts, bases, vocab] -> (log-probabilities [prompts, vocab], weights [prompts, bases])."""
    logits = logits.float()
    if mode == "paper":
        probs = logits.softmax(-1)
        confidence = probs.amax(-1)
        weights = confidence / confidence.sum(-1, keepdim=True)
        mixed = (weights[..., None] * probs).sum(1)
        return mixed.clamp_min(1e-30).log(), weights
    weights = logits.amax(-1).softmax(-1)
    mixed = (weights[..., None] * logits).sum(1)
    return mixed.log_softmax(-1), weights


class BucketedModel:
    """Run a Hugging Face RoPE model with several bases at once.

    >>> bm = BucketedModel(model, tokenizer, BucketsConfig([10000, 17500, 20000]))
    >>> bm.generate(["Question: ..."], max_new_tokens=20)[0].text
    """

    def __init__(self, model, tokenizer, config: BucketsConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        require_rope(model)

    @property
    def n(self) -> int:
        return len(self.config.bases)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last-position logits [prompts, bases, vocab] of one forward over left-padded prompts."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids, mask = (x.repeat_interleave(self.n, dim=0) for x in (input_ids, attention_mask))
        device = next(self.model.parameters()).device
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        with per_row_bases(self.model, self.config.bases):
            out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), use_cache=False, **last_logits_only(self.model))
        return out.logits[:, -1].view(len(input_ids), self.n, -1)

    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     max_new_tokens: int = 50, sampling: Sampling = GREEDY,
                     stop_strings: tuple[str, ...] = ()) -> tuple[list[list[int]], list[list[list[float]]]]:
        """New token ids per prompt and per-step base weights; rows stop at EOS/end of turn or a stop string."""
        out = generate(self.model, self.tokenizer, input_ids, attention_mask, self.config, max_new_tokens,
                       stop_rule="eos", stop_strings=stop_strings, sampling=sampling)
        weights = [[[round(float(x), 6) for x in w] for w in row] for row in out.info]
        return out.ids, weights

    def generate(self, prompts: list[str] | str, max_new_tokens: int = 50, sampling: Sampling = GREEDY,
                 stop: tuple[str, ...] = (), chat_template: bool = False) -> list[Generation]:
        """Generate for each prompt; `stop` strings end a prompt's generation once its answer has begun
        (leading whitespace never does) and are cut off."""
        if isinstance(prompts, str):
            prompts = [prompts]
        input_ids, mask = encode_prompts(self.tokenizer, prompts, chat_template)
        tokens, weights = self.generate_ids(input_ids, mask, max_new_tokens, sampling, tuple(stop))
        return [Generation(answer_text(self.tokenizer, ids, tuple(stop)), ids, w) for ids, w in zip(tokens, weights)]


def single_vs_buckets(model, config: BucketsConfig) -> list:
    """Two evaluation systems: the model's own RoPE base, and Attention Buckets with `config`; each is
    named by its bases."""
    from ..core.loading import rope_base
    from ..evals.systems import System

    own = rope_base(model.config)
    bases = ", ".join(f"{b:g}" for b in config.bases)
    return [System(f"one base ({own:g})", {"system": "single"}),
            System(f"buckets ({bases})", {"system": config.label}, config)]
