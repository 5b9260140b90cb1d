"""Every technique through transformers' own `generate` (`attnkit.use`): greedy tokens equal attnkit's
own loop, alone and in a left-padded batch, for the full-prefill KV cache (where the cache must find the
prompt's end itself), token budgets, a memory target and head masks; a pipeline runs inside the block."""

import pytest
import torch

import attnkit
from attnkit.core.family import architecture
from attnkit.core.generate import generate
from attnkit.core.hook import HeadMask, Intervention
from attnkit.errors import AttnkitError
from attnkit.kvcache.config import HeadKVConfig
from conftest import tiny_model
from test_generate import _Tok, _left_pad, _prompts


def _techniques(model):
    arch = architecture(model.config)
    heads = [(l, h) for l in arch.full_layers for h in range(arch.kv_heads)]
    rest = heads[1:]
    return {
        "full prefill": HeadKVConfig(frozenset(heads[:1]), sink=2, window=6, prefill="full", prefill_chunk=8),
        "token budgets": HeadKVConfig(frozenset(heads[:1]), sink=2, window=6, prefill="full", prefill_chunk=8,
                                      budgets=tuple((k, 4 + i) for i, k in enumerate(rest)), select_window=6,
                                      select_kernel=3),
        "memory target": HeadKVConfig(sink=2, window=6, prefill="full", prefill_chunk=8, memory=0.5,
                                      importance=tuple((k, 1.0 / (1 + i)) for i, k in enumerate(heads)),
                                      select_window=6),
        "window prefill": HeadKVConfig(frozenset(heads[:1]), sink=2, window=6, prefill_chunk=8),
        "head mask": Intervention(HeadMask({(0, 1), (1, 3)}, mode="zero", phase="both")),
    }


def _hf(model, ids, mask, steps):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return [row.tolist() for row in out[:, ids.shape[1]:]]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_transformers_generate_inside_use_equals_attnkits_loop(family):
    model = tiny_model(family, 2)
    prompts = _prompts(lengths=(23, 17, 30))  # 17 = 2 x 8 + 1: a chunked prefill's last chunk is one token
    ids, mask = _left_pad(prompts)
    seen = {}
    for name, technique in _techniques(model).items():
        alone = [generate(model, _Tok(), p, technique=technique, max_new_tokens=8, stop_rule="eos").ids[0]
                 for p in prompts]
        batched = generate(model, _Tok(), ids, mask, technique, 8, stop_rule="eos").ids
        with torch.no_grad(), attnkit.use(model, technique):
            assert [_hf(model, p, torch.ones_like(p), 8)[0] for p in prompts] == alone, name
            assert _hf(model, ids, mask, 8) == batched, name
        assert "generate" not in model.__dict__ and model.config._attn_implementation == "sdpa"  # its own again
        seen[name] = alone
    plain = [generate(model, _Tok(), p, max_new_tokens=8, stop_rule="eos").ids[0] for p in prompts]
    assert all(v != plain for v in seen.values())  # every technique changes the tokens: the check can fail


def test_buckets_are_refused_with_the_reason():
    from attnkit.buckets import BucketsConfig

    model = tiny_model("llama", 2)
    with pytest.raises(AttnkitError, match="model rows per prompt"):
        with attnkit.use(model, BucketsConfig([10000.0, 20000.0])):
            pass


def test_a_text_generation_pipeline_runs_the_technique(embedded):
    """The docs' pipeline example: the same text as attnkit's loop with the same cache."""
    from transformers import pipeline

    from attnkit.core.generate import answer_text, encode_prompts

    model, tok = embedded
    kv = HeadKVConfig(frozenset({(5, 0), (6, 1)}), sink=8, window=32, prefill="full")
    prompt = "The code name of Ashford is harbor. " * 12 + "The code name of Ashford is"
    ids, mask = encode_prompts(tok, [prompt])
    ours = answer_text(tok, generate(model, tok, ids, mask, kv, 6, stop_rule="eos").ids[0])
    with attnkit.use(model, kv):
        pipe = pipeline("text-generation", model=model, tokenizer=tok)
        text = pipe(prompt, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert text.strip() == ours and ours
