"""One layer of the retrieval-head KV cache: where its keys live and how they leave.

Per layer, each KV head is `full` (keeps every key, in buffers allocated `FULL_SLACK` tokens ahead) or
`window` (keeps the first `sink` real tokens and the last `window` tokens, in one store shared by all
window heads: keys, values, their positions and sink flags). `HeadKVLayer.update` appends to the full
heads and leaves the window heads' candidate keys `pending` for the attention function
(`kvcache/attention.py`), which attends and then calls `_keep` to trim them back. A one-token decoding
step without padding takes a shortcut (`_decode_steady`: a ring over the recent slots).

The row methods (`pad_left`, `concat`, `select_rows`, `trim_left`) let `core/batching.py` join and
leave rows between steps, as it does with transformers' own layers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from attnkit.errors import AttnkitError
from attnkit.kvcache.attention import WindowAttention
from attnkit.kvcache.select import TokenSelection, join_slots

FULL_SLACK = 256  # tokens allocated ahead for the full heads (one buffer copy per 256 decode steps)


class HeadKVLayer(WindowAttention, TokenSelection, CacheLayerMixin):
    """One layer's cache: its stores, the Cache layer protocol, the batching methods and the trim.
    Attention (`WindowAttention`) and token budgets (`TokenSelection`) come from their own modules.
    Tensors are [batch, heads, tokens, head_dim]."""

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
        self.ends_at = 0  # > 0: the prompt ends at this many tokens, so this layer ends its prefill right after
        # its attention reads them (the next layer's forward does not need it: memory is freed layer by layer)
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
        self.mid = {i: join_slots(self.mid.get(i), other.mid.get(i)) for i in self.mid.keys() | other.mid.keys()}
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

    # --- size and trimming --------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        """Bytes of the keys and values held (the full heads' spare FULL_SLACK tokens not counted)."""
        tensors = [self.keys, self.values, self.win_keys, self.win_values, self.comp_keys, self.comp_values]
        tensors += [t for k, v, _ in self.mid.values() for t in (k, v)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def pending_bytes(self) -> int:
        """Bytes of the window heads' candidate keys and values that `update` left for the attention."""
        return sum(t.numel() * t.element_size() for t in (self.pending or ())[:2])

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
