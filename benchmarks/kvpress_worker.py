"""Runs kvpress presses on token ids exported by kv_vs_kvpress.py or kv_ruler.py; executed in kvpress's
own venv.

It imports no attnkit (kvpress 0.5.5 pins transformers < 5.3, attnkit tracks the latest): it reads a
job file (model folder, prompts as token ids, presses), and for every (press, ratio, prompt) not
yet in the output JSONL prefills the prompt under the press, decodes greedily without it, and
appends {press, ratio, prompt, ids, kv_bytes, prefill_s, decode_ms} (or {press, ratio, prompt, error,
kv_bytes} where kvpress raised on that prompt). With job "probe", each press first runs one prompt
alone for its memory (`probe_one`: rows marked "probe"). Decoding ends by attnkit's clean
rule (EOS, or a newline once the answer has begun), rebuilt here from the tokenizer, or at EOS alone
(job "stop": "eos"); the caller applies attnkit's own rule to the ids again and scores them. With
job "shared_prefill", every press of a prompt compresses one prefill (`run_shared`: the same
answers, tested, at one prefill per prompt instead of one per press); a prompt may carry its own
"max_new_tokens", and "question_from": the index where its question starts, which then reaches the
cache only after the press compressed the tokens before it (query-agnostic, kvpress's own pipeline
setting). Presses that run passes of their own over the context (KVzipPress reconstructs it) run one
prefill each, also in the shared mode, and skip prompts marked "no_own_pass".

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

OWN_PASS = {"KVzipPress"}  # presses whose compression is more than one look at the prefill's keys


def make_press(name: str, ratio: float, job: dict):
    import kvpress

    if name == "none":
        return None
    if name.startswith("AdaKVPress(") and name.endswith(")"):  # AdaKV's head-wise budgets over a scorer
        return kvpress.AdaKVPress(getattr(kvpress, name[len("AdaKVPress("):-1])(compression_ratio=ratio))
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


def ask(model, cache, ids: list[int], split: int | None, logits):
    """The question [split:] through the compressed cache, at its own positions (the cache is shorter
    than the context it holds); without a split the prompt's own last logits."""
    if not split:
        return logits
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids[split:]]), past_key_values=cache, use_cache=True, logits_to_keep=1,
                     position_ids=torch.arange(split, len(ids))[None]).logits


def run_one(model, ids: list[int], press, eos: set[int], max_new: int, job: dict, stops=(set(), set()),
            split: int | None = None) -> dict:
    from transformers import DynamicCache

    x = torch.tensor([ids[:split] if split else ids])
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
    try:
        logits = ask(model, cache, ids, split, out.logits)
        generated, steps = _decode(model, cache, logits, len(ids), eos, max_new, stops, job.get("stop", "clean"))
    except ValueError as e:  # kvpress's masking finds no key that every question query ignores
        return {"error": str(e).splitlines()[0], "kv_bytes": size}
    finally:
        if press is not None:
            for m in model.modules():  # DuoAttentionPress leaves key masks on the modules for decoding
                if hasattr(m, "masked_key_indices"):
                    m.masked_key_indices = None
    return {"ids": generated, "kv_bytes": size, "prefill_s": round(prefill_s, 4),
            "decode_ms": round(1000 * statistics.median(steps), 3) if steps else None}


def held_bytes(cache) -> int:
    """Bytes of the keys and values the cache holds now (a masked key is still held)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


def probe_one(model, ids: list[int], press, eos: set[int], max_new: int, job: dict, stops) -> dict:
    """What kvpress's own process holds for one prompt under `press`, the prompt in one forward as
    kvpress's pipeline runs it: the keys and values held after the prompt, the most held at once (read
    after each layer's attention, before the press's hook compresses that layer) and the process's peak
    resident memory over the prefill and `max_new` decoding steps."""
    from transformers import DynamicCache

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _rss import PeakRSS

    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    cache = DynamicCache(config=model.config)
    peak = [0]

    def watch(module, _input, _kwargs, _output):
        peak[0] = max(peak[0], held_bytes(cache))

    hooks = [layer.self_attn.register_forward_hook(watch, with_kwargs=True) for layer in lm.layers]  # before the press's
    try:
        with PeakRSS() as rss, torch.no_grad():
            started = time.perf_counter()
            if press is None:
                out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
            else:
                with press(model):
                    out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
            prefill_s = time.perf_counter() - started
            held = held_bytes(cache)
            for h in hooks:
                h.remove()
            hooks = []
            _, steps = _decode(model, cache, out.logits, len(ids), eos, max_new, stops, "eos")
    finally:
        for h in hooks:
            h.remove()
        for m in model.modules():
            if hasattr(m, "masked_key_indices"):
                m.masked_key_indices = None
    return {"probe": True, "held_kv_bytes": held, "peak_kv_bytes": max(peak[0], held), "peak_rss_gib": rss.gib,
            "prefill_s": round(prefill_s, 3), "decode_ms": round(1000 * statistics.median(steps), 3) if steps else None}


def _decode(model, cache, logits, n_prompt: int, eos: set[int], max_new: int, stops, stop: str) -> tuple[list, list]:
    """Greedy decoding from a prefilled cache; ends by attnkit's clean rule or (stop "eos") at EOS only."""
    generated, steps, begun = [], [], False
    newline, blank = stops
    nxt = logits[0, -1].argmax().item()
    with torch.no_grad():
        for _ in range(max_new):
            generated.append(nxt)
            if nxt in eos or (stop == "clean" and begun and nxt in newline):
                break
            begun = begun or nxt not in blank
            t = time.perf_counter()
            position = torch.tensor([[n_prompt + len(generated) - 1]])  # the token's own position (see run_one)
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True, position_ids=position)
            steps.append(time.perf_counter() - t)
            nxt = out.logits[0, -1].argmax().item()
    return generated, steps


def run_shared(model, ids: list[int], specs: list[dict], presses: list, eos: set[int], max_new: int, job: dict,
               stops, split: int | None = None) -> list[dict]:
    """Every press of `presses` from one prefill of the prompt. A press compresses a layer's keys and
    values after that layer's attention has read the whole prompt, so the prefill's forward pass is
    the same under every press; a forward hook hands each layer's keys and values to every press's
    own `compress` (kvpress's public method, as its hook calls it) and keeps each result apart.
    Presses that mask keys instead of dropping them (DuoAttentionPress, AdaKVPress) leave
    `masked_key_indices` on the module, which is kept per press and set back before its decoding."""
    import copy

    from kvpress.presses.base_press import is_prefilling
    from transformers import DynamicCache

    x = torch.tensor([ids[:split] if split else ids])
    cache = DynamicCache(config=model.config)
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    kept: list[dict] = [{} for _ in presses]  # per press: layer -> (keys, values, masked key indices)
    timing = [0.0 for _ in presses]

    def hook(module, _input, kwargs, output):
        hidden = kwargs["hidden_states"]
        if not is_prefilling(kwargs["cache_position"], hidden.shape[1]):
            return output
        layer = cache.layers[module.layer_idx]
        for i, press in enumerate(presses):
            if press is None:
                continue
            module.masked_key_indices = None
            t = time.perf_counter()
            k, v = press.compress(module, hidden, layer.keys, layer.values, output[1], kwargs)
            timing[i] += time.perf_counter() - t
            kept[i][module.layer_idx] = (k, v, getattr(module, "masked_key_indices", None))
        module.masked_key_indices = None
        return output

    for press in presses:
        if press is not None:
            press.post_init_from_model(model)
    hooks = []
    for layer in lm.layers:
        layer.self_attn.rotary_emb = lm.rotary_emb
        hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        started = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - started - sum(timing)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    attn = {layer.self_attn.layer_idx: layer.self_attn for layer in lm.layers}
    for i, (spec, press) in enumerate(zip(specs, presses)):
        mine = copy.deepcopy(cache)  # the prompt's full cache; the press's layers replace their own
        masked = 0
        for idx, (k, v, indices) in kept[i].items():
            mine.layers[idx].keys, mine.layers[idx].values = k, v
            attn[idx].masked_key_indices = indices
            masked += 0 if indices is None else len(indices[0])
        held = [t for layer in mine.layers for t in (layer.keys, layer.values) if t is not None]
        # a masked key (and its value) is still in memory under kvpress; counted as freed, as a real
        # head-wise cache would free it
        size = sum(t.numel() * t.element_size() for t in held) - 2 * masked * held[0].shape[-1] * held[0].element_size()
        # what kvpress's own process holds: masked keys included; at its peak, the layers before one
        # compressed and that one's whole prompt, as its hook compresses each layer after its attention
        per_layer = [sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
                     for layer in mine.layers]
        whole = [sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
                 for layer in cache.layers]
        peak = max([sum(per_layer[:i]) + whole[i] for i in range(len(whole))] + [sum(per_layer)])
        try:
            logits = ask(model, mine, ids, split, out.logits)
            generated, steps = _decode(model, mine, logits, len(ids), eos, spec.get("max_new_tokens", max_new), stops,
                                       job.get("stop", "clean"))
        except ValueError as e:  # kvpress's masking finds no key that every question query ignores
            rows.append({"error": str(e).splitlines()[0], "kv_bytes": size})
            continue
        finally:
            for m in attn.values():
                m.masked_key_indices = None
        rows.append({"ids": generated, "kv_bytes": size, "held_kv_bytes": sum(per_layer), "peak_kv_bytes": peak,
                     "prefill_s": round(prefill_s, 4),
                     "compress_s": round(timing[i], 4), "prefill_shared_by": len(presses),
                     "decode_ms": round(1000 * statistics.median(steps), 3) if steps else None})
    return rows


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
                done.add((r["press"], r["ratio"], r["prompt"], r.get("probe", False)))
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
    stops = stop_sets(AutoTokenizer.from_pretrained(job["model"]))
    eos = set(job["eos"])
    todo = [(p["name"], p["ratio"], q) for p in job["presses"] for q in job["prompts"]
            if (p["name"], p["ratio"], q["id"], False) not in done and not (q.get("no_own_pass") and p["name"] in OWN_PASS)]
    print(f"kvpress worker: {len(todo)} runs to do, {len(done)} done", flush=True)
    probe = job.get("probe")  # {"prompt": id, "max_new_tokens": n}: each press's memory on that prompt alone
    if probe:
        prompt = next(q for q in job["prompts"] if q["id"] == probe["prompt"])
        with out.open("a") as f:
            for p in probe.get("presses", job["presses"]):
                if (p["name"], p["ratio"], prompt["id"], True) in done:
                    continue
                row = probe_one(model, prompt["input_ids"], make_press(p["name"], p["ratio"], job), eos,
                                probe["max_new_tokens"], job, stops)
                f.write(json.dumps({"press": p["name"], "ratio": p["ratio"], "prompt": prompt["id"], **row}) + "\n")
                f.flush()
                print(f"kvpress worker: memory of {p['name']} at {p['ratio']}: {row['peak_rss_gib']} GiB peak", flush=True)
    if job.get("shared_prefill"):  # one prefill per prompt for all of its presses still to do
        with out.open("a") as f:
            for n, prompt in enumerate(job["prompts"]):
                specs = [p for p in job["presses"] if (p["name"], p["ratio"], prompt["id"], False) not in done
                         and not (prompt.get("no_own_pass") and p["name"] in OWN_PASS)]
                if not specs:
                    continue
                budget, split = prompt.get("max_new_tokens", job["max_new_tokens"]), prompt.get("question_from")
                specs = [{**p, "max_new_tokens": budget} for p in specs]
                shared = [p for p in specs if p["name"] not in OWN_PASS]
                presses = [make_press(p["name"], p["ratio"], job) for p in shared]
                rows = list(zip(shared, run_shared(model, prompt["input_ids"], shared, presses, eos,
                                                   job["max_new_tokens"], job, stops, split))) if shared else []
                rows += [(p, run_one(model, prompt["input_ids"], make_press(p["name"], p["ratio"], job), eos, budget,
                                     job, stops, split)) for p in specs if p["name"] in OWN_PASS]
                for p, row in rows:
                    f.write(json.dumps({"press": p["name"], "ratio": p["ratio"], "prompt": prompt["id"], **row}) + "\n")
                f.flush()
                print(f"kvpress worker: prompt {n + 1}/{len(job['prompts'])}", flush=True)
        return
    with out.open("a") as f:
        for i, (name, ratio, prompt) in enumerate(todo):
            row = run_one(model, prompt["input_ids"], make_press(name, ratio, job), eos,
                          prompt.get("max_new_tokens", job["max_new_tokens"]), job, stops, prompt.get("question_from"))
            f.write(json.dumps({"press": name, "ratio": ratio, "prompt": prompt["id"], **row}) + "\n")
            f.flush()
            if (i + 1) % 10 == 0 or i + 1 == len(todo):
                print(f"kvpress worker: {i + 1}/{len(todo)}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
