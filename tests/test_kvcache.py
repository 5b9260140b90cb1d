"""The retrieval-head KV cache against a naive reference: full cache, window heads masked to sink + window."""

import pytest
import torch

from attnkit.core.decode import cache_kwarg
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from attnkit.core.hook import HeadMask, intervene
from attnkit.core.family import architecture
from attnkit.kvcache.cache import head_kv
from attnkit.kvcache.config import HeadKVConfig, native_kv_bytes
from attnkit.errors import AttnkitError
from conftest import tiny_model

FAMILIES = [("llama", 4), ("llama", 2), ("mistral", 2), ("qwen2", 1), ("qwen3", 2)]
REF = {}  # what the reference attention needs: window KV heads per layer, sink, window, 2D padding mask


def _reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Eager attention over the whole sequence; query heads of window KV heads see only sink + window.

    With REF["prompt_all"] (full prefill: the prompt's length) the prompt's queries see every key before
    them, whatever the chunks (nothing leaves before the prompt ends), and REF["kept"] gives each window
    head the middle positions its token budget keeps for the later queries. With REF["starts"] (the start
    of the chunk each query was computed in, cache coordinates): `compensate` adds one key per query, the
    mean of the real non-sink keys that left before its chunk (j <= start - window), its logit raised by
    log(how many)."""
    group = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scale = scaling or query.shape[-1] ** -0.5
    scores = query @ k.transpose(-1, -2) * scale
    scores = scores + attention_mask
    n = key.shape[2]
    real = REF["padding"].bool()  # [batch, tokens]
    sink = real & (real.long().cumsum(-1) <= REF["sink"])  # the first `sink` real tokens of each row
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    seen = (j > i - REF["window"])[None] | sink[:, None, :]  # [batch, q, k]
    starts = REF.get("starts")
    comp_n = None
    if starts is not None:
        start = torch.as_tensor(starts[:n])[:, None]  # [q, 1]
        if REF.get("compensate"):
            gone = (real & ~sink)[:, None, :] & (j <= start - REF["window"])[None]  # [batch, q, k]
            comp_n = gone.sum(-1)  # [batch, q]
            w = gone.to(k.dtype) / comp_n.clamp_min(1)[..., None]
    low = torch.finfo(scores.dtype).min
    out = torch.empty_like(query)
    for h in range(query.shape[1]):
        if h // group not in REF["windowed"][module.layer_idx]:
            out[:, h] = scores[:, h].softmax(-1) @ v[:, h]
            continue
        seen_h = seen
        prompt = REF.get("prompt_all")
        if prompt is not None:  # full prefill: the prompt reads everything, later queries sink + window + kept
            kept = torch.zeros(real.shape[0], n, dtype=torch.bool)
            for row, positions in enumerate(REF.get("kept", {}).get((module.layer_idx, h // group), [])):
                kept[row, positions] = True
            seen_h = torch.where((i < prompt)[None], torch.ones_like(seen), seen | kept[:, None, :])
        s_h = scores[:, h].masked_fill(~seen_h, low)
        if comp_n is None:
            out[:, h] = s_h.softmax(-1) @ v[:, h]
            continue
        k_c, v_c = w @ k[:, h], w @ v[:, h]  # [batch, q, dim]: the compensation key and value per query
        logit_c = (query[:, h] * k_c).sum(-1) * scale + comp_n.clamp_min(1).log()
        logit_c = logit_c.masked_fill(comp_n == 0, low)
        probs = torch.cat([s_h, logit_c[..., None]], -1).softmax(-1)
        out[:, h] = probs[..., :-1] @ v[:, h] + probs[..., -1:] * v_c
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("test_window_reference", _reference_attention)
AttentionMaskInterface.register("test_window_reference", ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def _reference_logits(model, ids, mask, config: HeadKVConfig, prompt: int | None = None):
    """Logits of the reference; `prompt` (tokens prefilled in chunks of config.prefill_chunk, the rest
    decoded one by one) is needed for the compensation token and full prefill."""
    _prepare_reference(model, mask, config)
    if prompt is not None:
        c = config.prefill_chunk
        if config.prefill == "full":  # nothing leaves before the prompt ends: no prompt query lacks a key
            REF.update(prompt_all=prompt, starts=[-(10 ** 9) if t < prompt else t for t in range(ids.shape[1])])
        else:
            REF.update(starts=[(t // c) * c if t < prompt else t for t in range(ids.shape[1])])
    return _run_reference(model, ids, mask)


def _prepare_reference(model, mask, config: HeadKVConfig):
    arch = architecture(model.config)  # a native sliding layer is left to the model's own sliding mask
    REF.update(windowed={l: {h for h in range(arch.kv_heads) if (l, h) not in config.full} if kind == "full" else set()
                         for l, kind in enumerate(arch.layer_types)},
               sink=config.sink, window=config.window, padding=mask, starts=None,
               compensate=config.compensate, prompt_all=None, kept={})


def _run_reference(model, ids, mask):
    base = model.config._attn_implementation
    model.set_attn_implementation("test_window_reference")
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False).logits
    finally:
        model.set_attn_implementation(base)


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _decode_against_reference(model, cache, out, ids, mask, config, steps):
    """Greedy decoding from a prefilled cache; every step's logits equal the reference recomputed over
    the whole sequence (the prompt, `ids`, prefilled in chunks). Returns (sequence, mask, last reference)."""
    seq, seq_mask = ids, mask
    for _ in range(steps):
        nxt = out.logits[:, -1:].argmax(-1)
        seq, seq_mask = torch.cat([seq, nxt], 1), torch.cat([seq_mask, torch.ones_like(nxt)], 1)
        out = model(input_ids=nxt, attention_mask=seq_mask, position_ids=_positions(seq_mask)[:, -1:],
                    **cache_kwarg(model, cache), use_cache=True)
        ref = _reference_logits(model, seq, seq_mask, config, prompt=ids.shape[1])[:, -1]
        torch.testing.assert_close(out.logits[:, -1], ref, atol=2e-4, rtol=1e-4)
    return seq, seq_mask, ref


def _batch(seed=0, tokens=40, pad=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (2, tokens), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("family,kv", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefill_in_chunks_and_decode_equal_the_reference(family, kv, attn):
    model = tiny_model(family, kv, attn=attn)
    ids, mask = _batch()
    config = HeadKVConfig(full={(0, 0), (2, kv - 1)}, sink=3, window=6, prefill_chunk=7)
    reference = _reference_logits(model, ids, mask, config)
    real = mask.bool()
    for chunk in (7, 16, 40):
        config = HeadKVConfig(full=config.full, sink=3, window=6, prefill_chunk=chunk)
        with head_kv(model, config) as hkv, torch.no_grad():
            cache = hkv.new_cache()
            logits = []
            for start in range(0, ids.shape[1], chunk):
                end = min(start + chunk, ids.shape[1])
                out = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end],
                            position_ids=_positions(mask[:, :end])[:, start:end], **cache_kwarg(model, cache), use_cache=True)
                logits.append(out.logits)
            got = torch.cat(logits, dim=1)
            torch.testing.assert_close(got[real], reference[real], atol=2e-4, rtol=1e-4)
            # decoding: every step equals the reference recomputed over the whole sequence
            seq, seq_mask = ids, mask
            for _ in range(4):
                nxt = out.logits[:, -1:].argmax(-1)
                seq, seq_mask = torch.cat([seq, nxt], 1), torch.cat([seq_mask, torch.ones_like(nxt)], 1)
                out = model(input_ids=nxt, attention_mask=seq_mask, position_ids=_positions(seq_mask)[:, -1:],
                            **cache_kwarg(model, cache), use_cache=True)
                ref = _reference_logits(model, seq, seq_mask, config)[:, -1]
                torch.testing.assert_close(out.logits[:, -1], ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family,kv", [("llama", 2), ("qwen2", 1), ("gemma3", 2)])
@pytest.mark.parametrize("prefill", ["window", "full"])
def test_steady_decoding_without_padding_equals_the_reference(family, kv, prefill, monkeypatch):
    """Unpadded sdpa decoding takes the ring path (the new key overwrites the oldest recent slot, no
    mask, no trim) once the window store is steady; 14 steps wrap the 5 recent slots twice. The full
    heads' buffers, 2 tokens ahead here, grow every other step."""
    import attnkit.kvcache.layer as kvcache

    monkeypatch.setattr(kvcache, "FULL_SLACK", 2)
    model = tiny_model(family, kv, attn="sdpa")
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    full = {(0, 0)} if family != "gemma3" else {(2, 0)}
    config = HeadKVConfig(full=full, sink=3, window=6, prefill_chunk=7, prefill=prefill)
    with head_kv(model, config) as hkv, torch.no_grad():
        out, cache = hkv.prefill(ids, mask)
        seq, seq_mask, _ = _decode_against_reference(model, cache, out, ids, mask, config, 14)
    window_layers = [layer for layer in cache.layers if getattr(layer, "windowed", None)]
    assert window_layers and all(layer._ring is not None for layer in window_layers)  # the ring path ran
    assert config.kv_bytes(architecture(model.config), seq.shape[1], 2, 4) == cache.kv_bytes()


@pytest.mark.parametrize("family,kv", [("llama", 2), ("qwen2", 1), ("gemma3", 2)])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("compensate,prefill", [(True, "window"), (False, "full"), (True, "full")])
def test_compensation_token_and_full_prefill_equal_the_reference(family, kv, attn, compensate, prefill):
    model = tiny_model(family, kv, attn=attn)
    ids, mask = _batch(seed=4)
    full = {(0, 0)} if family != "gemma3" else {(2, 0)}
    for chunk in (7, 40):
        config = HeadKVConfig(full=full, sink=3, window=6, prefill_chunk=chunk, compensate=compensate, prefill=prefill)
        reference = _reference_logits(model, ids, mask, config, prompt=ids.shape[1])
        with head_kv(model, config) as hkv, torch.no_grad():
            out, cache = hkv.prefill(ids, mask)
            torch.testing.assert_close(out.logits[:, -1], reference[:, -1], atol=2e-4, rtol=1e-4)
            seq, seq_mask, ref = _decode_against_reference(model, cache, out, ids, mask, config, 5)
        plain = _reference_logits(model, seq, seq_mask, HeadKVConfig(full=full, sink=3, window=6))[:, -1]
        assert (plain - ref).abs().max() > 1e-3  # each option changes the outputs: the test can fail
    assert config.kv_bytes(architecture(model.config), seq.shape[1], 2, 4) == cache.kv_bytes()


def test_the_window_matters_so_the_reference_test_can_fail():
    model = tiny_model("llama", 2)
    ids, mask = _batch(tokens=30)
    narrow = _reference_logits(model, ids, mask, HeadKVConfig(full=set(), sink=2, window=4))
    wide = _reference_logits(model, ids, mask, HeadKVConfig(full=set(), sink=2, window=64))
    assert (narrow[:, -1] - wide[:, -1]).abs().max() > 1e-2


@pytest.mark.parametrize("family,kv", FAMILIES)
def test_a_window_wider_than_the_context_generates_the_plain_tokens(family, kv):
    model = tiny_model(family, kv)
    ids, mask = _batch(seed=1, tokens=24)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(**kwargs)
        with head_kv(model, HeadKVConfig(full={(1, 0)}, sink=4, window=64, prefill_chunk=10)) as hkv:
            ours = hkv.generate(**kwargs)
    assert torch.equal(plain, ours)


def test_cache_bytes_equal_the_formula_and_shrink():
    model = tiny_model("llama", 2)
    cfg = model.config
    ids, mask = _batch(tokens=60)
    config = HeadKVConfig(full={(0, 1), (1, 0)}, sink=4, window=10, prefill_chunk=16)
    with head_kv(model, config) as hkv, torch.no_grad():
        out, cache = hkv.prefill(ids, mask)
        arch = architecture(cfg)
        for tokens in (60, 61, 62):
            expect = config.kv_bytes(arch, tokens, batch=2, bytes_per_value=4)
            assert cache.kv_bytes() == expect
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = model(input_ids=nxt, attention_mask=mask, position_ids=_positions(mask)[:, -1:],
                        **cache_kwarg(model, cache), use_cache=True)
    full = native_kv_bytes(arch, 62, batch=2, bytes_per_value=4)
    assert cache.kv_bytes() < 0.6 * full


def test_bad_settings_are_clear_errors():
    model = tiny_model("llama", 2)
    for kwargs in ({"sink": -1}, {"window": 0}, {"prefill_chunk": 0}):
        with pytest.raises(AttnkitError):
            HeadKVConfig(**kwargs)
    with pytest.raises(AttnkitError, match="outside the model"):
        with head_kv(model, HeadKVConfig(full={(0, 2)})):
            pass
    with intervene(model, mask=HeadMask({(0, 0)})):
        with pytest.raises(AttnkitError, match="head mask"):
            with head_kv(model, HeadKVConfig()):
                pass
    with head_kv(model, HeadKVConfig()) as hkv:
        cache = hkv.new_cache()
        with pytest.raises(AttnkitError, match="KV cache"):
            with intervene(model, mask=HeadMask({(0, 0)})):
                pass
    with pytest.raises(AttnkitError, match="only inside"):
        model(input_ids=torch.tensor([[5, 6]]), **cache_kwarg(model, cache), use_cache=True)
    flash = tiny_model("llama", 2)
    flash.config._attn_implementation = "flex_attention"
    with pytest.raises(AttnkitError, match="supports attention implementations"):
        with head_kv(flash, HeadKVConfig()):
            pass


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hybrid_model_keeps_its_sliding_layers_and_equals_the_reference(attn):
    """Gemma-3-style layers (full, sliding 8, full): the sliding layer keeps the model's own window cache,
    the full layers follow the plan; logits equal the reference and the bytes the per-layer formula."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    model = tiny_model("gemma3", 2, attn=attn)
    arch = architecture(model.config)
    ids, mask = _batch(tokens=30)
    config = HeadKVConfig(full={(0, 1)}, sink=3, window=6, prefill_chunk=7)
    reference = _reference_logits(model, ids, mask, config)
    with head_kv(model, config) as hkv, torch.no_grad():
        out, cache = hkv.prefill(ids, mask)
        assert isinstance(cache.layers[1], DynamicSlidingWindowLayer)
        assert cache.kv_bytes() == config.kv_bytes(arch, 30, batch=2, bytes_per_value=4)
    torch.testing.assert_close(out.logits[:, -1], reference[:, -1], atol=2e-4, rtol=1e-4)
    # native sliding layers count as they are: 7 kept tokens there, all 30 in full layers
    assert native_kv_bytes(arch, 30, bytes_per_value=4) == 2 * 16 * 4 * 2 * (30 + 7 + 30)
    with pytest.raises(AttnkitError, match="sliding-window layer"):
        with head_kv(model, HeadKVConfig(full={(1, 0)})):
            pass


def _snapkv_choice(model, ids, mask, config: HeadKVConfig) -> dict:
    """{(layer, kv head): per row, the positions its budget keeps}, computed apart from the cache: the
    plain model's eager attention probabilities of the prompt's last select_window real queries, averaged
    over them and the KV head's query heads, average-pooled, the top middle tokens (real, not among the
    first `sink` real ones, older than the window) per row."""
    base = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False,
                        output_attentions=True).attentions
    finally:
        model.set_attn_implementation(base)
    arch = architecture(model.config)
    group = arch.query_heads // arch.kv_heads
    real = mask.bool()
    n, w, k = ids.shape[1], config.select_window, config.select_kernel
    sink = real & (real.long().cumsum(-1) <= config.sink)
    middle = real & ~sink & (torch.arange(n) <= n - config.window)[None]
    widest = int(middle.sum(-1).max())
    out = {}
    for (layer, head), budget in config.budgets:
        probs = att[layer][:, head * group:(head + 1) * group, -w:]  # [b, group, w, n]
        q_real = real[:, -w:]
        votes = (probs * q_real[:, None, :, None]).sum(2).mean(1) / q_real.sum(-1, keepdim=True)  # [b, n]
        pooled = torch.nn.functional.avg_pool1d(votes[:, None], k, stride=1, padding=k // 2)[:, 0]
        rows = []
        for r in range(ids.shape[0]):
            order = [int(j) for j in pooled[r].argsort(descending=True) if middle[r, j]]
            rows.append(sorted(order[:min(budget, widest)]))
        out[(layer, head)] = rows
    return out


@pytest.mark.parametrize("family,kv", [("llama", 2), ("qwen2", 1), ("gemma3", 2)])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_token_budgets_keep_the_snapkv_choice_and_equal_the_reference(family, kv, attn):
    """Window heads with a token budget keep the middle tokens the prompt's last queries attended most
    (computed apart, from the plain model's eager probabilities), in chunked and one-pass prefill; decoding
    then equals a full-cache reference that lets those heads see sink + window + their kept tokens, and the
    bytes held equal the formula."""
    model = tiny_model(family, kv, attn=attn)
    ids, mask = _batch(seed=5, tokens=48)
    layer = 0 if family != "gemma3" else 2
    budgets = {(layer, kv - 1): 5, (1 if family != "gemma3" else 0, 0): 9}
    full = {(layer, 0)} if kv > 1 else set()
    for chunk in (7, 48):
        config = HeadKVConfig(full=full, sink=3, window=6, prefill_chunk=chunk, prefill="full", budgets=budgets,
                              select_window=8, select_kernel=3)
        expected = _snapkv_choice(model, ids, mask, config)
        with head_kv(model, config) as hkv, torch.no_grad():
            out, cache = hkv.prefill(ids, mask)
            got = {(l.layer_idx, h): rows for l in cache.layers if hasattr(l, "kept_middle")
                   for h, rows in l.kept_middle().items()}
            assert got == expected
            assert cache.kv_bytes() == config.kv_bytes(architecture(model.config), ids.shape[1], 2, 4)
            seq, seq_mask = ids, mask
            for _ in range(4):
                nxt = out.logits[:, -1:].argmax(-1)
                seq, seq_mask = torch.cat([seq, nxt], 1), torch.cat([seq_mask, torch.ones_like(nxt)], 1)
                out = model(input_ids=nxt, attention_mask=seq_mask, position_ids=_positions(seq_mask)[:, -1:],
                            **cache_kwarg(model, cache), use_cache=True)
                ref = _budget_reference(model, seq, seq_mask, config, ids.shape[1], expected)[:, -1]
                torch.testing.assert_close(out.logits[:, -1], ref, atol=2e-4, rtol=1e-4)
    # the kept tokens matter: without them (sink + window only) the same steps differ
    plain = _reference_logits(model, seq, seq_mask, HeadKVConfig(full=full, sink=3, window=6))[:, -1]
    assert (plain - ref).abs().max() > 1e-3


def _budget_reference(model, seq, mask, config, prompt, kept):
    """The reference for token budgets: the prompt's queries read everything; later queries of a window
    head read sink + window + the positions `kept` gives it."""
    _prepare_reference(model, mask, config)
    REF.update(prompt_all=prompt, kept=kept)
    return _run_reference(model, seq, mask)
