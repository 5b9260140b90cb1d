"""One prefill shared by many caches (kvcache/fork.py) gives what each cache's own prefill gives."""

import json

import pytest
import torch

from attnkit.core.family import architecture
from attnkit.core.generate import PLAIN, generate
from attnkit.kvcache.config import HeadKVConfig
from attnkit.errors import AttnkitError
from conftest import tiny_model
from test_generate import _Tok

TOK = _Tok()


def _configs(model):
    arch = architecture(model.config)
    heads = [(l, h) for l in arch.full_layers for h in range(arch.kv_heads)]
    full = frozenset(heads[:2])
    rest = [k for k in heads if k not in full]
    return {
        "plain": None,
        "full heads + window": HeadKVConfig(full, sink=2, window=6, prefill="full"),
        "every head windowed": HeadKVConfig(frozenset(), sink=1, window=5, prefill="full"),
        "compensated": HeadKVConfig(full, sink=2, window=6, prefill="full", compensate=True),
        "token budgets": HeadKVConfig(frozenset(heads[:1]), sink=2, window=6, prefill="full",
                                      budgets=tuple((k, 3 + i) for i, k in enumerate(rest)), select_window=8,
                                      select_kernel=3),
    }


def _prompts(vocab, pad):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0  # the second row is shorter: left padding
    return ids, mask


@pytest.mark.parametrize("family,kv", [("llama", 2), ("qwen2", 1), ("gemma3", 2)])
@pytest.mark.parametrize("chunk", [None, 16])
def test_every_cache_from_one_prefill_decodes_what_its_own_prefill_decodes(family, kv, chunk):
    model = tiny_model(family, kv)
    ids, mask = _prompts(model.config.vocab_size, 7)
    shared = HeadKVConfig.prefill_once(model, ids, mask, chunk=chunk, select_window=12)  # more than the caches ask
    outputs = {}
    for name, cfg in _configs(model).items():
        if cfg is not None and chunk:
            cfg = HeadKVConfig(**{**cfg.__dict__, "prefill_chunk": chunk})
        alone = generate(model, TOK, ids, mask, cfg, 12, stop_rule="eos", prefill_chunk=chunk)
        forked = generate(model, TOK, ids, mask, cfg, 12, stop_rule="eos", prefilled=shared.start(model, cfg))
        assert forked.ids == alone.ids, name
        outputs[name] = alone.ids
    # the caches differ in what they decode, so equality above is not the same answer everywhere
    assert len({str(v) for v in outputs.values()}) > 1


def test_kept_tokens_and_bytes_equal_the_own_prefill():
    model = tiny_model("llama", 2)
    ids, mask = _prompts(model.config.vocab_size, 4)
    cfg = _configs(model)["token budgets"]
    shared = HeadKVConfig.prefill_once(model, ids, mask, select_window=8)
    forked = shared.start(model, cfg).cache
    with cfg.prepare(model) as session:
        from attnkit.core.generate import prefill
        own = session.new_cache()
        prefill(model, ids, mask, own)
    assert forked.kv_bytes() == own.kv_bytes()
    for a, b in zip(forked.layers, own.layers):
        assert a.kept_middle() == b.kept_middle()
        assert torch.equal(a.win_pos, b.win_pos)


def test_a_shared_prefill_refuses_what_it_cannot_serve():
    from attnkit.buckets import BucketsConfig

    model = tiny_model("llama", 2)
    ids, mask = _prompts(model.config.vocab_size, 0)
    shared = HeadKVConfig.prefill_once(model, ids, mask, select_window=4)
    with pytest.raises(AttnkitError, match="prefill 'full'"):
        shared.start(model, HeadKVConfig(frozenset({(0, 0)}), prefill="window"))
    with pytest.raises(AttnkitError, match="not BucketsConfig"):
        shared.start(model, BucketsConfig([10_000.0, 20_000.0]))
    heads = [(l, h) for l in range(3) for h in range(2)]
    with pytest.raises(AttnkitError, match="last 4 queries"):
        shared.start(model, HeadKVConfig(frozenset(), prefill="full", budgets=((heads[0], 2),), select_window=8))
    # a fork is its own: decoding one leaves the shared prefill as it was for the next
    first = generate(model, TOK, ids, mask, PLAIN, 5, stop_rule="eos", prefilled=shared.start(model))
    again = generate(model, TOK, ids, mask, PLAIN, 5, stop_rule="eos", prefilled=shared.start(model))
    assert first.ids == again.ids


def test_a_niah_grid_of_several_caches_prefills_each_prompt_once_with_the_answers_of_one_prefill_each(
        embedded, tmp_path, monkeypatch):
    import attnkit.kvcache.fork as kvfork
    from attnkit.evals import niah as N
    from attnkit.evals.systems import System

    model, tok = embedded
    arch = architecture(model.config)
    heads = [(l, h) for l in arch.full_layers for h in range(arch.kv_heads)]
    systems = [System("full", {"cache": "full"}),
               System("a few full", {"cache": "a few full"},
                      HeadKVConfig(frozenset(heads[:3]), sink=4, window=16, prefill="full", prefill_chunk=256)),
               System("budgets", {"cache": "budgets"},
                      HeadKVConfig(frozenset(heads[:1]), sink=4, window=16, prefill="full", prefill_chunk=256,
                                   budgets=tuple((k, 12) for k in heads[1:])))]
    grid = N.Grid(N.passkey_needles()[:3], N.load_haystack(), [400], [30, 70])
    seen, once = [], kvfork.record_prefill
    monkeypatch.setattr(kvfork, "record_prefill", lambda *a, **k: seen.append(1) or once(*a, **k))
    shared = N.compare_systems(model, tok, grid, systems, tmp_path / "rows.jsonl", quiet=True)
    assert len(seen) == 6  # one prefill per prompt, not per system
    alone = N.compare_systems(model, tok, grid, systems, quiet=True, share_prefill=False)
    assert len(seen) == 6
    for s in systems:
        assert shared[s.name]["recalls"] == alone[s.name]["recalls"], s.name
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines() if '"cache"' in x]
    answers = {s.name: [r["answer"] for r in rows if r["cache"] == s.name] for s in systems}
    assert answers["budgets"] != answers["full"] or answers["a few full"] != answers["full"]  # the caches differ
    again = N.compare_systems(model, tok, grid, systems, tmp_path / "rows.jsonl", quiet=True)
    assert again == shared and len(seen) == 6  # resumed from the file, nothing rerun
    with pytest.raises(AttnkitError, match="full prefill"):
        N.shared_prefill_of([systems[0], System("window", {"cache": "w"}, HeadKVConfig(sink=4, window=16))])
