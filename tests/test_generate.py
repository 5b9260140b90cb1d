"""The one generation loop (core.generate): for every technique, its tokens equal an independent
reference computation (transformers' own generate, or a full forward per step without any cache),
and a left-padded batch gives each prompt the tokens it gets alone."""

import pytest
import torch
from conftest import tiny_model
from test_kvcache import _reference_logits

from attnkit.buckets import BucketedModel, BucketsConfig, combine
from attnkit.core.generate import PLAIN, Sampling, Session, answer_text, generate
from attnkit.core.hook import HeadMask, Intervention, Probe, intervene
from attnkit.kvcache.config import HeadKVConfig


class _Tok:
    """What the loop needs from a tokenizer for random-token models: decoding, no EOS."""
    eos_token_id = None

    def decode(self, ids, **kw):
        return " ".join(f"t{i}" for i in ids)

    def convert_tokens_to_ids(self, token):
        return None

    def get_vocab(self):
        return {}


def _prompts(seed=0, lengths=(23, 14, 30)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (1, n), generator=g) for n in lengths]


def _left_pad(prompts):
    n = max(p.shape[1] for p in prompts)
    ids = torch.cat([torch.cat([torch.zeros(1, n - p.shape[1], dtype=torch.long), p], 1) for p in prompts])
    mask = torch.cat([torch.cat([torch.zeros(1, n - p.shape[1]), torch.ones(1, p.shape[1])], 1) for p in prompts]).long()
    return ids, mask


def _hf_greedy(model, ids, steps):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                          pad_token_id=0)[0, ids.shape[1]:].tolist()


def _alone_and_batched(model, technique, steps=7):
    prompts = _prompts()
    alone = [generate(model, _Tok(), p, technique=technique, max_new_tokens=steps, stop_rule="eos").ids[0]
             for p in prompts]
    ids, mask = _left_pad(prompts)
    batched = generate(model, _Tok(), ids, mask, technique, steps, stop_rule="eos").ids
    return prompts, alone, batched


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_plain_equals_transformers_generate_alone_and_in_a_padded_batch(family):
    model = tiny_model(family, kv_heads=2)
    prompts, alone, batched = _alone_and_batched(model, PLAIN)
    assert alone == [_hf_greedy(model, p, 7) for p in prompts]
    assert batched == alone


def test_head_mask_equals_transformers_generate_under_the_same_mask():
    model = tiny_model("llama", kv_heads=2)
    mask = HeadMask({(0, 1), (1, 3), (2, 0)}, mode="zero", phase="both")
    prompts, alone, batched = _alone_and_batched(model, Intervention(mask))
    with intervene(model, mask=mask):
        reference = [_hf_greedy(model, p, 7) for p in prompts]
    assert alone == reference and batched == alone
    assert alone != [_hf_greedy(model, p, 7) for p in prompts]  # the mask changed the answers


def test_probes_see_every_step_of_the_shared_loop():
    model = tiny_model("llama", kv_heads=2)
    with Intervention(probe=Probe(top_k=2, prefill_last=True)).prepare(model) as session:
        out = generate(model, _Tok(), _prompts()[0], technique=session, max_new_tokens=5, stop_rule="eos")
    assert session.controller.positions().shape == (len(out.ids[0]), 3, 1, 4, 2)  # one probe per generated token


@pytest.mark.parametrize("family,kv", [("llama", 2), ("qwen2", 1), ("gemma3", 2)])
def test_kv_cache_equals_a_full_forward_per_step_with_the_window_mask(family, kv):
    model = tiny_model(family, kv_heads=kv)
    config = HeadKVConfig(full={(0, 0)}, sink=3, window=6, prefill_chunk=8)
    prompts, alone, batched = _alone_and_batched(model, config)
    for p, got in zip(prompts, alone):
        seq, want = p, []
        for _ in range(len(got)):
            token = _reference_logits(model, seq, torch.ones_like(seq), config)[0, -1].argmax()
            want.append(int(token))
            seq = torch.cat([seq, token.view(1, 1)], 1)
        assert got == want
    assert batched == alone
    assert alone != [_hf_greedy(model, p, 7) for p in prompts]  # the window changed the answers


def test_buckets_equal_a_full_forward_per_step_combined_by_confidence():
    model = tiny_model("llama", kv_heads=2)
    config = BucketsConfig([10000.0, 2500.0, 40000.0])
    prompts, alone, batched = _alone_and_batched(model, config)
    bm = BucketedModel(model, _Tok(), config)
    for p, got in zip(prompts, alone):
        seq, want = p, []
        for _ in range(len(got)):
            token = combine(bm.logits(seq), config.combine)[0].argmax(-1)  # every base over the whole sequence
            want.append(int(token))
            seq = torch.cat([seq, token.view(1, 1)], 1)
        assert got == want
    assert batched == alone


def test_budgets_per_prompt_cancel_and_seeded_sampling():
    model = tiny_model("llama", kv_heads=2)
    ids, mask = _left_pad(_prompts())
    out = generate(model, _Tok(), ids, mask, max_new_tokens=[2, 5, 0], stop_rule="eos")
    assert [len(r) for r in out.ids] == [2, 5, 0] and out.finish == ["length"] * 3
    asked = []
    out = generate(model, _Tok(), ids, mask, max_new_tokens=10, stop_rule="eos",
                   cancel=lambda: asked.append(1) or len(asked) > 3)
    assert [len(r) for r in out.ids] == [3, 3, 3] and out.finish == ["cancelled"] * 3
    draw = lambda seed: generate(model, _Tok(), ids, mask, max_new_tokens=8, stop_rule="eos",  # noqa: E731
                                 sampling=Sampling(1.0, 0.95, seed)).ids
    assert draw(3) == draw(3) and draw(3) != draw(4)


def test_a_new_technique_is_one_session_subclass():
    """The extension point docs/concepts/architecture.md describes: a technique that only changes the scores."""
    from contextlib import contextmanager

    class Forbid(Session):
        def __init__(self, model, banned):
            super().__init__(model)
            self.banned = banned

        def scores(self, logits):
            return logits.index_fill(-1, torch.tensor(self.banned), float("-inf")), None

    class Banned:
        def __init__(self, banned):
            self.banned = banned

        @contextmanager
        def prepare(self, model):
            yield Forbid(model, self.banned)

    model = tiny_model("llama", kv_heads=2)
    p = _prompts()[0]
    plain = generate(model, _Tok(), p, max_new_tokens=6, stop_rule="eos").ids[0]
    banned = generate(model, _Tok(), p, technique=Banned(plain[:2]), max_new_tokens=6, stop_rule="eos").ids[0]
    assert not set(plain[:2]) & set(banned) and banned != plain


def test_one_stop_string_rule_for_the_loop_and_the_server(embedded):
    from attnkit.core.generate import first_stop
    from attnkit.serve.engine import Engine, Job, Params, Row

    assert first_stop("\n\nParis\nLondon", ["\n"]) == 7  # the opening newlines never end an answer
    assert first_stop("ab STOP cd END", ["END", "STOP"]) == 3  # the earliest of several
    assert first_stop("ab STOP cd STOP", ["STOP"], start=4) == 11 and first_stop("  ", ["\n"]) == -1
    model, tok = embedded
    newline, word = tok.encode("\n", add_special_tokens=False), tok.encode("Paris", add_special_tokens=False)
    events = []
    engine = Engine(model, tok, max_batch=1)
    try:
        row = Row(Job([1, 2], Params(max_new_tokens=20, stop=["\n"]), events.append), tok, "cpu")
        taken = [engine._take(row, t) for t in newline + word + newline]
    finally:
        engine.close(wait=5)
    assert taken[:-1] == [None] * (len(taken) - 1) and taken[-1] == "stop"  # the server cuts where the loop does
    assert row.text.strip() == "Paris" and row.text.lstrip() == answer_text(tok, newline + word + newline, ("\n",))
