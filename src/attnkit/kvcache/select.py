"""Token budgets: the middle tokens a window head keeps besides its sink and window (HeadKV / SnapKV).

While a fully prefilled prompt runs, the window heads' last `select_window` queries are kept
(`_observe`); when the prompt ends (`end_prefill`) each head with a budget keeps the middle tokens those
queries attended most, averaged over the queries and the KV head's query heads and pooled over
`select_kernel` neighbouring positions. The kept tokens live in a store per head (`mid`: keys, values,
positions; -1 marks an empty slot), which later queries of that head read beside the window store.
Query-aware when the question is in the prompt, query-agnostic when it is given after the prompt ended.

`TokenSelection` is a mixin of `kvcache.layer.HeadKVLayer`; it reads the layer's stores.
"""

from __future__ import annotations

import torch

from attnkit.errors import AttnkitError
from attnkit.kvcache.attention import query_heads


class TokenSelection:
    """The token-budget half of a `HeadKVLayer` (see the module docstring)."""

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
        self.holding, self.ends_at = False, 0
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


def join_slots(a, b):
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
