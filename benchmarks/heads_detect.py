"""Speed of a retrieval-head detection trial, side by side on the same prompt and tokens:

  (a) attnkit detection trial: sdpa prefill + greedy decode with the hook's top-1 probes on
  (b) plain sdpa prefill + greedy decode of the same number of tokens (no hook)
  (c) the naive approach: eager attention with output_attentions=True at every decode step

    python benchmarks/heads_detect.py --model embedded --lengths 512,1024,2048
    python benchmarks/heads_detect.py --model llama7b --lengths 8192,32768 --dtype bfloat16 --device cuda

`--model llama7b` builds a random-init Llama-2-7B-shaped model (32 layers, 32 heads, 4096 hidden); speed
does not depend on the weights. Prints one JSON line per length with times and the ratios a/b and c/a.
"""

from __future__ import annotations

import argparse
import torch

from attnkit.core.decode import cache_kwarg
from _common import Record, add_record_option, build, timed
from transformers import DynamicCache

from attnkit.core.decode import last_logits_only
from attnkit.core.hook import Probe, intervene


def top1_per_head(attentions, loop: bool):
    """What the naive detector reads each step: the top-1 key of every layer's heads. `loop` does it
    as the authors' code does, one head at a time with a host round trip each."""
    if not loop:
        return [a[0, :, -1].argmax(-1) for a in attentions]
    return [[int(a[0, h, -1].topk(1).indices) for h in range(a.shape[1])] for a in attentions]


@torch.no_grad()
def decode(model, ids, steps, output_attentions=False, loop=False):
    """Prefill then `steps` forced decode steps (token 1 each time, so all variants do identical work).
    The naive detector reads attentions on decode steps only, as the authors' code does: returning the
    prefill's [heads x tokens x tokens] maps of every layer would not fit at any long context."""
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, **cache_kwarg(model, cache), use_cache=True, **last_logits_only(model))
    token = torch.ones(1, 1, dtype=torch.long, device=ids.device)
    for _ in range(steps):
        out = model(input_ids=token, **cache_kwarg(model, cache), use_cache=True, output_attentions=output_attentions)
        if output_attentions:
            top1_per_head(out.attentions, loop)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--lengths", default="512,1024,2048")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-loop", action="store_true",
                    help="(c) reads the top-1 head by head with a host sync each, as the authors' code")
    ap.add_argument("--skip-naive-above", type=int, default=1 << 30, help="skip (c) above this length")
    add_record_option(ap, "heads_detect")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    model = build(args.model, args.device, dtype)
    rec = Record(args, "heads_detect", {"steps": args.steps, "repeats": args.repeats})
    for length in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(3, model.config.vocab_size, (1, length), device=args.device)

        def trial():
            with intervene(model, probe=Probe(top_k=1, prefill_last=True)) as ctl:
                decode(model, ids, args.steps)
            ctl.positions()

        try:
            a = timed(trial, args.device, args.repeats)
            b = timed(lambda: decode(model, ids, args.steps), args.device, args.repeats)
        except torch.OutOfMemoryError:
            rec.emit({"length": length, "trial_s": "out of memory"})
            break
        row = {"length": length, "steps": args.steps, "trial_s": round(a, 4), "plain_s": round(b, 4),
               "trial_over_plain": round(a / b, 3)}
        if args.device.startswith("cuda"):
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            torch.cuda.reset_peak_memory_stats()
        if length <= args.skip_naive_above:
            model.set_attn_implementation("eager")
            try:
                c = timed(lambda: decode(model, ids, args.steps, output_attentions=True, loop=args.naive_loop), args.device, args.repeats)
                row.update(naive_s=round(c, 4), naive_over_trial=round(c / a, 2))
            except torch.OutOfMemoryError:
                row["naive_s"] = "out of memory"
            finally:
                model.set_attn_implementation("sdpa")
        rec.emit(row)


if __name__ == "__main__":
    main()
