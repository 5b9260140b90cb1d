"""Attention Buckets speed, side by side on the same prompt: the plain model vs N = 1, 2, 4, 6 bases.

For each variant: prefill time of the prompt, and decode latency per token (greedy, the chosen
token fed back to every base's row, base weights combined at every step).

    python benchmarks/buckets.py --model embedded --length 2000
    python benchmarks/buckets.py --model llama7b --device cuda --dtype bfloat16 --length 4096

`--model llama7b` builds a random-init Llama-2-7B-shaped model (speed does not depend on weights).
Prints one JSON line per variant with its time and the ratio to the plain model.
"""

from __future__ import annotations

import argparse

import torch

from attnkit.core.decode import cache_kwarg
from _common import Record, add_record_option, build, timed
from transformers import DynamicCache

from attnkit.buckets import BucketedModel, BucketsConfig
from attnkit.core.decode import last_logits_only

BASES = [10000.0, 17500.0, 18000.0, 19000.0, 20000.0, 25000.0]


class _NoTokenizer:
    eos_token_id = None


@torch.no_grad()
def plain_prefill(model, ids):
    model(input_ids=ids, **cache_kwarg(model, DynamicCache(config=model.config)), use_cache=True, **last_logits_only(model))


@torch.no_grad()
def plain_generate(model, ids, steps):
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, **cache_kwarg(model, cache), use_cache=True, **last_logits_only(model))
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(input_ids=token, **cache_kwarg(model, cache), use_cache=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--ns", default="1,2,4,6")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    add_record_option(ap, "buckets")
    args = ap.parse_args()
    model = build(args.model, args.device, getattr(torch, args.dtype))
    model.generation_config.eos_token_id = None  # every variant decodes exactly --steps tokens
    rec = Record(args, "buckets", {"length": args.length, "steps": args.steps, "repeats": args.repeats})
    ids = torch.randint(3, model.config.vocab_size, (1, args.length), device=args.device)

    pre = timed(lambda: plain_prefill(model, ids), args.device, args.repeats)
    full = timed(lambda: plain_generate(model, ids, args.steps), args.device, args.repeats)
    per_token = (full - pre) / args.steps
    rec.emit({"variant": "plain", "prefill_s": round(pre, 4), "decode_ms_per_token": round(1e3 * per_token, 2)})
    for n in [int(x) for x in args.ns.split(",")]:
        bm = BucketedModel(model, _NoTokenizer(), BucketsConfig(BASES[:n]))
        # prefill = generation of one token (prefill + one combine), through the same code path as the
        # full generation, so that their difference is the decode steps alone
        p = timed(lambda: bm.generate_ids(ids, max_new_tokens=1), args.device, args.repeats)
        g = timed(lambda: bm.generate_ids(ids, max_new_tokens=args.steps + 1), args.device, args.repeats)
        d = (g - p) / args.steps
        rec.emit({"variant": f"buckets N={n}", "prefill_s": round(p, 4), "prefill_over_plain": round(p / pre, 2),
                  "decode_ms_per_token": round(1e3 * d, 2), "decode_over_plain": round(d / per_token, 2)})


if __name__ == "__main__":
    main()
