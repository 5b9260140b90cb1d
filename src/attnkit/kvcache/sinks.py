"""Sink and window sizes for the retrieval-head KV cache, read off where a model's attention goes.

A window head keeps `sink` first tokens and `window` recent ones. How to split a per-head budget of
B = sink + window tokens is a property of the model: StreamingLLM found that a few first tokens
("attention sinks") draw a large share of every head's attention, the rest falls mostly on recent
tokens. This module measures both on natural text and picks the split that keeps the most mass.

On a text of `length` tokens, for every query at position q >= max_sink + max_window (so that the
first s keys and the last w keys never overlap) and every query head of a full-attention layer:

    sink_mass[s]   = attention probability on keys [0, s)          s = 0 .. max_sink
    recent_mass[w] = attention probability on keys (q - w, q]      w = 0 .. max_window

averaged over queries, heads and layers (every head a window head could be; the full heads chosen
later are the ones these sums serve worst). The mass a window head keeps with (s, w) is
sink_mass[s] + recent_mass[w]; for a budget B the best split maximises it over s + w = B.

    profile = attention_profile(model, tokenizer, text, length=1024)
    split = best_split(profile, budget=144)      # {"sink": 4, "window": 140, "kept_mass": 0.83}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.core.family import architecture
from attnkit.core.hook import intervene
from attnkit.errors import AttnkitError


@dataclass
class AttentionProfile:
    sink_mass: list[float]  # [max_sink + 1]: mean attention on the first s keys
    recent_mass: list[float]  # [max_window + 1]: mean attention on the last w keys (the query's own included)
    per_layer_sink: list[list[float]]  # [full layers][max_sink + 1]
    layers: list[int]  # the full-attention layers measured
    queries: int  # query positions averaged per head
    length: int


def masses(probs: torch.Tensor, first_query: int, max_sink: int, max_window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sink [heads, max_sink + 1], recent [heads, max_window + 1]): cumulative attention mass on the
    first s keys and on the last w keys, averaged over the batch and the queries from `first_query` on,
    from one layer's probabilities [batch, heads, queries, keys] (queries = keys, a causal pass)."""
    if first_query < max_sink + max_window - 1:
        raise AttnkitError("the first query must lie past max_sink + max_window so sink and window do not overlap")
    tokens = probs.shape[-1]
    q = torch.arange(first_query, tokens, device=probs.device)
    rows = probs[:, :, first_query:]  # [b, h, nq, keys]
    zero = rows.new_zeros(*rows.shape[:2], 1)
    sink = torch.cat([zero, rows[..., :max_sink].cumsum(-1).mean(2)], dim=-1).mean(0)  # [h, max_sink + 1]
    dist = torch.arange(max_window, device=probs.device)
    index = (q[:, None] - dist[None, :]).expand(*rows.shape[:2], -1, -1)  # [b, h, nq, max_window]: keys q, q-1, ...
    recent = rows.gather(-1, index).cumsum(-1).mean(2)
    recent = torch.cat([zero, recent], dim=-1).mean(0)  # [h, max_window + 1]
    return sink, recent


def attention_profile(model, tokenizer, text: str, length: int = 1024, max_sink: int = 64,
                      max_window: int = 512, batch: int = 1) -> AttentionProfile:
    """Measure sink and recent attention mass on `batch` stretches of `length` tokens of `text`."""
    arch = architecture(model.config)
    if length > arch.max_positions:
        raise AttnkitError(f"--length {length} exceeds the model's {arch.max_positions} positions")
    first_query = max_sink + max_window
    if length <= first_query:
        raise AttnkitError(f"--length must exceed max sink + max window ({first_query}) so queries see both apart")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    need = batch * (length - len(bos))
    if len(ids) < need:
        raise AttnkitError(f"the text has {len(ids)} tokens; {need} are needed for {batch} x {length}")
    step = length - len(bos)
    rows = torch.tensor([bos + ids[i * step:(i + 1) * step] for i in range(batch)])
    full_layers = [l for l, kind in enumerate(arch.layer_types) if kind == "full"]
    sinks, recents = {}, {}

    def observe(layer, probs):
        if layer in full_layers:
            s, r = masses(probs.float(), first_query, max_sink, max_window)
            sinks[layer], recents[layer] = s.cpu(), r.cpu()

    device = next(model.parameters()).device
    with torch.no_grad(), intervene(model, observer=observe):
        model(input_ids=rows.to(device), use_cache=False)
    sink = torch.stack([sinks[l] for l in full_layers])  # [layers, heads, max_sink + 1]
    recent = torch.stack([recents[l] for l in full_layers])
    return AttentionProfile(sink_mass=[round(float(x), 6) for x in sink.mean((0, 1))],
                            recent_mass=[round(float(x), 6) for x in recent.mean((0, 1))],
                            per_layer_sink=[[round(float(x), 6) for x in layer] for layer in sink.mean(1)],
                            layers=full_layers, queries=length - first_query, length=length)


def kept_mass(profile: AttentionProfile, sink: int, window: int) -> float:
    if not (0 <= sink < len(profile.sink_mass) and 0 <= window < len(profile.recent_mass)):
        raise AttnkitError(f"sink {sink} / window {window} lie outside the measured range "
                           f"(sink <= {len(profile.sink_mass) - 1}, window <= {len(profile.recent_mass) - 1})")
    return profile.sink_mass[sink] + profile.recent_mass[window]


def best_split(profile: AttentionProfile, budget: int) -> dict:
    """The (sink, window) with sink + window = budget (window >= 1) that keeps the most attention
    mass; ties go to the smaller sink."""
    max_sink, max_window = len(profile.sink_mass) - 1, len(profile.recent_mass) - 1
    if not 2 <= budget <= max_sink + max_window:
        raise AttnkitError(f"a budget of {budget} tokens lies outside 2 .. {max_sink + max_window} (the measured range)")
    best = None
    for s in range(0, min(max_sink, budget - 1) + 1):
        w = budget - s
        if w > max_window:
            continue
        mass = kept_mass(profile, s, w)
        if best is None or mass > best["kept_mass"] + 1e-9:
            best = {"sink": s, "window": w, "kept_mass": round(mass, 4)}
    return best


def smallest_budget(profile: AttentionProfile, coverage: float, budgets: list[int] | None = None) -> dict | None:
    """The first budget (in increasing order) whose best split keeps `coverage` of the attention mass;
    None when none does."""
    if not 0 < coverage <= 1:
        raise AttnkitError(f"coverage must lie in (0, 1], got {coverage}")
    max_total = len(profile.sink_mass) + len(profile.recent_mass) - 2
    for b in sorted(budgets or [16, 32, 48, 64, 96, 128, 144, 192, 256, 384, 512]):
        if b > max_total:
            break
        split = best_split(profile, b)
        if split["kept_mass"] >= coverage:
            return {**split, "budget": b}
    return None


def plot_profile(profile: AttentionProfile, path, model_name: str = "", marks: list[dict] | None = None) -> None:
    """Two panels: mass on the first s keys against s, and on the last w keys against w."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(range(len(profile.sink_mass)), profile.sink_mass, color="tab:red")
    a.set(xlabel="first s keys (sink)", ylabel="attention mass", title="sink", ylim=(0, 1))
    b.plot(range(len(profile.recent_mass)), profile.recent_mass, color="tab:blue")
    b.set(xlabel="last w keys (window)", title="recent", ylim=(0, 1))
    for m in marks or []:
        a.axvline(m["sink"], color="grey", lw=0.8, ls="--")
        b.axvline(m["window"], color="grey", lw=0.8, ls="--")
    fig.suptitle(f"where attention goes{': ' + model_name if model_name else ''} "
                 f"({len(profile.layers)} full layers, {profile.queries} queries of {profile.length} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
