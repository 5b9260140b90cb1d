"""Rows of a KV cache: what continuous batching needs (`attnkit serve`).

A running batch is left-padded: every row's cache holds the same number of positions, a row's real
tokens at the end, padding (masked out by the batch's 2D attention mask) before them. Three
operations keep it so, layer by layer:

* `join(a, b)`: the rows of `b` after those of `a`; the shorter one is first padded on the left;
* `select_rows(cache, rows)`: only those rows (finished or cancelled requests leave at once);
* `trim_left(cache, k)`: drop the first k positions once they are padding in every row, so that a
  batch that never empties does not grow without end.

A layer that has the four row methods (`ROW_METHODS`: `pad_left(n)`, `concat(other)`,
`select_rows(rows)`, `trim_left(k)`, as the retrieval-head cache's `HeadKVLayer` does) batches itself:
a new cache layer needs nothing here. transformers' `DynamicLayer` and `DynamicSlidingWindowLayer`
(Gemma's sliding layers) are handled below; other layer types are refused.
"""

from __future__ import annotations

import torch

from attnkit.errors import AttnkitError


ROW_METHODS = ("pad_left", "concat", "select_rows", "trim_left")


def _layer_kind(layer) -> str:
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    if all(callable(getattr(layer, m, None)) for m in ROW_METHODS):
        return "own"
    if isinstance(layer, DynamicSlidingWindowLayer):
        return "sliding"
    if type(layer) is DynamicLayer:
        return "full"
    raise AttnkitError(f"cache layers of type {type(layer).__name__} cannot be batched by attnkit")


def seq_length(cache) -> int:
    return cache.layers[0].get_seq_length()


def _pad(t: torch.Tensor, n: int, dim: int = 2) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _pad_left(layer, n: int) -> None:
    kind = _layer_kind(layer)
    if n == 0:
        return
    if kind == "own":
        layer.pad_left(n)
    elif kind == "full":
        layer.keys, layer.values = _pad(layer.keys, n), _pad(layer.values, n)
    else:  # sliding: the layer keeps the last window - 1 positions
        layer.cumulative_length += n
        want = min(layer.cumulative_length, layer.sliding_window - 1) - layer.keys.shape[2]
        if want > 0:
            layer.keys, layer.values = _pad(layer.keys, want), _pad(layer.values, want)


def join(a, b):
    """`a` with the rows of `b` appended (both left-padded to the longer); returns `a`."""
    la, lb = seq_length(a), seq_length(b)
    for x, y in zip(a.layers, b.layers):
        _pad_left(x, max(la, lb) - la)
        _pad_left(y, max(la, lb) - lb)
    for i, (x, y) in enumerate(zip(a.layers, b.layers)):
        if _layer_kind(x) == "own":
            x.concat(y)
        else:
            x.keys, x.values = torch.cat([x.keys, y.keys]), torch.cat([x.values, y.values])
    return a


def select_rows(cache, rows: torch.Tensor) -> None:
    for layer in cache.layers:
        if _layer_kind(layer) == "own":
            layer.select_rows(rows)
        else:
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]


def trim_left(cache, k: int) -> None:
    """Drop the first `k` positions (padding in every row)."""
    if k <= 0:
        return
    for layer in cache.layers:
        kind = _layer_kind(layer)
        if kind == "own":
            layer.trim_left(k)
        elif kind == "full":
            layer.keys, layer.values = layer.keys[:, :, k:], layer.values[:, :, k:]
        else:  # stored positions are [cumulative - stored, cumulative): drop those below k
            stored = layer.keys.shape[2]
            drop = max(0, k - (layer.cumulative_length - stored))
            layer.keys, layer.values = layer.keys[:, :, drop:], layer.values[:, :, drop:]
            layer.cumulative_length -= k
