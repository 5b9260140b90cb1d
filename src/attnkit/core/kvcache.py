"""A KV cache that keeps every token for some KV heads and only sink + recent tokens for the others.

Per layer, each KV head is `full` (keeps all keys) or `window` (keeps the first `sink` real tokens
and the last `window` tokens). A query at position t of a window head sees keys [0, sink) and
(t - window, t] and nothing else, in prefill and in decoding (DuoAttention / RazorAttention's
streaming heads). Two pieces work together:

* `HeadKVCache`, a transformers `Cache` of `HeadKVLayer`s. `update` appends to the full heads and
  returns their keys as usual; the window heads' candidate keys are left on the layer for
* the attention function `attnkit_kv_<base>`, registered with `AttentionInterface` like the hook's.
  It attends the full heads with the model's own mask, the window heads with that mask gathered at
  the kept key positions and restricted to sink + window, writes both into the model's head order,
  and then trims the window heads back to sink + window tokens.

The hand-off is explicit: transformers' attention modules pass their forward's keyword arguments to
`cache.update(..., kwargs=kwargs)` and then splat the same dict into the attention function, so
`update` puts its layer there (`KV_LAYER_KWARG`) and the attention function takes it out. Keys are
stored after RoPE, so they keep their positions.

With `prefill="full"` nothing leaves during the prompt: every head reads all of it, in any chunks, and
`end_prefill()` (called by `core.generate.prefill` once the prompt is in) trims the window heads. A
window head with a **token budget** then first keeps its middle tokens (neither sink nor window) that
the prompt's last `select_window` queries attended most, averaged and pooled as SnapKV does; they sit
in a store of their own per head (`mid`: keys, values, positions; -1 marks an empty slot) that later
queries of that head read beside the window store, one attention call per such head.

Hybrid models (Gemma 3: five sliding-window layers per global layer) keep their native sliding
layers as transformers' own `DynamicSlidingWindowLayer`: those already hold only their window, so
full-cache heads are chosen among the full-attention layers alone, and sizes are counted per layer
type (`kv_bytes`, `native_kv_bytes`).

    out = generate(model, tok, ids, technique=HeadKVConfig(full={(5, 3), (6, 1)}, sink=16, window=128))
    with head_kv(model, config) as kv:                  # or by hand / with transformers' generate
        out = kv.generate(**inputs, max_new_tokens=20)   # chunked prefill, then decoding
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from attnkit.core.decode import cache_kwarg
from attnkit.core.family import architecture
from attnkit.core.generate import Session
from attnkit.core.hook import KV_PREFIX, SWAPS, base_function, own_attention
from attnkit.errors import AttnkitError

SUPPORTED_BASES = ("sdpa", "eager")
KV_LAYER_KWARG = "attnkit_kv_layer"  # the keyword under which update() hands its layer to attention
FULL_SLACK = 256  # tokens allocated ahead for the full heads (one buffer copy per 256 decode steps)


class HeadKVLayer(CacheLayerMixin):
    """One layer's cache; see the module docstring. Tensors are [batch, heads, tokens, head_dim]."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, kv_heads: int, full: list[int], sink: int, window: int,
                 compensate: bool = False, full_prefill: bool = False, budgets: dict[int, int] | None = None,
                 select_window: int = 64, select_kernel: int = 5):
        self.layer_idx, self.sink, self.window = layer_idx, sink, window
        self.compensate, self.full_prefill = compensate, full_prefill
        self.full = sorted(full)
        self.windowed = [h for h in range(kv_heads) if h not in set(full)]
        self.kv_heads = kv_heads
        self.budgets = dict(budgets or {})  # KV head -> middle tokens it keeps (token budgets)
        self.select_window, self.select_kernel = select_window, select_kernel
        # full prefill: nothing leaves until the prompt ends (every head reads the whole prompt, whatever
        # the chunks); then `end_prefill` chooses the budgets' middle tokens and trims the window heads
        self.holding = full_prefill
        self.choosing = full_prefill and any(self.budgets.get(h, 0) > 0 for h in self.windowed)
        self.mid = {}  # window index -> (keys [b, 1, slots, d], values, positions [b, slots]; -1: empty slot)
        self._mid_plan = None  # what decoding needs of `mid`, worked out once per change of it (_mid_layout)
        self._obs = None  # while choosing: (queries [b, window heads x group, <= select_window, d], their positions, scale)
        self._real = None  # while holding: [b, seen] which positions are real tokens
        self.seen = 0  # tokens this layer has been given, padding included (cache coordinates)
        self.keys = self.values = None  # full heads
        self.win_keys = self.win_values = None
        self.win_pos = self.win_sink = None  # [batch, kept]: position and sink flag of each kept window key
        self.valid_count = None  # [batch] real tokens seen so far (to find the sink)
        self.comp_keys = self.comp_values = None  # [batch, window heads, 1, dim]: sums of dropped keys, values
        self.comp_count = None  # [batch] keys dropped so far
        self.pending = None
        self._full_buf = None  # (key buffer, value buffer, the views handed out) for in-place appends
        self._query_index = None  # (full, window) query-head indices, built at the first attention
        self._ring = None  # steady decoding: next window slot to overwrite (see _decode_steady), else None
        self._steady_refused = False  # the store did not have the steady layout once: never try again
        self.is_initialized = False

    # --- the Cache layer protocol -----------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, _, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        new = lambda n: key_states.new_zeros(b, n, 0, d)  # noqa: E731
        self.keys, self.values = new(len(self.full)), new(len(self.full))
        self.win_keys, self.win_values = new(len(self.windowed)), new(len(self.windowed))
        self.win_pos = torch.zeros(b, 0, dtype=torch.long, device=self.device)
        self.win_sink = torch.zeros(b, 0, dtype=torch.bool, device=self.device)
        self.valid_count = torch.zeros(b, dtype=torch.long, device=self.device)
        self.comp_keys, self.comp_values = new(len(self.windowed)), new(len(self.windowed))
        if self.compensate:
            self.comp_keys = key_states.new_zeros(b, len(self.windowed), 1, d)
            self.comp_values = key_states.new_zeros(b, len(self.windowed), 1, d)
        self.comp_count = torch.zeros(b, dtype=torch.long, device=self.device)
        self._full_idx = torch.tensor(self.full, dtype=torch.long, device=self.device)
        self._win_idx = torch.tensor(self.windowed, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:
            raise AttnkitError("the retrieval-head KV cache was updated twice without attention in between: "
                               "run the model inside attnkit's head_kv(...)")
        q = key_states.shape[2]
        if self.full:
            self._append_full(key_states.index_select(1, self._full_idx), value_states.index_select(1, self._full_idx))
        if self.windowed:
            b = key_states.shape[0]
            new_pos = torch.arange(self.seen, self.seen + q, device=self.device).expand(b, q)
            self.pending = (torch.cat([self.win_keys, key_states.index_select(1, self._win_idx)], dim=2),
                            torch.cat([self.win_values, value_states.index_select(1, self._win_idx)], dim=2),
                            torch.cat([self.win_pos, new_pos], dim=1), q)
        else:
            self.pending = ()
        self.seen += q
        return self.keys, self.values

    def _append_full(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append to the full heads in place: `keys`/`values` are views of buffers allocated with
        FULL_SLACK tokens to spare, so a decode step writes one token instead of copying the whole
        cache (transformers' DynamicCache concatenates, copying every key each step). A store that
        was replaced (padding, row selection, trimming) is copied into a fresh buffer first."""
        n, q = self.keys.shape[2], keys.shape[2]
        buf = self._full_buf
        if buf is None or buf[2] is not self.keys or buf[3] is not self.values or n + q > buf[0].shape[2]:
            b, h, _, d = self.keys.shape
            kb = self.keys.new_empty(b, h, n + q + FULL_SLACK, d)
            vb = self.values.new_empty(b, h, n + q + FULL_SLACK, self.values.shape[3])
            kb[:, :, :n], vb[:, :, :n] = self.keys, self.values
        else:
            kb, vb = buf[0], buf[1]
        kb[:, :, n:n + q], vb[:, :, n:n + q] = keys, values
        self.keys, self.values = kb[:, :, :n + q], vb[:, :, :n + q]
        self._full_buf = (kb, vb, self.keys, self.values)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0  # the model's mask covers every position; window heads gather from it

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.kv_heads, self.full, self.sink, self.window, self.compensate,
                      self.full_prefill, self.budgets, self.select_window, self.select_kernel)

    def crop(self, tokens_to_remove: int) -> None:
        raise AttnkitError("the retrieval-head KV cache cannot be cropped (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx) -> None:
        raise AttnkitError("the retrieval-head KV cache does not support beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise AttnkitError("the retrieval-head KV cache does not support num_return_sequences > 1 or beams")

    def batch_select_indices(self, indices) -> None:
        self.select_rows(indices)

    # --- rows (continuous batching, see core/batching.py); a window slot at position -1 is empty --
    def _rows_ready(self) -> None:
        if self.holding and self.seen > 0:
            raise AttnkitError("rows of a fully prefilled cache can be joined, selected or trimmed only "
                               "after its prompt ended (end_prefill)")

    @property
    def mid(self) -> dict:
        return self._mid

    @mid.setter
    def mid(self, value: dict) -> None:
        self._mid, self._mid_plan = value, None

    def _mid_layout(self, group: int, device):
        """(query heads, KV heads) of the window heads without kept tokens, and per head with kept
        tokens whether every slot is filled: index tensors and a host sync done once per change of
        `mid`, not once per decoding step."""
        if self._mid_plan is None or self._mid_plan[0] != device:
            plain = [i for i in range(len(self.windowed)) if i not in self._mid]
            idx = (query_heads(plain, group, device), torch.tensor(plain, dtype=torch.long, device=device)) \
                if plain else None
            self._mid_plan = (device, idx, {i: bool((p >= 0).all()) for i, (_, _, p) in self._mid.items()})
        return self._mid_plan[1], self._mid_plan[2]

    def _shift_mid(self, fn) -> None:
        self.mid = {i: (k, v, fn(p)) for i, (k, v, p) in self.mid.items()}

    def pad_left(self, n: int) -> None:
        """n more positions of padding before every row's tokens."""
        self._rows_ready()
        pad = lambda t: torch.cat([t.new_zeros(*t.shape[:2], n, t.shape[3]), t], dim=2)  # noqa: E731
        if self.full:  # a layer without full heads keeps an empty [batch, 0, 0, dim] store
            self.keys, self.values = pad(self.keys), pad(self.values)
        self.win_pos = torch.where(self.win_pos >= 0, self.win_pos + n, -1)
        self._shift_mid(lambda p: torch.where(p >= 0, p + n, -1))
        self.seen += n
        self._ring = None

    def concat(self, other: "HeadKVLayer") -> None:
        """Append the rows of `other` (same length); the shorter window store is padded with empty slots."""
        if other.seen != self.seen:
            raise AttnkitError("only caches of the same length can be joined (pad_left first)")
        self._rows_ready()
        other._rows_ready()
        width = max(self.win_pos.shape[1], other.win_pos.shape[1])

        def widen(layer):
            n = width - layer.win_pos.shape[1]
            if n == 0:
                return layer.win_keys, layer.win_values, layer.win_pos, layer.win_sink
            k = layer.win_keys
            empty = k.new_zeros(k.shape[0], k.shape[1], n, k.shape[3])
            return (torch.cat([empty, k], 2), torch.cat([empty, layer.win_values], 2),
                    torch.cat([layer.win_pos.new_full((k.shape[0], n), -1), layer.win_pos], 1),
                    torch.cat([layer.win_sink.new_zeros(k.shape[0], n), layer.win_sink], 1))

        mine, theirs = widen(self), widen(other)
        self.win_keys, self.win_values, self.win_pos, self.win_sink = (torch.cat([a, b]) for a, b in zip(mine, theirs))
        self.keys, self.values = torch.cat([self.keys, other.keys]), torch.cat([self.values, other.values])
        self.valid_count = torch.cat([self.valid_count, other.valid_count])
        self.comp_keys, self.comp_values = torch.cat([self.comp_keys, other.comp_keys]), torch.cat([self.comp_values, other.comp_values])
        self.comp_count = torch.cat([self.comp_count, other.comp_count])
        self.mid = {i: _join_slots(self.mid.get(i), other.mid.get(i)) for i in self.mid.keys() | other.mid.keys()}
        self._ring = None

    def select_rows(self, rows) -> None:
        self._rows_ready()
        self.mid = {i: (k[rows], v[rows], p[rows]) for i, (k, v, p) in self.mid.items()}
        self.keys, self.values = self.keys[rows], self.values[rows]
        self.win_keys, self.win_values = self.win_keys[rows], self.win_values[rows]
        self.win_pos, self.win_sink, self.valid_count = self.win_pos[rows], self.win_sink[rows], self.valid_count[rows]
        self.comp_keys, self.comp_values, self.comp_count = self.comp_keys[rows], self.comp_values[rows], self.comp_count[rows]

    def trim_left(self, k: int) -> None:
        """Drop the first k positions, padding in every row."""
        self._rows_ready()
        self._shift_mid(lambda p: torch.where(p >= k, p - k, -1))
        if self.full:
            self.keys, self.values = self.keys[:, :, k:], self.values[:, :, k:]
        self.win_pos = torch.where(self.win_pos >= k, self.win_pos - k, -1)
        self.seen -= k
        self._ring = None

    def offload(self):
        pass

    def prefetch(self):
        pass

    # --- attention ------------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        """Bytes of the keys and values held (the full heads' spare FULL_SLACK tokens not counted)."""
        tensors = [self.keys, self.values, self.win_keys, self.win_values, self.comp_keys, self.comp_values]
        tensors += [t for k, v, _ in self.mid.values() for t in (k, v)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def attend(self, module, base_fn, query, keys, values, attention_mask, kwargs, additive: bool = False):
        """Outputs [batch, q, heads, head_dim] in the model's head order."""
        b, n_heads, q, d = query.shape
        group = n_heads // self.kv_heads  # query heads per KV head (transformers' repeat_kv order)
        pending, self.pending = self.pending, None
        if not self.windowed:
            return base_fn(module, query, keys, values, attention_mask, **kwargs)
        if self._query_index is None or self._query_index[1].device != query.device:
            self._query_index = (query_heads(self.full, group, query.device),
                                 query_heads(self.windowed, group, query.device))
        full_heads, window_heads = self._query_index
        out = query.new_empty(b, q, n_heads, d)
        if self.full:
            full_out, _ = base_fn(module, query.index_select(1, full_heads), keys, values, attention_mask, **kwargs)
            out[:, :, full_heads] = full_out
        cand_k, cand_v, cand_pos, new = pending
        if q == 1 and attention_mask is None and not self.holding and self._decode_steady():
            out[:, :, window_heads] = self._window_attention(module, base_fn, query.index_select(1, window_heads),
                                                             cand_k, cand_v, None, kwargs, additive)
            slot = self.sink + self._ring  # the oldest recent key: the next query's window has left it
            self.win_keys[:, :, slot] = cand_k[:, :, -1]
            self.win_values[:, :, slot] = cand_v[:, :, -1]
            self.win_pos[:, slot] = self.seen - 1
            self.valid_count = self.valid_count + 1
            self._ring = (self._ring + 1) % (self.window - 1)
            return out, None
        self._ring = None
        # a full prefill's chunks (nothing has left yet): the window heads read the model's own keys under
        # its own mask, so its attention runs as it is (its fast causal path); the compensation token is empty
        prompt_reads_all = self.holding or (self.full_prefill and q > 1)  # a one-token last chunk is prompt too
        fast = prompt_reads_all and cand_pos.shape[1] == self.seen and not self.mid
        if fast:
            last_row = attention_mask[:, :, -1:] if attention_mask is not None else None
            allowed_model = None
            real = _allowed(last_row, cand_pos, self.seen - 1, 1)[:, 0, -1]  # [b, cand]: not padding
        else:
            allowed_model = _allowed(attention_mask, cand_pos, self.seen - q, q)  # [b, 1, q, cand]
            real = allowed_model[:, 0, -1]  # the last query sees every real key before it
        new_valid = real[:, -new:]
        rank = self.valid_count[:, None] + new_valid.long().cumsum(-1) - 1
        cand_sink = torch.cat([self.win_sink, new_valid & (rank < self.sink)], dim=1)
        self.valid_count = self.valid_count + new_valid.sum(-1)
        if self.holding:  # which kept positions are real tokens, for the trim at the prompt's end
            self._real = new_valid if self._real is None else torch.cat([self._real, new_valid], dim=1)
        if self.choosing:
            self._observe(query.index_select(1, window_heads), kwargs.get("scaling") or d ** -0.5)
        if fast:
            win_out, _ = base_fn(module, query.index_select(1, window_heads), cand_k, cand_v, attention_mask, **kwargs)
            out[:, :, window_heads] = win_out
            self._keep(cand_k, cand_v, cand_pos, cand_sink, real)
            return out, None
        q_pos = torch.arange(self.seen - q, self.seen, device=query.device)
        recent = cand_pos[:, None, None, :] > (q_pos[None, None, :, None] - self.window)
        if prompt_reads_all:  # a prompt chunk after end_prefill (a question given later) reads every key still kept
            allowed = allowed_model
        else:
            allowed = allowed_model & (recent | cand_sink[:, None, None, :])
        keys_in, values_in = cand_k, cand_v
        if self.compensate:  # one more key: the mean of the dropped ones, weighted by how many they were
            n = self.comp_count.clamp_min(1)[:, None, None, None].to(cand_k.dtype)
            keys_in = torch.cat([cand_k, self.comp_keys / n], dim=2)
            values_in = torch.cat([cand_v, self.comp_values / n], dim=2)
            low = torch.finfo(query.dtype).min
            mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(~allowed, low)
            bias = torch.where(self.comp_count > 0, self.comp_count.clamp_min(1).to(query.dtype).log(),
                               torch.full_like(self.comp_count, low, dtype=query.dtype))
            mask = torch.cat([mask, bias[:, None, None, None].expand(-1, 1, q, 1)], dim=-1)
        else:
            mask = allowed if not additive else torch.zeros(allowed.shape, dtype=query.dtype, device=query.device) \
                .masked_fill(~allowed, torch.finfo(query.dtype).min)
        out[:, :, window_heads] = self._window_attention(module, base_fn, query.index_select(1, window_heads),
                                                         keys_in, values_in, mask, {**kwargs, "is_causal": False},
                                                         additive)
        self._keep(cand_k, cand_v, cand_pos, cand_sink, real)
        return out, None

    def _window_attention(self, module, base_fn, query, keys, values, mask, kwargs, additive: bool):
        """The window heads' outputs [batch, q, window query heads, dim]: query [batch, window query
        heads, q, dim] over the window store's `keys`/`values` [batch, window heads, n, dim] under
        `mask` (None, bool or additive [batch, 1, q, n]); a head with a token budget also reads its
        kept middle tokens (one attention call per such head, its empty slots masked)."""
        if not self.mid:
            return base_fn(module, query, keys, values, mask, **kwargs)[0]
        b, heads, q, d = query.shape
        group = heads // len(self.windowed)
        out = query.new_empty(b, q, heads, d)
        plain, filled_all = self._mid_layout(group, query.device)
        if plain is not None:
            q_idx, kv_idx = plain
            out[:, :, q_idx] = base_fn(module, query.index_select(1, q_idx), keys.index_select(1, kv_idx),
                                       values.index_select(1, kv_idx), mask, **kwargs)[0]
        low = torch.finfo(query.dtype).min
        for i, (mid_k, mid_v, mid_pos) in self.mid.items():
            if mask is None and filled_all[i]:
                m = None
            else:
                filled = (mid_pos >= 0)[:, None, None, :].expand(b, 1, q, -1)  # [b, 1, q, slots]
                m = mask if mask is not None else torch.ones(b, 1, q, keys.shape[2], dtype=torch.bool,
                                                             device=query.device)
                m = m.expand(b, 1, q, -1)
                if m.dtype == torch.bool:
                    m = torch.cat([m, filled], dim=-1)
                    if additive:
                        m = torch.zeros(m.shape, dtype=query.dtype, device=query.device).masked_fill(~m, low)
                else:
                    m = torch.cat([m, torch.zeros(filled.shape, dtype=m.dtype, device=m.device).masked_fill(~filled, low)], -1)
            heads_i = slice(i * group, (i + 1) * group)
            out[:, :, heads_i] = base_fn(module, query[:, heads_i], torch.cat([keys[:, i:i + 1], mid_k], 2),
                                         torch.cat([values[:, i:i + 1], mid_v], 2), m, **kwargs)[0]
        return out

    def _observe(self, window_queries: torch.Tensor, scale: float) -> None:
        """While the prompt runs (token budgets): keep its last `select_window` queries of the window
        heads [b, window heads x group, <= select_window, dim] with their positions."""
        q = window_queries.shape[2]
        pos = torch.arange(self.seen - q, self.seen, device=window_queries.device)
        if self._obs is not None:
            window_queries = torch.cat([self._obs[0], window_queries], dim=2)
            pos = torch.cat([self._obs[1], pos])
        keep = self.select_window
        self._obs = (window_queries[:, :, -keep:], pos[-keep:], scale)

    def end_prefill(self) -> None:
        """The prompt has ended: each head with a token budget keeps the middle tokens (real, neither
        sink nor in the window) that the prompt's last `select_window` queries attended most, their
        attention averaged over those queries and the KV head's query heads and pooled over
        `select_kernel` neighbouring positions (SnapKV); then the window store is trimmed as usual.
        A head keeps min(budget, most middle tokens of any row) slots; a row with fewer leaves the
        rest empty. Query-aware when the question is in the prompt, query-agnostic when it comes after."""
        if not self.holding:
            return
        self.holding = False
        if self.win_pos is None:  # nothing was prefilled
            return
        if not self.choosing or self._obs is None:
            real, self._real = self._real, None
            self._keep(self.win_keys, self.win_values, self.win_pos, self.win_sink, real)
            return
        self.choosing = False
        queries, q_pos, scale = self._obs
        keys, values, pos, real = self.win_keys, self.win_values, self.win_pos, self._real  # every prompt position
        self._obs = self._real = None
        b, nw, n, d = keys.shape
        group = queries.shape[1] // nw
        w = queries.shape[2]
        logits = torch.einsum("bhgqd,bhnd->bhgqn", queries.float().view(b, nw, group, w, d), keys.float()) * scale
        q_real = real[:, -w:]  # [b, w]: padding queries (rows shorter than the window) do not vote
        allowed = (pos[:, None, :] <= q_pos[None, :, None]) & real[:, None, :]  # [b, w, n]
        probs = logits.masked_fill(~allowed[:, None, None], float("-inf")).softmax(-1).nan_to_num(0.0)
        votes = (probs * q_real[:, None, None, :, None]).sum(3).mean(2) / q_real.sum(-1).clamp_min(1)[:, None, None]
        k = self.select_kernel
        pooled = torch.nn.functional.avg_pool1d(votes, k, stride=1, padding=k // 2) if k > 1 else votes  # [b, nw, n]
        middle = real & ~self.win_sink & (pos <= self.seen - self.window)  # [b, n]
        most = int(middle.sum(-1).max()) if n else 0
        kept = {}
        for i, head in enumerate(self.windowed):
            if self.budgets.get(head, 0) == 0:
                continue
            slots = min(self.budgets[head], most)
            score = pooled[:, i].masked_fill(~middle, float("-inf"))
            idx = score.topk(slots, dim=-1).indices.sort(-1).values  # [b, slots]
            ok = middle.gather(1, idx)
            gather = idx[:, None, :, None].expand(-1, 1, -1, d)
            kept[i] = (keys[:, i:i + 1].gather(2, gather), values[:, i:i + 1].gather(2, gather),
                       torch.where(ok, pos.gather(1, idx), -1))
        self.mid = kept
        self._keep(keys, values, pos, self.win_sink, real)

    def kept_middle(self) -> dict[int, list[list[int]]]:
        """{KV head: per row, the positions of the middle tokens it keeps} (token budgets)."""
        return {self.windowed[i]: [[int(x) for x in row if x >= 0] for row in p] for i, (_, _, p) in self.mid.items()}

    def _decode_steady(self) -> bool:
        """Whether this one-token step (no padding: the model passed no mask) can skip the generic
        mask and trim. In steady decoding the window store holds `sink` sink keys and exactly the last
        window - 1 positions, so the new query sees every stored key and the trim drops only the
        oldest recent one: the new key takes its slot (a ring over the recent slots; keys carry their
        RoPE positions, so their order does not matter). The layout is checked once, when decoding
        reaches it; batching operations, masks and the compensation token go the generic way."""
        if self._ring is not None:
            return True
        kept, t = self.sink + self.window - 1, self.seen - 1  # t: the new token's position
        if self.compensate or self._steady_refused or self.window < 2 or self.win_pos.shape[1] != kept \
                or t - self.window + 1 < self.sink:
            return False
        recent = torch.arange(t - self.window + 1, t, device=self.win_pos.device)
        steady = bool(self.win_sink[:, :self.sink].all() and not self.win_sink[:, self.sink:].any()
                      and (self.win_pos[:, :self.sink] >= 0).all() and (self.win_pos[:, self.sink:] == recent).all())
        if steady:
            self._ring = 0
        else:
            self._steady_refused = True
        return steady

    def _keep(self, keys, values, pos, sink, real) -> None:
        """Trim the window heads to what later queries can see: the sink and the last window - 1 keys
        (the next query itself completes its window). Rows whose sink lies inside the window fill the
        spare slots with older keys, which the window rule masks. With `compensate`, the real keys
        (`real`, [batch, keys]: not padding) that leave join the compensation sums."""
        kept = self.sink + self.window - 1
        if pos.shape[1] <= kept or self.holding:  # full prefill: nothing leaves before the prompt ends
            self.win_keys, self.win_values, self.win_pos, self.win_sink = keys, values, pos, sink
            return
        keep = sink | (pos > self.seen - self.window)
        order = torch.arange(pos.shape[1], device=pos.device)
        idx = (keep.long() * pos.shape[1] + order).topk(kept, dim=-1).indices.sort(-1).values  # [b, kept]
        if self.compensate:
            dropped = real.clone()
            dropped.scatter_(1, idx, False)  # [b, keys]
            weight = dropped[:, None, :, None].to(keys.dtype)
            self.comp_keys = self.comp_keys + (keys * weight).sum(2, keepdim=True)
            self.comp_values = self.comp_values + (values * weight).sum(2, keepdim=True)
            self.comp_count = self.comp_count + dropped.sum(-1)
        gather = idx[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        self.win_keys, self.win_values = keys.gather(2, gather), values.gather(2, gather)
        self.win_pos = pos.gather(1, idx)
        self.win_sink = sink.gather(1, idx)


def _join_slots(a, b):
    """Kept middle tokens of two row sets (keys, values, positions), the narrower widened with empty slots."""
    if a is None or b is None:
        raise AttnkitError("caches with different token budgets cannot be joined")
    width = max(a[2].shape[1], b[2].shape[1])

    def widen(t):
        k, v, p = t
        n = width - p.shape[1]
        if n == 0:
            return k, v, p
        z = k.new_zeros(k.shape[0], 1, n, k.shape[3])
        return torch.cat([k, z], 2), torch.cat([v, z], 2), torch.cat([p, p.new_full((p.shape[0], n), -1)], 1)

    a, b = widen(a), widen(b)
    return tuple(torch.cat([x, y]) for x, y in zip(a, b))


def query_heads(kv_heads: list[int], group: int, device) -> torch.Tensor:
    return torch.tensor([h * group + i for h in kv_heads for i in range(group)], dtype=torch.long, device=device)


def _allowed(attention_mask, positions: torch.Tensor, first_query: int, q: int) -> torch.Tensor:
    """What the model's own mask allows, [batch, 1, q, keys] (bool), at the given key positions (an
    empty slot, position -1, never)."""
    filled = (positions >= 0)[:, None, None, :]
    if attention_mask is None:  # no padding: plain causal
        q_pos = torch.arange(first_query, first_query + q, device=positions.device)
        return (positions[:, None, None, :] <= q_pos[None, None, :, None]) & filled
    m = attention_mask[:, :1]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    index = positions.clamp_min(0)[:, None, None, :].expand(m.shape[0], 1, m.shape[2], -1)
    return m.gather(3, index) & filled


class HeadKVCache(Cache):
    """A transformers `Cache` of `HeadKVLayer`s; usable only where `head_kv(model, ...)` is active."""

    def __init__(self, model, config):  # config: a kvconfig.HeadKVConfig (kvconfig imports this module)
        from transformers.cache_utils import DynamicSlidingWindowLayer

        arch = architecture(model.config)
        config.check(arch)
        self._model_config = model.config
        layers = [DynamicSlidingWindowLayer(sliding_window=arch.windows[i]) if kind == "sliding" else
                  HeadKVLayer(i, arch.kv_heads, [h for l, h in config.full if l == i], config.sink, config.window,
                              config.compensate, config.prefill == "full",
                              {h: n for (l, h), n in config.budgets if l == i}, config.select_window,
                              config.select_kernel)
                  for i, kind in enumerate(arch.layer_types)]
        super().__init__(layers=layers)

    def update(self, key_states, value_states, layer_idx, *args, kwargs: dict | None = None, **_):
        if not self._model_config._attn_implementation.startswith(KV_PREFIX):
            raise AttnkitError("this KV cache works only inside attnkit's head_kv(model, ...) block")
        layer = self.layers[layer_idx]
        if isinstance(layer, HeadKVLayer):
            if kwargs is None:
                raise AttnkitError("this model's attention does not pass its keyword arguments to the cache "
                                   "(cache.update(..., kwargs=kwargs)), which the retrieval-head KV cache needs")
            kwargs[KV_LAYER_KWARG] = layer
        return layer.update(key_states, value_states)

    def end_prefill(self) -> None:
        """The prompt has ended (`core.generate.prefill` says so): heads with token budgets choose their
        middle tokens now (a later prompt chunk, e.g. a question given after compression, then reads them)."""
        for layer in self.layers:
            if isinstance(layer, HeadKVLayer):
                layer.end_prefill()

    def kv_bytes(self) -> int:
        """Bytes of keys and values held now."""
        return sum(layer.kv_bytes() if isinstance(layer, HeadKVLayer) else
                   sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
                   for layer in self.layers)


def _make_attention(base: str):
    functions: dict[type, object] = {}  # the base attention, resolved once per module class

    def attention(module, query, key, value, attention_mask, **kwargs):
        layer = kwargs.pop(KV_LAYER_KWARG, None)
        fn = functions.get(type(module))
        if fn is None:
            fn = functions[type(module)] = base_function(base, module)
        if layer is None:  # a plain cache (or none): the model's own attention
            return fn(module, query, key, value, attention_mask, **kwargs)
        if layer.layer_idx != module.layer_idx:
            raise AttnkitError(f"KV cache layer {layer.layer_idx} reached attention of layer {module.layer_idx}")
        return layer.attend(module, fn, query, key, value, attention_mask, kwargs, additive=base == "eager")

    return attention


def register(base: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base not in SUPPORTED_BASES:
        raise AttnkitError(f"the retrieval-head KV cache supports attention implementations "
                           f"{', '.join(SUPPORTED_BASES)}, not '{base}' (load the model with attn_implementation='sdpa')")
    name = KV_PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, _make_attention(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


class HeadKV(Session):
    """What `head_kv` yields: the session of `core.generate` for this cache (a fresh `HeadKVCache` per
    generation, prefill in chunks), plus prefill and `model.generate` by hand."""

    def __init__(self, model, config):  # config: a kvconfig.HeadKVConfig (kvconfig imports this module)
        super().__init__(model)
        self.config, self.prefill_chunk = config, config.prefill_chunk

    def new_cache(self):
        return HeadKVCache(self.model, self.config)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None, **forward):
        """Run the prompt through the model in chunks of `prefill_chunk` tokens; returns (last output, cache)."""
        from attnkit.core.generate import prefill

        cache = cache if cache is not None else self.new_cache()
        return prefill(self.model, input_ids, attention_mask, cache, self.prefill_chunk, **forward), cache

    def generate(self, **kwargs):
        """`model.generate` with a fresh cache of this kind and chunked prefill (window prefill only:
        transformers' loop does not tell the cache where the prompt ends, which a full prefill needs)."""
        if self.config.prefill == "full":
            raise AttnkitError("a full prefill trims the cache when the prompt ends, which model.generate does not "
                               "say: use attnkit.core.generate.generate (or session.prefill, then decode)")
        kwargs.setdefault("prefill_chunk_size", self.config.prefill_chunk)
        return self.model.generate(**cache_kwarg(self.model, self.new_cache()), **kwargs)


@contextmanager
def head_kv(model, config):  # config: a kvconfig.HeadKVConfig (kvconfig imports this module)
    """Inside the block the model's attention understands `HeadKVCache`; other caches work as before."""
    base = own_attention(model, SWAPS[KV_PREFIX])
    name = register(base)
    config.check(architecture(model.config))
    model.set_attn_implementation(name)
    try:
        yield HeadKV(model, config)
    finally:
        model.set_attn_implementation(base)
