import copy

import pytest
import torch

from attnkit.core.decode import cache_kwarg
from transformers import DynamicCache

from attnkit.core.hook import HeadMask, Probe, intervene
from attnkit.errors import AttnkitError
from conftest import tiny_model

FAMILIES = [("llama", 4), ("llama", 2), ("mistral", 2), ("qwen2", 1), ("qwen3", 2)]


def _prefill_decode(model, ids, steps=3):
    """Logits of a prefill, then of `steps` greedy decode steps through the cache."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, **cache_kwarg(model, cache), use_cache=True)
        logits = [out.logits]
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=nxt, **cache_kwarg(model, cache), use_cache=True)
            logits.append(out.logits)
    return logits


@pytest.mark.parametrize("family,kv", FAMILIES)
def test_nothing_active_is_bitwise_identical(family, kv):
    model = tiny_model(family, kv)
    ids = torch.randint(0, 97, (2, 19))
    plain = _prefill_decode(model, ids)
    with intervene(model):
        wrapped = _prefill_decode(model, ids)
        assert model.config._attn_implementation == "attnkit_sdpa"
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(a, b) for a, b in zip(plain, wrapped))


@pytest.mark.parametrize("family,kv", FAMILIES)
def test_probe_matches_eager_output_attentions(family, kv):
    model = tiny_model(family, kv, attn="eager")
    ids = torch.randint(0, 97, (1, 40))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :-3], **cache_kwarg(model, cache), use_cache=True)
        reference = []
        ref_cache = copy.deepcopy(cache)
        for t in range(3):
            out = model(input_ids=ids[:, 37 + t:38 + t], **cache_kwarg(model, ref_cache), use_cache=True, output_attentions=True)
            reference.append(torch.stack([a[0, :, -1].topk(2).indices for a in out.attentions]))
        with intervene(model, probe=Probe(top_k=2)) as ctl:
            for t in range(3):
                model(input_ids=ids[:, 37 + t:38 + t], **cache_kwarg(model, cache), use_cache=True)
    got = ctl.positions()[:, :, 0]  # [steps, layers, heads, k]
    assert got.shape == (3, 3, 4, 2)
    assert torch.equal(got, torch.stack(reference))


def test_probe_on_sdpa_equals_eager_reference():
    model = tiny_model("llama", 2, attn="sdpa")
    eager = tiny_model("llama", 2, attn="eager")
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        ref = eager(input_ids=ids, output_attentions=True).attentions
        with intervene(model, probe=Probe(prefill_last=True)) as ctl:
            model(input_ids=ids)
    want = torch.stack([a[0, :, -1].argmax(-1) for a in ref])
    assert torch.equal(ctl.positions()[0, :, 0, :, 0], want)
    probs = ctl.probabilities()[0, :, 0, :, 0]
    assert torch.allclose(probs, torch.stack([a[0, :, -1].max(-1).values for a in ref]), atol=1e-5)


def _by_hand(model, heads, mode):
    """A copy of the model with the heads knocked out by editing weights."""
    edited = copy.deepcopy(model)
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for layer, head in heads:
        attn = edited.model.layers[layer].self_attn
        with torch.no_grad():
            if mode == "uniform":
                attn.q_proj.weight[head * d:(head + 1) * d] = 0
                if attn.q_proj.bias is not None:
                    attn.q_proj.bias[head * d:(head + 1) * d] = 0
            else:
                attn.o_proj.weight[:, head * d:(head + 1) * d] = 0
    return edited


@pytest.mark.parametrize("family,kv", [("llama", 2), ("qwen2", 1), ("mistral", 4), ("qwen3", 2)])
@pytest.mark.parametrize("mode", ["uniform", "zero"])
def test_mask_both_phases_equals_weight_surgery(family, kv, mode):
    # qwen3 normalises the query (q_norm) before RoPE: a zeroed q_proj still gives a zero query, as the hook does
    model = tiny_model(family, kv)
    heads = {(0, 1), (2, 3), (1, 0)}
    ids = torch.randint(0, 97, (2, 17))
    ref = _prefill_decode(_by_hand(model, heads, mode), ids)
    with intervene(model, mask=HeadMask(heads, mode=mode, phase="both")):
        got = _prefill_decode(model, ids)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    plain = _prefill_decode(model, ids)
    assert not torch.allclose(plain[0], ref[0], atol=1e-4)


@pytest.mark.parametrize("mode", ["uniform", "zero"])
def test_mask_decode_only_leaves_prefill_alone(mode):
    model = tiny_model("llama", 2)
    edited = _by_hand(model, {(1, 2)}, mode)
    ids = torch.randint(0, 97, (1, 21))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        first = model(input_ids=ids, **cache_kwarg(model, cache), use_cache=True).logits
        nxt = first[:, -1:].argmax(-1)
        ref = edited(input_ids=nxt, **cache_kwarg(edited, copy.deepcopy(cache)), use_cache=True).logits
        with intervene(model, mask=HeadMask({(1, 2)}, mode=mode, phase="decode")):
            cache2 = DynamicCache(config=model.config)
            pre = model(input_ids=ids, **cache_kwarg(model, cache2), use_cache=True).logits
            got = model(input_ids=nxt, **cache_kwarg(model, cache2), use_cache=True).logits
    assert torch.equal(pre, first)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_bad_heads_and_unwrappable_implementation():
    model = tiny_model("llama", 2)
    with pytest.raises(AttnkitError, match="outside the model"):
        with intervene(model, mask=HeadMask({(9, 0)})):
            pass
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(AttnkitError, match="supports attention implementations"):
        with intervene(tiny_model("llama", 2, attn="flex_attention")):
            pass
    with pytest.raises(AttnkitError, match="mode"):
        HeadMask({(0, 0)}, mode="bogus")


def test_attention_swaps_refuse_each_other_with_one_message():
    """The three techniques that replace the attention function (head mask / probe, KV cache, gate
    training) refuse to stack, each naming the other; the model is its own again afterwards."""
    from contextlib import ExitStack

    from attnkit.core.family import architecture
    from attnkit.core.hook import HeadMask, intervene
    from attnkit.kvcache.cache import head_kv
    from attnkit.kvcache.config import HeadKVConfig
    from attnkit.heads.gates import Gates, gated
    from conftest import tiny_model

    model = tiny_model("llama", 2)
    swaps = {"a head mask or probe": lambda: intervene(model, HeadMask({(0, 0)})),
             "the retrieval-head KV cache": lambda: head_kv(model, HeadKVConfig(frozenset({(0, 0)}))),
             "gate training": lambda: gated(model, Gates(architecture(model.config), 2, 8))}
    for outer, enter_outer in swaps.items():
        for inner, enter_inner in swaps.items():
            with ExitStack() as stack:
                stack.enter_context(enter_outer())
                with pytest.raises(AttnkitError) as e:
                    stack.enter_context(enter_inner())
                said = str(e.value)
                assert said.startswith(inner) and "do not stack" in said
                assert ("already active" in said) if inner == outer else (outer in said)
            assert model.config._attn_implementation == "sdpa"
