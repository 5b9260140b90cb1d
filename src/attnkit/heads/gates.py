"""Per-head gates learned by optimisation, DuoAttention's way (Xiao et al. 2024, arXiv 2410.10819).

Every KV head of a full-attention layer gets a gate a in [0, 1]; its query heads output
a * (full attention) + (1 - a) * (attention restricted to the sink + window the KV cache would keep).
The model's weights stay frozen; only the gates learn, on synthetic passkey contexts (passkeys at
random depths of a haystack, then "the pass keys are ..." at the end), by minimising

    mean over the answer positions of || h_full - h_gated ||^2 / hidden size  +  l1 * mean(a)

where h is the last hidden state: the gated model must reproduce what the full model computes where
it recalls the passkeys, with as few heads on full attention as it can. Gates start at 1 and are
clipped to [0, 1] after every step. The result is saved in the retrieval-score file format (every
query head of a KV head carries its gate), so `kv plan --scores gates.json` ranks heads by gate.

    gates, log = train_gates(model, tokenizer, GateTraining(steps=80))   # {(layer, head): [gate]}
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from attnkit.core.family import architecture
from attnkit.core.hook import base_function
from attnkit.errors import AttnkitError

GATE_PREFIX = "attnkit_gate_"  # the attention functions gate training registers
WHAT = "gate training (heads gates)"



@dataclass(frozen=True)
class GateTraining:
    """What one gate training does; the defaults take 9 minutes for SmolLM2-135M on 2 CPU cores."""

    steps: int = 80
    length: int = 768  # tokens per synthetic context
    passkeys: int = 3  # passkeys hidden in each context
    sink: int = 16  # the sink + window the gated heads fall back to (those of the KV cache)
    window: int = 128
    lr: float = 0.05
    l1: float = 0.05  # weight of the mean gate in the loss: higher, fewer full heads
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.passkeys < 1:
            raise AttnkitError("gate training needs at least one step and one passkey")
        if self.length <= self.sink + self.window:
            raise AttnkitError(f"contexts of {self.length} tokens fit in sink {self.sink} + window {self.window}: "
                               "nothing to learn; use longer contexts")
        if self.lr <= 0 or self.l1 < 0:
            raise AttnkitError("lr must be > 0 and l1 >= 0")


def passkey_context(tokenizer, haystack: str, length: int, passkeys: int, rng: random.Random) -> tuple[list[int], int]:
    """(token ids, index of the first answer token): a haystack of about `length` tokens with
    `passkeys` passkey sentences at random depths, then the question and the answer."""
    keys = [str(rng.randint(10_000, 999_999)) for _ in range(passkeys)]
    lines = [f" The pass key number {i + 1} is {k}. Remember it. {k} is pass key number {i + 1}. "
             for i, k in enumerate(keys)]
    question = " What are the pass keys? The pass keys are"
    answer = " " + ", ".join(keys) + "."
    budget = length - sum(len(tokenizer(x, add_special_tokens=False).input_ids) for x in lines + [question, answer]) - 1
    hay = tokenizer(haystack, add_special_tokens=False).input_ids
    if budget < 1 or len(hay) < budget:
        raise AttnkitError(f"the haystack is too short for {length}-token contexts")
    start = rng.randrange(0, len(hay) - budget + 1)
    hay = hay[start:start + budget]
    cuts = sorted(rng.randrange(0, len(hay)) for _ in keys)
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    last = 0
    for cut, line in zip(cuts, lines):
        ids += hay[last:cut] + tokenizer(line, add_special_tokens=False).input_ids
        last = cut
    ids += hay[last:] + tokenizer(question, add_special_tokens=False).input_ids
    first_answer = len(ids)
    return ids + tokenizer(answer, add_special_tokens=False).input_ids, first_answer


class Gates:
    """The gate of every KV head of the full-attention layers: [layers, kv heads] (sliding layers unused)."""

    def __init__(self, arch, sink: int, window: int):
        self.arch, self.sink, self.window = arch, sink, window
        self.values = torch.ones(arch.layers, arch.kv_heads, requires_grad=True)
        self.group = arch.query_heads // arch.kv_heads
        self.on = True  # off: the plain model (the targets)

    def as_scores(self) -> dict[tuple[int, int], list[float]]:
        v = self.values.detach().clamp(0, 1)
        return {(l, h): [round(float(v[l, h // self.group]), 6) if self.arch.layer_types[l] == "full" else 0.0]
                for l in range(self.arch.layers) for h in range(self.arch.query_heads)}


def _streaming_mask(q: int, k: int, sink: int, window: int, device) -> torch.Tensor:
    """[1, 1, q, k] bool: causal, and only the first `sink` keys or the last `window` (the query's own included)."""
    i = torch.arange(k - q, k, device=device)[:, None]
    j = torch.arange(k, device=device)[None, :]
    return ((j <= i) & ((j < sink) | (j > i - window)))[None, None]


def _make_attention(base: str):
    functions: dict[type, object] = {}  # the base attention, resolved once per module class

    def attention(module, query, key, value, attention_mask, **kwargs):
        fn = functions.get(type(module))
        if fn is None:
            fn = functions[type(module)] = base_function(base, module)
        gates: Gates | None = getattr(module, "_attnkit_gates", None)
        full, weights = fn(module, query, key, value, attention_mask, **kwargs)
        if gates is None or not gates.on or gates.arch.layer_types[module.layer_idx] != "full":
            return full, weights
        mask = _streaming_mask(query.shape[2], key.shape[2], gates.sink, gates.window, query.device)
        if base == "eager":
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, torch.finfo(query.dtype).min)
        stream, _ = fn(module, query, key, value, mask, **{**kwargs, "is_causal": False})
        a = gates.values[module.layer_idx].clamp(0, 1).repeat_interleave(gates.group).view(1, 1, -1, 1)
        return a * full + (1 - a) * stream, weights  # [batch, q, heads, dim]

    return attention


@contextmanager
def gated(model, gates: Gates):
    """Inside the block the model's full-attention heads mix full and streaming attention by `gates`."""
    from attnkit.core.hook import attention_modules, swap

    with swap(model, GATE_PREFIX, WHAT, _make_attention, ("sdpa", "eager")):
        modules = attention_modules(model)
        for m in modules.values():
            m._attnkit_gates = gates
        try:
            yield gates
        finally:
            for m in modules.values():
                m.__dict__.pop("_attnkit_gates", None)


def _load_state(path: Path | None, settings: GateTraining, gates: Gates, optimizer) -> list[dict]:
    """The log of an earlier run of the same settings at `path` (its gates and optimizer restored), or []."""
    if path is None or not path.is_file():
        return []
    state = torch.load(path, weights_only=True)
    mine = {k: v for k, v in asdict(settings).items() if k != "steps"}  # more steps continue a run
    theirs = {k: v for k, v in state.get("settings", {}).items() if k != "steps"}
    if mine != theirs or tuple(state["gates"].shape) != tuple(gates.values.shape):
        raise AttnkitError(f"{path} holds a gate training with other settings or for another model: "
                           "remove it or choose another --state file")
    with torch.no_grad():
        gates.values.copy_(state["gates"])
    optimizer.load_state_dict(state["optimizer"])
    return json.loads(state["log"])


def train_gates(model, tokenizer, settings: GateTraining = GateTraining(), haystack: str | None = None,
                quiet: bool = False, state: Path | None = None) -> tuple[dict, list[dict]]:
    """({(layer, head): [gate]}, one log row per step: step, loss, deviation, mean gate). With `state`,
    gates and optimizer are saved there after every step, and a rerun with the same settings resumes."""
    from attnkit.evals.niah import load_haystack
    from attnkit.evals.runner import progress_bar

    arch = architecture(model.config)
    if settings.length > arch.max_positions:
        raise AttnkitError(f"contexts of {settings.length} tokens exceed the model's {arch.max_positions} positions")
    text = haystack if haystack is not None else load_haystack(None)
    device = next(model.parameters()).device
    gates = Gates(arch, settings.sink, settings.window)
    optimizer = torch.optim.Adam([gates.values], lr=settings.lr)
    state = Path(state) if state is not None else None
    log = _load_state(state, settings, gates, optimizer)
    full_layers = torch.tensor(arch.full_layers)  # the gates that exist (sliding layers keep their window)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with gated(model, gates), progress_bar(quiet) as bar:
            task = bar.add_task("gate training", total=settings.steps, completed=len(log))
            for step in range(len(log), settings.steps):
                rng = random.Random(f"{settings.seed}-{step}")  # each step's context, whether resumed or not
                ids, first = passkey_context(tokenizer, text, settings.length, settings.passkeys, rng)
                ids = torch.tensor([ids], device=device)
                gates.on = False
                with torch.no_grad():
                    target = model.model(input_ids=ids).last_hidden_state[0, first - 1:-1].float()
                gates.on = True
                hidden = model.model(input_ids=ids).last_hidden_state[0, first - 1:-1].float()
                deviation = (hidden - target).pow(2).sum(-1).mean() / hidden.shape[-1]
                mean_gate = gates.values[full_layers].clamp(0, 1).mean()
                loss = deviation + settings.l1 * mean_gate
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    gates.values.clamp_(0, 1)
                log.append({"step": step, "loss": round(float(loss.detach()), 6), "deviation": round(float(deviation.detach()), 6),
                            "mean_gate": round(float(mean_gate.detach()), 4)})
                if state is not None:
                    tmp = state.with_name(state.name + ".tmp")
                    torch.save({"settings": asdict(settings), "gates": gates.values.detach().clone(),
                                "optimizer": optimizer.state_dict(), "log": json.dumps(log)}, tmp)
                    tmp.replace(state)
                bar.advance(task)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return gates.as_scores(), log
