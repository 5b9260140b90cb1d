"""Continuous batching in the server's engine: requests that join a running batch at different
times, with prompts of different lengths, get row for row the tokens each gets alone (greedy,
float32), for the plain model, a hybrid sliding-window model, the retrieval-head KV cache and
Attention Buckets; cancelled rows leave within one step; one row's error ends that row only."""

import queue
import time

import pytest
import torch
from conftest import tiny_model
from test_generate import _Tok

from attnkit.buckets import BucketsConfig
from attnkit.core.generate import generate
from attnkit.kvcache.config import HeadKVConfig
from attnkit.serve.engine import Engine, Job, Params


class _Collect:
    def __init__(self):
        self.events = queue.Queue()
        self.parts, self.done = [], None

    def wait(self, timeout=60):
        while self.done is None:
            ev = self.events.get(timeout=timeout)
            if ev.kind == "text":
                self.parts.append(ev.text)
            else:
                self.done = ev
        return "".join(self.parts), self.done

    def first(self, timeout=60):
        ev = self.events.get(timeout=timeout)
        self.events.queue.appendleft(ev)


class _Gated(Engine):
    """Holds the worker once, at the first row's third token, until the test says go."""

    def __init__(self, *args, **kwargs):
        import threading
        self.paused, self.go = threading.Event(), threading.Event()
        super().__init__(*args, **kwargs)

    def choose(self, row, scores):
        if row.count == 3 and not self.go.is_set():
            self.paused.set()
            self.go.wait(30)
        return super().choose(row, scores)


def _submit(engine, ids, **params):
    c = _Collect()
    job = Job(ids, Params(**params), emit=c.events.put)
    engine.submit(job)
    return c, job


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


def _alone(model, technique, ids, steps):
    out = generate(model, _Tok(), torch.tensor([ids]), None, technique, steps, stop_rule="eos").ids[0]
    return _Tok().decode(out)


@pytest.mark.parametrize("family,technique", [
    ("llama", None), ("gemma3", None), ("qwen2", "kv"), ("gemma3", "kv"), ("llama", "budgets"), ("llama", "buckets")])
def test_rows_that_join_a_running_batch_get_the_tokens_they_get_alone(family, technique):
    model = tiny_model(family, kv_heads=1 if family == "qwen2" else 2)
    technique = {"kv": HeadKVConfig(full={(0, 0)}, sink=2, window=5, prefill_chunk=8),
                 "budgets": HeadKVConfig(full={(0, 0)}, sink=2, window=5, prefill_chunk=8, prefill="full",
                                         budgets={(0, 1): 3, (1, 1): 6}, select_window=4),
                 "buckets": BucketsConfig([10000.0, 2500.0]), None: None}[technique]
    engine = _Gated(model, _Tok(), technique, 256, max_batch=8)
    prompts = _prompts([30, 11, 19, 6, 25])
    budgets = [20, 6, 14, 9, 3]  # rows finish at different steps: the batch shrinks and is trimmed
    first, _ = _submit(engine, prompts[0], max_new_tokens=budgets[0])
    assert engine.paused.wait(30)  # the first row is 3 tokens in: the others join it (other lengths, later)
    rest = [_submit(engine, p, max_new_tokens=b)[0] for p, b in zip(prompts[1:], budgets[1:])]
    engine.go.set()
    texts = [c.wait()[0] for c in [first, *rest]]
    engine.close(wait=30)
    assert model.config._attn_implementation == "sdpa"  # the technique is undone once the batch empties
    assert engine.stats["peak_batch"] > 1 and engine.stats["failed"] == 0
    assert texts == [_alone(model, technique, p, b) for p, b in zip(prompts, budgets)]


def test_a_cancelled_row_leaves_within_one_step_and_an_error_ends_one_row():
    class Faulty(Engine):
        def choose(self, row, scores):
            if row.p.seed == 666 and row.count == 2:
                raise RuntimeError("boom")
            return super().choose(row, scores)

    model = tiny_model("llama")
    engine = Faulty(model, _Tok(), None, 256, max_batch=8)
    long, job = _submit(engine, _prompts([10])[0], max_new_tokens=200)  # still running when the others end
    long.first()
    bad, _ = _submit(engine, _prompts([12], 1)[0], max_new_tokens=8, temperature=1.0, seed=666)
    good, _ = _submit(engine, _prompts([7], 2)[0], max_new_tokens=8)
    assert bad.wait()[1].kind == "error" and "boom" in bad.done.text
    text, done = good.wait()
    assert done.kind == "done" and text == _alone(model, None, _prompts([7], 2)[0], 8)
    steps = engine.stats["steps"]
    job.cancelled.set()
    deadline = time.time() + 30
    while engine.rows and time.time() < deadline:
        time.sleep(0.005)
    assert not engine.rows and engine.stats["steps"] - steps <= 2  # gone at the next step boundary
    assert engine.stats["cancelled"] == 1 and engine.stats["failed"] == 1
    engine.close()


def test_a_buckets_request_is_counted_as_one_row_per_base():
    """Attention Buckets run each prompt as N model rows (one per RoPE base): the server's KV budget
    counts N caches per request, so a budget of 6 plain requests admits 2 requests with 3 bases."""
    from attnkit.buckets import BucketsConfig

    model = tiny_model("llama")
    plain, buckets = Engine(model, _Tok(), None, 256), Engine(model, _Tok(), BucketsConfig([1e4, 2e4, 4e4]), 256)
    assert buckets.kv_bytes_for(200) == 3 * plain.kv_bytes_for(200)
    buckets.max_kv_bytes = 6 * plain.kv_bytes_for(200)
    cs = [_submit(buckets, p, max_new_tokens=150)[0] for p in _prompts([50] * 4, 3)]
    assert all(c.wait()[1].kind == "done" for c in cs)
    buckets.close()
    assert buckets.stats["peak_batch"] == 2


def test_admission_follows_the_kv_budget_and_the_smaller_cache_admits_more_rows():
    model = tiny_model("llama")
    narrow = HeadKVConfig(full=set(), sink=2, window=4)
    plain, kv = Engine(model, _Tok(), None, 256, max_batch=64), Engine(model, _Tok(), narrow, 256, max_batch=64)
    budget = 6 * plain.kv_bytes_for(200)
    for e in (plain, kv):
        e.max_kv_bytes = budget
        cs = [_submit(e, p, max_new_tokens=150)[0] for p in _prompts([50] * 12, 3)]
        assert all(c.wait()[1].kind == "done" for c in cs)
        e.close()
    assert plain.stats["peak_batch"] == 6 and kv.stats["peak_batch"] == 12
