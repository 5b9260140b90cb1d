"""Runs kvpress presses on token ids exported by kv_vs_kvpress.py; executed in kvpress's own venv.

It imports no attnkit (kvpress 0.5.5 pins transformers < 5.3, attnkit tracks the latest): it reads a
job file (model folder, prompts as token ids, presses), and for every (press, ratio, prompt) not
yet in the output JSONL prefills the prompt under the press, decodes greedily without it, and
appends {press, ratio, prompt, ids, kv_bytes, prefill_s, decode_ms}. Decoding ends by attnkit's clean
rule (EOS, or a newline once the answer has begun), rebuilt here from the tokenizer; the caller
applies attnkit's own stopper to the ids again and scores them.

    venv/bin/python benchmarks/kvpress_worker.py JOB.json OUT.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def make_press(name: str, ratio: float, job: dict):
    import kvpress

    if name == "none":
        return None
    if name == "DuoAttentionPress":  # heads from the caller's scores, sink and window as attnkit's cache
        press = kvpress.DuoAttentionPress(head_compression_ratio=ratio)
        scores = np.array(job["duo_scores"], dtype=np.float32)  # [layers, kv heads]
        sink, recent = job["sink"], job["window"]

        def post_init(model):
            press.sink_size, press.recent_size = sink, recent
            n_pruned = round(scores.size * press.head_compression_ratio)
            mask = torch.zeros(scores.shape, dtype=torch.bool, device=model.device)
            if n_pruned > 0:
                order = np.argsort(scores, axis=None, kind="stable")[:n_pruned]  # the lowest scores stream
                mask[np.unravel_index(order, scores.shape)] = True
            press.streaming_mask = mask

        press.post_init_from_model = post_init
        return press
    return getattr(kvpress, name)(compression_ratio=ratio)


def kv_bytes(cache, streaming_fraction: float | None = None, sink_window: int = 0) -> int:
    total = 0
    for layer in cache.layers:
        if layer.keys is None:
            continue
        total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    if streaming_fraction is not None:  # DuoAttentionPress masks keys instead of freeing them: count what it keeps
        tokens = cache.layers[0].keys.shape[2]
        kept = (1 - streaming_fraction) * tokens + streaming_fraction * min(tokens, sink_window)
        total = round(total * kept / tokens)
    return total


def stop_sets(tokenizer) -> tuple[set[int], set[int]]:
    """Token ids that hold a newline, and those that are only whitespace: attnkit's clean stop rule
    (end at EOS, or at a newline once the answer has begun) without attnkit."""
    newline, blank = set(), set()
    for t in range(len(tokenizer)):
        text = tokenizer.decode([t])
        if "\n" in text:
            newline.add(t)
        if not text.strip():
            blank.add(t)
    return newline, blank


def run_one(model, ids: list[int], press, eos: set[int], max_new: int, job: dict, stops=(set(), set())) -> dict:
    from transformers import DynamicCache

    x = torch.tensor([ids])
    cache = DynamicCache(config=model.config)
    started = time.perf_counter()
    with torch.no_grad():
        if press is None:
            out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
        else:
            with press(model):
                out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - started
    is_duo = press is not None and type(press).__name__ == "DuoAttentionPress"
    size = kv_bytes(cache, press.streaming_mask.float().mean().item() if is_duo else None,
                    job["sink"] + job["window"])
    generated, steps, begun = [], [], False
    newline, blank = stops
    nxt = out.logits[0, -1].argmax().item()
    with torch.no_grad():
        for _ in range(max_new):
            generated.append(nxt)
            if nxt in eos or (begun and nxt in newline):
                break
            begun = begun or nxt not in blank
            t = time.perf_counter()
            # the position is the token's own: a pruned cache is shorter than the sequence, so the
            # model must not derive positions from the cache's length (kvpress's pipeline does the same)
            position = torch.tensor([[len(ids) + len(generated) - 1]])
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True, position_ids=position)
            steps.append(time.perf_counter() - t)
            nxt = out.logits[0, -1].argmax().item()
    if press is not None:
        for m in model.modules():  # DuoAttentionPress leaves key masks on the modules for decoding
            if hasattr(m, "masked_key_indices"):
                m.masked_key_indices = None
    return {"ids": generated, "kv_bytes": size, "prefill_s": round(prefill_s, 4),
            "decode_ms": round(1000 * statistics.median(steps), 3) if steps else None}


def main(job_path: str, out_path: str) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job.get("threads", 2))
    out = Path(out_path)
    done = set()
    if out.is_file():
        for line in out.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["press"], r["ratio"], r["prompt"]))
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
    stops = stop_sets(AutoTokenizer.from_pretrained(job["model"]))
    eos = set(job["eos"])
    todo = [(p["name"], p["ratio"], q) for p in job["presses"] for q in job["prompts"]
            if (p["name"], p["ratio"], q["id"]) not in done]
    print(f"kvpress worker: {len(todo)} runs to do, {len(done)} done", flush=True)
    with out.open("a") as f:
        for i, (name, ratio, prompt) in enumerate(todo):
            row = run_one(model, prompt["input_ids"], make_press(name, ratio, job), eos, job["max_new_tokens"], job, stops)
            f.write(json.dumps({"press": name, "ratio": ratio, "prompt": prompt["id"], **row}) + "\n")
            f.flush()
            if (i + 1) % 10 == 0 or i + 1 == len(todo):
                print(f"kvpress worker: {i + 1}/{len(todo)}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
