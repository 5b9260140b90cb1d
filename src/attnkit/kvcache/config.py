"""What the retrieval-head KV cache keeps, and its size: a torch-free record, so that the command line
takes its defaults from here (`KV_DEFAULTS`) without importing torch. The cache itself is
`attnkit.kvcache.cache`."""

from __future__ import annotations

from dataclasses import dataclass, field

from attnkit.core.family import Architecture
from attnkit.errors import AttnkitError


@dataclass(frozen=True)
class HeadKVConfig:
    """Which KV heads keep the full cache, and what the others keep."""

    full: frozenset = field(default_factory=frozenset)  # (layer, kv_head) pairs with the full cache
    sink: int = 16  # first real tokens every window head keeps
    window: int = 128  # most recent tokens every window head keeps (the query's own included)
    prefill_chunk: int = 2048  # prompt tokens per forward; window heads are trimmed after each
    compensate: bool = False  # window heads also keep one compensation token (RazorAttention), see kvcache
    prefill: str = "window"  # window: window heads see sink + window in prefill too (DuoAttention);
    # full: every head reads the whole prompt (in any chunks), the cache is trimmed when it ends (RazorAttention, kvpress)
    budgets: tuple = ()  # ((layer, kv_head), tokens): middle tokens a window head keeps besides sink + window,
    # chosen once at the end of prefill by the attention of the prompt's last tokens (HeadKV / SnapKV)
    select_window: int = 64  # the prompt's last tokens whose attention chooses them (SnapKV's observation window)
    select_kernel: int = 5  # average pooling of those scores over neighbouring positions (SnapKV's kernel)
    memory: float = 0.0  # > 0: a memory target, the fraction of the model's own cache kept at each prompt's
    # length; the full heads and token budgets are then chosen per prompt when it ends (`resolve`)
    memory_full: float = 0.5  # the share of that target spent on full heads (the rest: token budgets)
    importance: tuple = ()  # ((layer, kv_head), score) of every choosable KV head: what `resolve` ranks

    def __post_init__(self):
        object.__setattr__(self, "full", frozenset((int(l), int(h)) for l, h in self.full))
        if self.sink < 0:
            raise AttnkitError(f"sink must be >= 0, got {self.sink}")
        if self.window < 1:
            raise AttnkitError(f"window must be >= 1, got {self.window}")
        if self.prefill_chunk < 1:
            raise AttnkitError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.prefill not in ("window", "full"):
            raise AttnkitError(f"prefill must be 'window' or 'full', not {self.prefill!r}")
        pairs = self.budgets.items() if isinstance(self.budgets, dict) else self.budgets
        budgets = tuple(sorted(((int(l), int(h)), int(n)) for (l, h), n in pairs if int(n) != 0))
        object.__setattr__(self, "budgets", budgets)
        if any(n < 0 for _, n in budgets):
            raise AttnkitError("token budgets must be >= 0")
        if budgets:
            both = sorted({k for k, _ in budgets} & self.full)
            if both:
                raise AttnkitError(f"KV heads {both} have the full cache and a token budget: give one or the other")
            if self.prefill != "full":
                raise AttnkitError("token budgets are chosen from the whole prompt: they need prefill 'full'")
            if self.compensate:
                raise AttnkitError("token budgets and the compensation token cannot be combined "
                                   "(the kept middle tokens would be counted twice)")
        if self.select_window < 1:
            raise AttnkitError(f"select_window must be >= 1, got {self.select_window}")
        if self.select_kernel < 1 or self.select_kernel % 2 == 0:
            raise AttnkitError(f"select_kernel must be an odd number >= 1, got {self.select_kernel}")
        object.__setattr__(self, "importance", tuple(((int(l), int(h)), float(v)) for (l, h), v in
                                                     (self.importance.items() if isinstance(self.importance, dict)
                                                      else self.importance)))
        if self.memory:
            if not 0 < self.memory <= 1:
                raise AttnkitError(f"the memory target is a fraction of the model's own cache in (0, 1], got {self.memory}")
            if not 0 <= self.memory_full <= 1:
                raise AttnkitError(f"memory_full is a share of the target in [0, 1], got {self.memory_full}")
            if self.prefill != "full" or self.compensate:
                raise AttnkitError("a memory target is met when the prompt ends: it needs prefill 'full' and no "
                                   "compensation token")
            if self.full or self.budgets:
                raise AttnkitError("a memory target chooses the full heads and token budgets itself: give it "
                                   "importance scores, not heads")
            if not self.importance:
                raise AttnkitError("a memory target ranks the KV heads by importance: it needs a score file "
                                   "(or a pulled model's shipped scores)")

    def resolve(self, arch: Architecture, tokens: int) -> "HeadKVConfig":
        """The concrete cache that meets the memory target at `tokens` tokens: the `memory_full` share of
        the target goes to the most important KV heads as full heads, the rest to the other heads as
        middle tokens shared by importance (each capped at the middle tokens the prompt has), so that
        the cache holds `memory` x the model's own cache, within one token per head (rounded down)."""
        from dataclasses import replace

        if not self.memory:
            return self
        native = native_kv_bytes(arch, tokens, bytes_per_value=1)
        per_token = 2 * arch.head_dim  # one KV head, one token, one byte per value
        heads = [k for k, _ in sorted(self.importance, key=lambda kv: (-kv[1], kv[0]))]
        fixed = native - len(heads) * tokens * per_token  # native sliding layers stay as they are
        target = self.memory * native - fixed  # bytes for the choosable heads
        kept = min(tokens, self.sink + self.window - 1)
        middle = max(0, tokens - kept)
        n_full = min(len(heads), max(0, int(self.memory_full * target / (tokens * per_token))))
        while n_full and n_full * tokens + (len(heads) - n_full) * kept > target / per_token:
            n_full -= 1  # the window heads' own sink + window must fit too
        full = heads[:n_full]
        rest = heads[n_full:]
        pool = int(target / per_token) - n_full * tokens - len(rest) * kept
        weights = dict(self.importance)
        budgets = share_tokens({h: max(0.0, weights[h]) for h in rest}, max(0, pool), cap=middle) if middle else {}
        return replace(self, full=frozenset(full), budgets=tuple(budgets.items()), memory=0.0, importance=())

    def budget_of(self) -> dict[tuple[int, int], int]:
        """{(layer, kv_head): middle tokens} of the heads with a token budget."""
        return dict(self.budgets)

    def check(self, arch: Architecture) -> None:
        for l, h in sorted(self.full | {k for k, _ in self.budgets}):
            arch.check_head(l, h, kv=True)
            if arch.layer_types[l] == "sliding":
                raise AttnkitError(f"full-cache or budget head {(l, h)} lies in a sliding-window layer (window "
                                   f"{arch.windows[l]}): its cache is the model's own window; choose heads of "
                                   f"the full-attention layers {arch.full_layers}")

    @property
    def shares_prefill(self) -> bool:
        """Whether its prefill is the model's own forward pass (a full prefill), so that one prefill of a
        prompt serves it, the full cache and every other such cache (`kvcache.fork`)."""
        return self.prefill == "full"

    @property
    def observed_queries(self) -> int:
        """How many of the prompt's last queries a shared prefill must keep for this cache: its token
        budgets (given, or chosen by a memory target) are chosen by them; 0 when it has none."""
        return self.select_window if self.budgets or self.memory else 0

    @staticmethod
    def prefill_once(model, input_ids, attention_mask=None, chunk: int | None = None, select_window: int = 64):
        """Run the prompt rows [rows, n] once (in chunks of `chunk` tokens, None: all at once), keeping
        what every cache that `shares_prefill` needs: each KV head's keys and values and the last
        `select_window` queries. Returns a `kvcache.fork.SharedPrefill`; its `start(model, technique)`
        gives each technique its cache."""
        from attnkit.core.family import architecture
        from attnkit.kvcache.fork import record_prefill

        recorder = HeadKVConfig(select_window=select_window, prefill_chunk=chunk or input_ids.shape[1])
        return record_prefill(model, input_ids, attention_mask, recorder.recording(architecture(model.config)), chunk)

    def recording(self, arch: Architecture) -> "HeadKVConfig":
        """These settings as a recording cache: every KV head of the full-attention layers windowed with a
        token budget and a full prefill, so each keeps every key and the last queries until the prompt
        ends (what `fork` shares and a memory target plans from)."""
        from dataclasses import replace

        every = tuple(((layer, h), 1) for layer in arch.full_layers for h in range(arch.kv_heads))
        return replace(self, full=frozenset(), budgets=every, prefill="full", compensate=False, memory=0.0,
                       importance=())

    def prepare(self, model):
        """This cache as a technique of `core.generate`: `head_kv(model, self)`; with a memory target,
        `kvcache.target.target_kv` (the plan resolved per prompt)."""
        if self.memory:
            from attnkit.kvcache.target import target_kv
            return target_kv(model, self)
        from attnkit.kvcache.cache import head_kv
        return head_kv(model, self)

    def describe(self) -> dict:
        if self.memory:
            return {"technique": "retrieval-head KV cache", "memory": self.memory, "memory_full": self.memory_full,
                    "sink": self.sink, "window": self.window, "prefill": self.prefill,
                    "select_window": self.select_window, "select_kernel": self.select_kernel}
        out = {"technique": "retrieval-head KV cache", "full_kv_heads": len(self.full), "sink": self.sink,
               "window": self.window, "compensate": self.compensate, "prefill": self.prefill}
        if self.budgets:
            out.update(budget_kv_heads=len(self.budgets), budget_tokens=sum(n for _, n in self.budgets),
                       select_window=self.select_window, select_kernel=self.select_kernel)
        return out

    def kv_bytes(self, arch: Architecture, tokens: int, batch: int = 1, bytes_per_value: int = 2) -> int:
        """What the cache holds after `tokens` tokens: keys and values of every KV head. A window head
        keeps sink + window - 1 tokens (all that a later query can see besides its own key), plus its
        compensation token when `compensate`, plus its token budget where the prompt had that many
        middle tokens (counted here against `tokens`: exact for a cache just prefilled with `tokens`
        prompt tokens, at most that later); a native sliding layer keeps its window - 1, as
        transformers' sliding layers do. With a memory target: the plan it resolves to at `tokens`."""
        if self.memory:
            return self.resolve(arch, tokens).kv_bytes(arch, tokens, batch, bytes_per_value)
        middle = max(0, tokens - (self.sink + self.window - 1))
        kept = 0
        for layer, kind in enumerate(arch.layer_types):
            if kind == "sliding":
                kept += arch.kv_heads * min(tokens, arch.windows[layer] - 1)
                continue
            n_full = sum(1 for l, _ in self.full if l == layer)
            window_kept = min(tokens, self.sink + self.window - 1) + int(self.compensate)
            kept += n_full * tokens + (arch.kv_heads - n_full) * window_kept
            kept += sum(min(n, middle) for (l, _), n in self.budgets if l == layer)
        return 2 * batch * arch.head_dim * bytes_per_value * kept


def native_kv_bytes(arch: Architecture, tokens: int, batch: int = 1, bytes_per_value: int = 2) -> int:
    """The model's own cache after `tokens` tokens: every token in full-attention layers, the window
    - 1 most recent in sliding layers (what transformers' DynamicCache keeps)."""
    kept = sum(arch.kv_heads * (tokens if kind == "full" else min(tokens, arch.windows[l] - 1))
               for l, kind in enumerate(arch.layer_types))
    return 2 * batch * arch.head_dim * bytes_per_value * kept


def share_tokens(weights: dict, pool: int, cap: int | None = None) -> dict:
    """{key: tokens}: `pool` tokens shared in proportion to `weights` (all zero: evenly), none above
    `cap` (what a capped key cannot take goes to the others); rounding gives the remainders to the
    largest fractional parts, so the total is exact (or every key is at its cap)."""
    keys = sorted(weights)
    if not keys or pool <= 0:
        return {}
    out = dict.fromkeys(keys, 0)
    left, open_ = pool, list(keys)
    while left > 0 and open_:
        w = {k: max(0.0, weights[k]) for k in open_}
        if sum(w.values()) <= 0:
            w = dict.fromkeys(open_, 1.0)
        total = sum(w.values())
        exact = {k: left * w[k] / total for k in open_}
        give = {k: int(x) for k, x in exact.items()}
        for k in sorted(open_, key=lambda k: (-(exact[k] - give[k]), k))[:left - sum(give.values())]:
            give[k] += 1
        room = {k: (cap - out[k]) if cap is not None else left for k in open_}
        taken = {k: min(give[k], room[k]) for k in open_}
        for k, n in taken.items():
            out[k] += n
        left -= sum(taken.values())
        open_ = [k for k in open_ if cap is None or out[k] < cap]
        if sum(taken.values()) == 0:
            break
    return {k: n for k, n in out.items() if n > 0}


FULL_FRACTION = 0.25  # the default share of KV heads that keep the full cache (the registry's `full`)
KV_DEFAULTS = HeadKVConfig()  # sink 16, window 128, prefill chunk 2048: every option's default
