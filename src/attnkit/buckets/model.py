"""Attention Buckets inference: one model, N RoPE bases, one batched forward per step.

Batch row i*N + b holds prompt i under base b (the rotary module is swapped for a per-row one, see
core/rope.py); every row keeps its own KV cache. After each forward the N next-token outputs of a
prompt are combined by confidence and the chosen token is appended to all N rows.

Combination modes:
- `paper` (default; the paper's equation): confidence of base b = its largest token probability;
  weights = confidences / their sum; combined distribution = sum_b w_b p_b.
- `reference` (the authors' code): weights = softmax over bases of each base's largest raw logit;
  combined logits = sum_b w_b logits_b.
`paper` is the default because the paper is the method of record; `reference` reproduces the
published numbers' code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..core.decode import cache_kwarg, eos_ids, last_logits_only, left_padded, render_chat, sample_token
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

    def _encode(self, prompts: list[str], chat_template: bool = False):
        """Left-padded ids of the prompts, each wrapped in the chat template (as one user turn) if asked."""
        add_special = True
        if chat_template:
            rendered = [render_chat(self.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
            prompts, add_special = [text for text, _ in rendered], rendered[0][1]
        batch = left_padded(self.tokenizer, prompts, add_special_tokens=add_special)
        return batch["input_ids"], batch["attention_mask"]

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

    @torch.no_grad()
    def steps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, temperature: float = 0.0,
              top_p: float = 1.0, seed: int | None = None):
        """Yield (chosen token per prompt [prompts], base weights [prompts, bases]) at every step, without
        end; the chosen tokens are fed back to every base's row. The caller decides when to stop."""
        from transformers import DynamicCache

        model, n = self.model, self.n
        prompts = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = next(model.parameters()).device
        ids = input_ids.repeat_interleave(n, dim=0).to(device)
        mask = attention_mask.repeat_interleave(n, dim=0).to(device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        cache = DynamicCache(config=model.config)
        with per_row_bases(model, self.config.bases):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                        use_cache=True, **cache_kwarg(model, cache), **last_logits_only(model))
            while True:
                logprobs, w = combine(out.logits[:, -1].view(prompts, n, -1), self.config.combine)
                chosen = sample_token(logprobs, temperature, top_p, gen)
                yield chosen, w
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                positions = positions[:, -1:] + 1
                out = model(input_ids=chosen.repeat_interleave(n).view(-1, 1).to(device), attention_mask=mask,
                            position_ids=positions, use_cache=True, **cache_kwarg(model, cache))

    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     max_new_tokens: int = 50, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int | None = None, stop_ids: set[int] | None = None,
                     stop_strings: tuple[str, ...] = ()) -> tuple[list[list[int]], list[list[list[float]]]]:
        """New token ids per prompt and per-step base weights; rows stop at EOS/stop ids/stop strings
        (finished prompts keep feeding a token until all are done; their output is ignored)."""
        prompts = input_ids.shape[0]
        stop_ids = set(stop_ids or ()) | eos_ids(self.model, self.tokenizer)
        tokens = [[] for _ in range(prompts)]
        weights = [[] for _ in range(prompts)]
        done = [False] * prompts
        steps = self.steps(input_ids, attention_mask, temperature, top_p, seed)
        try:
            for _, (chosen, w) in zip(range(max_new_tokens), steps):
                for i in range(prompts):
                    if done[i]:
                        continue
                    t = int(chosen[i])
                    tokens[i].append(t)
                    weights[i].append([round(float(x), 6) for x in w[i]])
                    if t in stop_ids or (stop_strings and _hits(self.tokenizer, tokens[i], stop_strings)):
                        done[i] = True
                if all(done):
                    break
        finally:
            steps.close()  # leaves per_row_bases, restoring the model's rotary modules
        return tokens, weights

    def system(self):
        """This model as an evaluation system (`attnkit.evals.kv_retrieval.System`): greedy; a raw prompt is cut at a newline."""
        from ..evals.kv_retrieval import System

        def generate(prompt: str, max_new_tokens: int, chat_template: bool = False) -> str:
            stop = () if chat_template else ("\n",)  # a chat answer ends with its turn
            return self.generate(prompt, max_new_tokens=max_new_tokens, stop=stop, chat_template=chat_template)[0].text
        return System(generate, {"bases": list(self.config.bases), "combine": self.config.combine})

    def as_decoder(self, stop: tuple[str, ...] = ("\n",)):
        """`decode(input_ids [1, n], max_new_tokens) -> new ids`: greedy over the buckets, stopping at
        EOS or a stop string; what `attnkit.evals.niah.evaluate(decode=...)` takes."""
        def decode(input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
            return self.generate_ids(input_ids, None, max_new_tokens, stop_strings=stop)[0][0]
        return decode

    def generate(self, prompts: list[str] | str, max_new_tokens: int = 50, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: tuple[str, ...] = (),
                 chat_template: bool = False) -> list[Generation]:
        """Generate for each prompt; `stop` strings end a prompt's generation once its answer has begun
        (leading whitespace never does) and are cut off."""
        if isinstance(prompts, str):
            prompts = [prompts]
        input_ids, mask = self._encode(prompts, chat_template)
        tokens, weights = self.generate_ids(input_ids, mask, max_new_tokens, temperature, top_p, seed,
                                            stop_strings=tuple(stop))
        results = []
        for ids, w in zip(tokens, weights):
            text = self.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
            for s in stop:
                if s in text:
                    text = text[:text.index(s)]
            results.append(Generation(text, ids, w))
        return results


def _hits(tokenizer, ids: list[int], stops: tuple[str, ...]) -> bool:
    """A stop string in the text so far, not counting the whitespace an answer starts with. The last
    tokens are checked first; the whole answer is decoded only when they hold a stop string."""
    if not any(s in tokenizer.decode(ids[-8:], skip_special_tokens=True) for s in stops):
        return False
    text = tokenizer.decode(ids, skip_special_tokens=True).lstrip()
    return any(s in text for s in stops)


def single_vs_buckets(model, tokenizer, config: BucketsConfig) -> list:
    """Two NIAH decoders: the model's own RoPE base, and Attention Buckets with `config`; each is named
    by its bases."""
    from ..core.loading import rope_base
    from ..evals.niah import Decoder

    own = rope_base(model.config)
    bases = ", ".join(f"{b:g}" for b in config.bases)
    return [Decoder(f"one base ({own:g})", {"system": "single"}),
            Decoder(f"buckets ({bases})", {"system": config.label}, BucketedModel(model, tokenizer, config).as_decoder())]
