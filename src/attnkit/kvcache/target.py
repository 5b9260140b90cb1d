"""A memory target: the retrieval-head KV cache planned per prompt, when the prompt's length is known.

`HeadKVConfig(memory=0.1, importance=...)` asks for a tenth of the model's own cache at whatever length
each prompt has. With a full prefill nothing leaves the cache before the prompt ends, so the plan can
wait until then: the prompt runs into a recording cache (every KV head kept, as `fork.record_prefill`
keeps it), and at `end_prefill` the target is resolved at the prompt's length
(`HeadKVConfig.resolve`: the most important heads full, token budgets for the rest) and the cache
becomes, from copies of the recorded tensors, exactly the cache that plan's own prefill would have
left (`fork.SharedPrefill.start`). Decoding then runs on it as on any retrieval-head cache. Where the
prompt's length is known before it runs (`core.generate.prefill` says so: `expect_prompt`), the plan is
chosen then and the cache is that plan's from the first token, recording nothing: the peak memory is
the plan's own.

    with HeadKVConfig(memory=0.1, importance=imp, prefill="full").prepare(model) as session:
        out = generate(model, tok, ids, mask, session)      # session.plans: the plan chosen per length
"""

from __future__ import annotations

from contextlib import contextmanager

from attnkit.core.family import architecture
from attnkit.core.say import say
from attnkit.kvcache.cache import HeadKV, HeadKVCache, head_kv
from attnkit.kvcache.fork import Recorder, SharedPrefill
from attnkit.kvcache.layer import HeadKVLayer


class TargetCache(Recorder):
    """A recording cache that, when its prompt ends, becomes the cache of the plan that meets the memory
    target at the prompt's length (`plan` holds that plan afterwards)."""

    def __init__(self, model, config, session, ends_prompt: bool | int = False):
        self._model, self._target, self._session = model, config, session
        self.plan = None
        super().__init__(model, config.recording(architecture(model.config)), ends_prompt)

    def expect_prompt(self, tokens: int) -> None:
        """A prompt of `tokens` tokens is coming into this empty cache: its plan is known now, so the cache
        is that plan's from the start (nothing recorded, each layer trimmed as the prompt's end reaches it)."""
        if self.plan is not None or any(layer.seen for layer in self.layers if isinstance(layer, HeadKVLayer)):
            return
        arch = architecture(self._model.config)
        self.plan = self._target.resolve(arch, tokens)
        self.layers = HeadKVCache(self._model, self.plan).layers
        self._session.chose(tokens, self.plan, arch)
        HeadKVCache.expect_prompt(self, tokens)

    def end_prefill(self) -> None:
        if self.plan is not None:
            HeadKVCache.end_prefill(self)
            return
        tokens = next(layer.seen for layer in self.layers if isinstance(layer, HeadKVLayer))
        arch = architecture(self._model.config)
        self.plan = self._target.resolve(arch, tokens)
        fresh = SharedPrefill(self, None, self._target.select_window).start(self._model, self.plan).cache
        self.layers = fresh.layers
        self._session.chose(tokens, self.plan, arch)


class TargetKV(HeadKV):
    """The session of a memory target: a fresh `TargetCache` per generation; `plans` records the plan
    chosen at each prompt length it met (the first time it is met, it is also said on the log)."""

    def __init__(self, model, config):
        super().__init__(model, config)
        self.plans: dict[int, object] = {}

    def new_cache(self, ends_prompt: bool | int = False):
        return TargetCache(self.model, self.config, self, ends_prompt)

    def chose(self, tokens: int, plan, arch) -> None:
        if tokens not in self.plans:
            self.plans[tokens] = plan
            budget = sum(n for _, n in plan.budgets)
            heads = arch.kv_heads * len(arch.full_layers)
            say(f"KV cache at memory {self.config.memory:g} for {tokens} tokens: {len(plan.full)} of {heads} KV heads "
                f"full, {budget} middle tokens over {len(plan.budgets)} others "
                f"({plan.kv_bytes(arch, tokens) / self.config.kv_bytes(arch, tokens):.3f} of the target)")



@contextmanager
def target_kv(model, config):
    """Inside the block the model's attention understands the retrieval-head cache; yields a `TargetKV`."""
    with head_kv(model, config.recording(architecture(model.config))):
        yield TargetKV(model, config)
