import copy
import math

import numpy as np
import pytest
import torch

from attnkit import AttnkitError
from attnkit.buckets import BucketedModel, BucketsConfig, combine, search_bases, waveform
from attnkit.core.generate import Sampling
from attnkit.buckets.search import _merge, dominant_peaks, dominant_troughs, model_grid
from attnkit.core.loading import rope_base
from attnkit.core.rope import config_with_base
from conftest import tiny_model


def with_rope(model, **params):
    """Same weights, a config with other rope parameters."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    cfg.rope_parameters = {**cfg.rope_parameters, **params}
    other = AutoModelForCausalLM.from_config(cfg, attn_implementation=cfg._attn_implementation).eval()
    other.load_state_dict(model.state_dict())
    return other


def test_waveform_equals_rope_dot_product_of_ones():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d, base, m = 32, 5000.0, torch.arange(0, 300)
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = m[:, None].double() * inv
    emb = torch.cat([freqs, freqs], -1)
    ones = torch.ones(1, 1, len(m), d, dtype=torch.float64)
    q, _ = apply_rotary_pos_emb(ones, ones, emb.cos()[None], emb.sin()[None])
    k0 = ones[0, 0, 0]  # the key at relative distance 0 is unrotated
    reference = (q[0, 0] @ k0) / math.sqrt(d)
    ours = waveform([base], d, m.numpy())[0]
    assert np.allclose(ours, reference.numpy(), atol=1e-9)
    assert ours[0] == pytest.approx(math.sqrt(d))


def test_dominant_extrema_are_spaced_local_extrema():
    f = waveform([10000], 128, np.arange(1000, 4091))[0]
    peaks, troughs = dominant_peaks(f), dominant_troughs(f)
    assert 1 < len(peaks) <= 6 and 1 < len(troughs) <= 6
    for p in peaks:
        assert f[p] > f[p - 1] and f[p] > f[p + 1]
    for t in troughs:
        assert f[t] < f[t - 1] and f[t] < f[t + 1]
    assert all(b - a > 50 for a, b in zip(peaks, peaks[1:]))
    assert all(b - a > 60 for a, b in zip(troughs, troughs[1:]))
    # the first dominant peak is the highest local maximum in the range
    assert f[peaks[0]] == pytest.approx(max(f[i] for i in range(1, len(f) - 1)
                                            if f[i] > f[i - 1] and f[i] > f[i + 1]), abs=1e-3)


def test_merge_drops_positions_present_in_both_lists():
    peaks, troughs = _merge([10, 40], [25, 70], [25, 90], [40, 55])
    assert peaks == [10, 90] and troughs == [55, 70]


def test_reference_search_adds_bases_whose_extrema_interleave():
    result = search_bases()
    assert len(result.bases) == 6 and 10000.0 in result.bases and not result.message
    assert all(10000 <= b <= 30000 and b % 500 == 0 for b in result.bases)
    assert all(s["cover"] > 0 for s in result.steps)
    assert search_bases().bases == result.bases  # deterministic


def test_search_stops_with_a_message_when_nothing_covers():
    result = search_bases(tolerance=-1)
    assert result.bases == [10000.0] and "stopped" in result.message


def _long_context_config(head_dim: int):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
                       num_hidden_layers=1, max_position_embeddings=32768, rope_theta=1e6, vocab_size=32)


def test_long_context_search_never_degenerates_to_the_single_base():
    """At base 1e6 over a 32K model's distances the reference tolerance pairs nothing with the seed; the
    model search widens it with the range (head dim 128), then takes the paper's reading (head dim 256),
    and says which; an explicit tolerance is the reference's, unchanged."""
    from attnkit.buckets.search import scaled_tolerance, search_for_model

    assert scaled_tolerance((1000, 4090)) == 3 and scaled_tolerance((8000, 32762)) == 24
    strict, _, span = search_for_model(_long_context_config(128), n=4, tolerance=3)
    assert strict.bases == [1e6] and span == (8000, 32762)
    widened = search_for_model(_long_context_config(128), n=4)[0]
    assert widened.bases == search_bases([1e6], 4, *model_grid(1e6), span, 128, 24).bases
    assert len(widened.bases) == 4 and "tolerance 24" in widened.message
    fallback = search_for_model(_long_context_config(256), n=4)[0]
    assert len(set(fallback.bases)) == 4 and 1e6 in fallback.bases and "paper" in fallback.message
    assert (strict.method, widened.method, fallback.method) == ("reference", "reference", "paper")
    assert fallback.bases == search_bases([1e6], 4, *model_grid(1e6), span, 256, method="paper").bases


def test_paper_search_raises_the_envelope_floor():
    m = np.arange(1000, 4091)
    result = search_bases(method="paper", n=4)
    floors = [s["floor"] for s in result.steps]
    assert floors == sorted(floors)
    alone = waveform([10000], 128, m)[0].min()
    assert waveform(result.bases, 128, m).max(0).min() == pytest.approx(floors[-1])
    assert floors[-1] > alone


def test_combine_modes_follow_their_definitions():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]]])
    p = logits.softmax(-1)
    conf = p.amax(-1)
    w = conf / conf.sum(-1, keepdim=True)
    logprobs, weights = combine(logits, "paper")
    assert torch.allclose(weights, w)
    assert torch.allclose(logprobs.exp(), (w[..., None] * p).sum(1))
    logprobs, weights = combine(logits, "reference")
    w = torch.tensor([2.0, 3.0]).softmax(-1)
    assert torch.allclose(weights[0], w)
    assert torch.allclose(logprobs, (w[:, None] * logits[0]).sum(0, keepdim=True).log_softmax(-1))
    same = logits[:, :1].repeat(1, 3, 1)  # identical bases: either mode returns that distribution
    for mode in ("paper", "reference"):
        assert torch.allclose(combine(same, mode)[0].exp(), same[:, 0].softmax(-1), atol=1e-6)


@pytest.mark.parametrize("family,kv", [("llama", 4), ("qwen2", 2), ("gemma3", 2)])
def test_single_base_generation_equals_model_generate(family, kv):
    model = tiny_model(family, kv_heads=kv)
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (1, 40))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=0)[0, 40:].tolist()
    bm = BucketedModel(model, _FakeTok(), BucketsConfig([rope_base(model.config)]))
    ours, _ = bm.generate_ids(ids, max_new_tokens=12)
    assert ours[0] == ref[:len(ours[0])] and len(ours[0]) == len(ref)


@pytest.mark.parametrize("rope", [{}, {"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128}])
def test_each_row_equals_a_model_built_with_its_base(rope):
    model = tiny_model("llama", kv_heads=2)
    if rope:
        model = with_rope(model, **rope)
    bases = [10000.0, 2500.0, 40000.0]
    torch.manual_seed(2)
    ids = torch.randint(3, 97, (2, 30))
    ours = BucketedModel(model, _FakeTok(), BucketsConfig(bases)).logits(ids)
    for b, base in enumerate(bases):
        ref = with_rope(model, rope_theta=base)(input_ids=ids).logits[:, -1]
        assert torch.allclose(ours[:, b], ref, atol=1e-5), base


def test_left_padded_prompts_match_separate_runs():
    model = tiny_model("qwen3", kv_heads=2)
    bm = BucketedModel(model, _FakeTok(), BucketsConfig([10000.0, 20000.0]))
    torch.manual_seed(3)
    long, short = torch.randint(3, 97, (1, 25)), torch.randint(3, 97, (1, 16))
    ids = torch.cat([long, torch.cat([torch.zeros(1, 9, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 25), torch.cat([torch.zeros(1, 9), torch.ones(1, 16)], 1)]).long()
    together, _ = bm.generate_ids(ids, mask, max_new_tokens=6)
    alone = [bm.generate_ids(x, max_new_tokens=6)[0][0] for x in (long, short)]
    assert together == alone
    assert torch.allclose(bm.logits(ids, mask)[1], bm.logits(short)[0], atol=1e-5)


def test_sampling_is_seeded():
    model = tiny_model("llama", kv_heads=2)
    bm = BucketedModel(model, _FakeTok(), BucketsConfig([10000.0, 15000.0]))
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(0))
    a = bm.generate_ids(ids, max_new_tokens=8, sampling=Sampling(1.0, 0.9, 5))[0]
    b = bm.generate_ids(ids, max_new_tokens=8, sampling=Sampling(1.0, 0.9, 5))[0]
    assert a == b
    # and it is sampling: other seeds give other tokens, and the draws are not the greedy path
    draws = {tuple(bm.generate_ids(ids, max_new_tokens=8, sampling=Sampling(1.0, seed=s))[0][0]) for s in range(6)}
    greedy = tuple(bm.generate_ids(ids, max_new_tokens=8)[0][0])
    assert len(draws) > 1 and draws != {greedy}


def test_model_without_rope_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=64))
    with pytest.raises(AttnkitError, match="no rotary"):
        BucketedModel(model, _FakeTok(), BucketsConfig([10000.0]))


def test_bad_config_is_refused():
    with pytest.raises(AttnkitError):
        BucketsConfig([])
    with pytest.raises(AttnkitError):
        BucketsConfig([10000.0], combine="vote")


class _FakeTok:
    """Just enough tokenizer for id-level generation with tiny models."""
    eos_token_id = None
    pad_token_id = 0
    padding_side = "left"

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def test_per_layer_type_bases_move_the_global_layers_only():
    """Gemma 3 rule: a bucket's base replaces the full-attention layers' base; sliding layers keep theirs.
    Each row of the buckets equals a model whose config says exactly that."""
    model = tiny_model("gemma3", kv_heads=2)
    cfg = config_with_base(model.config, 250000.0)
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 250000.0
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert model.config.rope_parameters["full_attention"]["rope_theta"] == 1000000.0  # a copy, not an edit
    torch.manual_seed(3)
    ids = torch.randint(3, 97, (1, 30))
    bases = [1000000.0, 250000.0]
    ours = BucketedModel(model, _FakeTok(), BucketsConfig(bases)).logits(ids)
    for b, base in enumerate(bases):
        other = copy.deepcopy(model)
        other.config.rope_parameters = config_with_base(model.config, base).rope_parameters
        other.model.rotary_emb = type(model.model.rotary_emb)(config=other.config)
        assert torch.allclose(ours[:, b], other(input_ids=ids).logits[:, -1], atol=1e-5), base
    assert not torch.allclose(ours[:, 0], ours[:, 1], atol=1e-3)  # the base reaches the output
