"""Retrieval-head KV cache vs the full cache, side by side on the same prompt.

For each context length and each cache: KV bytes held after the prompt, peak device memory (CUDA)
or resident memory after the prefill (CPU), prefill time (both prefill in chunks of --chunk tokens, so
they differ only by the cache), and decode latency per token, each decode step timed on its own. Speed and memory do not depend on which heads are chosen, so without
--scores a seeded random quarter of the KV heads keeps the full cache.

    python benchmarks/kv_cache.py --model embedded --lengths 512,1024,2048
    python benchmarks/kv_cache.py --model llama7b --device cuda --dtype bfloat16 --lengths 32768,100000 --find-max

`--find-max` also doubles the context (then bisects) until each cache runs out of device memory.
Prints one JSON line per (length, cache) with ratios to the full cache.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import replace

import torch

from attnkit.core.decode import cache_kwarg
from _common import Record, add_record_option, build, sync
from transformers import DynamicCache

from attnkit.core.family import architecture
from attnkit.core.generate import prefill
from attnkit.kvcache.cache import HeadKVCache, head_kv
from attnkit.kvcache.config import HeadKVConfig


def choose(model, fraction: float, seed: int, scores_path: str | None) -> frozenset:
    cfg = model.config
    if scores_path:
        from attnkit.kvcache.plan import choose_full_heads
        from attnkit.heads.scores import load_scores
        return choose_full_heads(load_scores(scores_path), cfg, "retrieval", fraction)
    arch = architecture(cfg)  # hybrid models: only full-attention layers can hold a full cache
    heads = [(l, h) for l in arch.full_layers for h in range(arch.kv_heads)]
    return frozenset(random.Random(seed).sample(heads, round(fraction * len(heads))))


@torch.no_grad()
def run(model, ids, steps: int, chunk: int, cache):
    out = prefill(model, ids, None, cache, chunk)
    for _ in range(steps):
        out = model(input_ids=out.logits[:, -1].argmax(-1, keepdim=True), **cache_kwarg(model, cache), use_cache=True)
    return cache


def kv_bytes(cache) -> int:
    if hasattr(cache, "kv_bytes"):
        return cache.kv_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@torch.no_grad()
def measure(model, ids, args, new_cache) -> dict:
    """Prefill (best of --repeats) and each decode step timed on its own (median over every step of
    every repeat): a decode figure that cannot come out negative, unlike a difference of two runs."""
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    warm = ids[:, :args.warmup_tokens] if args.warmup_tokens else ids
    run(model, warm, 1, args.chunk, new_cache())  # warm-up
    prefill_s, steps_s, row = [], [], {}
    for _ in range(args.repeats):
        cache = new_cache()
        sync(args.device)
        t = time.perf_counter()
        out = prefill(model, ids, None, cache, args.chunk)
        sync(args.device)
        prefill_s.append(time.perf_counter() - t)
        row.update(kv_bytes=kv_bytes(cache), rss_after_prefill_mib=round(rss_mib(), 1))
        if hasattr(cache, "peak_kv_bytes"):  # the most it held at once during the prefill
            row["peak_kv_bytes"] = cache.peak_kv_bytes
        for _ in range(args.steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            out = model(input_ids=token, **cache_kwarg(model, cache), use_cache=True)
            sync(args.device)
            steps_s.append(time.perf_counter() - t)
        del cache, out
    if cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    row.update(prefill_s=round(min(prefill_s), 4), decode_ms_per_token=round(1e3 * statistics.median(steps_s), 2))
    return row


def fits(model, length, args, new_cache) -> bool:
    ids = torch.randint(3, model.config.vocab_size, (1, length), device=args.device)
    try:
        run(model, ids, 2, args.chunk, new_cache())
        sync(args.device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def longest(model, args, new_cache, start: int) -> int:
    lo, hi = 0, start
    while fits(model, hi, args, new_cache):
        lo, hi = hi, hi * 2
    while hi - lo > args.max_step:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(model, mid, args, new_cache) else (lo, mid)
    return lo


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--lengths", default="512,1024,2048")
    ap.add_argument("--full", type=float, default=0.25, help="fraction of KV heads with the full cache")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=4096, help="prefill chunk for both caches")
    ap.add_argument("--prefill", default="window", help="window, full or both (window,full): how window heads prefill "
                    "in the --full rows; none: no such row (only the full cache and the --memory rows)")
    ap.add_argument("--scores", default=None, help="choose heads from this score file (default: seeded random)")
    ap.add_argument("--memory", default="", help="memory targets too (fractions of the model's own cache, e.g. "
                    "0.25,0.1; needs --scores): full heads and token budgets planned at each length, full prefill")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup-tokens", type=int, default=0, help="prompt tokens of each cache's warm-up run (0: the "
                    "whole prompt; on a CPU a short one warms up as well and spares a long prefill per cache)")
    ap.add_argument("--find-max", action="store_true", help="longest context that fits, per cache (CUDA)")
    ap.add_argument("--max-step", type=int, default=16384, help="--find-max resolution (tokens)")
    add_record_option(ap, "kv_cache")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build(args.model, args.device, getattr(torch, args.dtype))
    full = choose(model, args.full, 0, args.scores)
    modes = [] if args.prefill == "none" else [p for p in args.prefill.split(",") if p]
    bad = [p for p in modes if p not in ("window", "full")]
    if bad:
        ap.error(f"--prefill: {bad[0]!r} is not window, full or none")
    base = HeadKVConfig(full, args.sink, args.window, args.chunk)
    configs = {p: replace(base, prefill=p) for p in modes}
    rec = Record(args, "kv_cache", {"full_fraction": args.full, "sink": args.sink, "window": args.window,
                      "chunk": args.chunk, "steps": args.steps, "repeats": args.repeats, "prefill": args.prefill,
                      "scores": args.scores, "memory": args.memory, "warmup_tokens": args.warmup_tokens})
    targets = []
    if args.memory:
        if not args.scores:
            ap.error("--memory ranks the KV heads by importance: give --scores")
        from attnkit.kvcache.plan import load_score_sets, plan
        targets = [plan(load_score_sets(args.scores), model.config, memory=float(m), sink=args.sink,
                        window=args.window, prefill_chunk=args.chunk, prefill_mode="full")
                   for m in args.memory.split(",") if m.strip()]
    with head_kv(model, next(iter(configs.values()), base)):
        caches = {"full cache": lambda: DynamicCache(config=model.config)}
        for p, config in configs.items():
            caches[f"retrieval-head cache, {p} prefill"] = lambda config=config: HeadKVCache(model, config)
        for length in [int(x) for x in args.lengths.split(",")]:
            if length > architecture(model.config).max_positions:
                rec.emit({"length": length, "skipped": "above the model's max positions"})
                continue
            ids = torch.randint(3, model.config.vocab_size, (1, length), device=args.device)
            rows = {}
            at_length = dict(caches)
            for target in targets:  # planned at this length: the most important heads full, token budgets
                plan_here = target.resolve(architecture(model.config), length)
                at_length[f"memory {target.memory:g}, full prefill"] = lambda c=plan_here: HeadKVCache(model, c)
            for name, new_cache in at_length.items():
                try:
                    rows[name] = measure(model, ids, args, new_cache)
                except torch.OutOfMemoryError:
                    rows[name] = {"out_of_memory": True}
                    torch.cuda.empty_cache()
                base, ours = rows["full cache"], rows[name]
                if name != "full cache" and "kv_bytes" in base and "kv_bytes" in ours:
                    ours.update(kv_over_full=round(ours["kv_bytes"] / base["kv_bytes"], 3),
                                prefill_over_full=round(ours["prefill_s"] / base["prefill_s"], 2),
                                decode_over_full=round(ours["decode_ms_per_token"] / base["decode_ms_per_token"], 2))
                    if "peak_gib" in ours:
                        ours["peak_over_full"] = round(ours["peak_gib"] / base["peak_gib"], 2)
                rec.emit({"length": length, "cache": name, **rows[name]})
        if args.find_max and args.device.startswith("cuda"):
            for name, new_cache in caches.items():
                rec.emit({"cache": name, "longest_context": longest(model, args, new_cache, 65536)})


if __name__ == "__main__":
    main()
