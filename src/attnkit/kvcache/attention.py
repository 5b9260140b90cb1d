"""The retrieval-head KV cache's attention: full heads as the model attends, window heads within sink +
window (+ their kept middle tokens).

`attnkit_kv_<base>` is registered with transformers' `AttentionInterface` through `core.hook.swap`.
transformers' attention modules call `cache.update(..., kwargs=kwargs)` and then pass the same
`kwargs` to the attention function, so the cache puts its layer there (`KV_LAYER_KWARG`) and the
function takes it out: nothing is held between calls. `WindowAttention.attend` attends the full heads
with the model's own mask, the window heads with that mask gathered at the kept key positions and
restricted to sink + window, writes both into the model's head order, and then has the layer trim.
"""

from __future__ import annotations

import torch

from attnkit.errors import AttnkitError

SUPPORTED_BASES = ("sdpa", "eager")
KV_LAYER_KWARG = "attnkit_kv_layer"  # the keyword under which update() hands its layer to attention


class WindowAttention:
    """The attention half of a `HeadKVLayer` (see the module docstring)."""

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


def make_attention(base: str):
    """The function registered as `attnkit_kv_<base>`: the model's own attention for a plain cache,
    the layer's `attend` when the cache handed its layer over."""
    from attnkit.core.hook import base_function

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
        out = layer.attend(module, fn, query, key, value, attention_mask, kwargs, additive=base == "eager")
        if layer.ends_at and layer.holding and layer.seen >= layer.ends_at:
            layer.end_prefill()  # the prompt's last forward: this layer trims now, before the next one fills
        return out

    return attention
