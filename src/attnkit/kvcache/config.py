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

    @staticmethod
    def prefill_once(model, input_ids, attention_mask=None, chunk: int | None = None, select_window: int = 64):
        """Run the prompt rows [rows, n] once (in chunks of `chunk` tokens, None: all at once), keeping
        what every cache that `shares_prefill` needs: each KV head's keys and values and the last
        `select_window` queries. Returns a `kvcache.fork.SharedPrefill`; its `start(model, technique)`
        gives each technique its cache."""
        from attnkit.kvcache.fork import record_prefill

        from attnkit.core.family import architecture

        arch = architecture(model.config)
        every = tuple(((layer, h), 1) for layer in arch.full_layers for h in range(arch.kv_heads))
        recorder = HeadKVConfig(frozenset(), prefill="full", budgets=every, select_window=select_window,
                                prefill_chunk=chunk or input_ids.shape[1])
        return record_prefill(model, input_ids, attention_mask, recorder, chunk)

    def prepare(self, model):
        """This cache as a technique of `core.generate`: `head_kv(model, self)`."""
        from attnkit.kvcache.cache import head_kv
        return head_kv(model, self)

    def describe(self) -> dict:
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
        transformers' sliding layers do."""
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


FULL_FRACTION = 0.25  # the default share of KV heads that keep the full cache (the registry's `full`)
KV_DEFAULTS = HeadKVConfig()  # sink 16, window 128, prefill chunk 2048: every option's default
