"""The retrieval-head KV cache on RULER's tasks: full cache, heads by the recipe, random heads of the
same count, every head windowed, and token budgets inside the window heads, on the same generated prompts.

    python benchmarks/kv_ruler.py --model smollm2-135m-instruct \
        --scores results/study/smollm2-135m-instruct/head_scores.json \
        --tasks niah_single_1,niah_multikey_1 --lengths 4096 --samples 24 --no-all-window \
        --haystack ../shared/data/retrieval_head/PaulGrahamEssays

`--kvpress PRESS,...` adds NVIDIA kvpress's presses on the same token ids at each `--kvpress-targets`
memory (compression ratio 1 - target), run in kvpress's own venv (created once, see
kv_vs_kvpress.py); `AdaKVPress(SnapKVPress)` wraps a scorer, `DuoAttentionPress` is given attnkit's
combined head scores with attnkit's sink and window. Every cache of a prompt, attnkit's and
kvpress's alike, shares that prompt's one prefill (`core.kvfork`, and the worker's shared mode):
each compresses the same whole-prompt forward pass, so the answers equal separate prefills.

`--memory 0.5,0.25,0.125,0.1` adds attnkit's memory targets (the fraction of the model's own cache kept;
kvpress's compression ratio is 1 minus it): the full heads and token budgets chosen at each prompt's
length (`HeadKVConfig.resolve`). Memory is measured, not only counted: every attnkit system runs the
first prompt once more alone, the prompt in one forward (`--probe-tokens`), for the key and value bytes
held after it and at its peak and the process's peak resident memory; each press does the same in
kvpress's own process at `--probe-target`, and every press answer carries the bytes kvpress holds
(masked keys included) and the most it held at once.

`--question-after` prefills and compresses each prompt's context before its question arrives
(query-agnostic, kvpress's own pipeline setting), for attnkit's caches and kvpress's presses alike;
KVzipPress (query-agnostic by design: it scores keys by reconstructing the context) runs its own
passes per prompt.

Heads are chosen by the copy scores of --scores combined with echo and induction scores measured on the
model (the recipe, `--no-recipe`: the file alone), the cache trimmed after a whole-prompt prefill.
`--token-budgets RATIO:FULL:SPLIT,...` adds caches at RATIO of the model's own KV memory (at the longest
length): the top FULL fraction of KV heads full, every other KV head keeping sink + window plus a token
budget (the per-head average that reaches RATIO), shared by importance or evenly (SPLIT: importance |
uniform), the tokens chosen by the prompt's last 64 queries (SnapKV inside each head), their scores
pooled over KERNEL neighbouring positions (default 5, SnapKV's). Per
system and length: KV memory against the model's own cache, each task's mean RULER score with its 95%
bootstrap interval and n, the NIAH average, and the paired difference from the full cache. The
trials go to --trials as they finish (a rerun resumes, and refuses other settings); the summary rows go
to the record file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from _common import Record, add_record_option

from attnkit.kvcache.config import HeadKVConfig
from attnkit.core.loading import load_model
from attnkit.errors import AttnkitError
from attnkit.evals import ruler as R
from attnkit.evals import stats
from attnkit.evals.systems import System
from attnkit.core.family import architecture
from attnkit.kvcache.compare import kv_ratio, label
from attnkit.kvcache.plan import RECIPE, budget_for_ratio, load_score_sets, plan
from attnkit.heads.patterns import pattern_scores


def systems_for(model, tok, scores_path: str, budgets: list[float], sink: int, window: int, chunk: int,
                recipe: bool, all_window: bool = True, random_at: list[float] | None = None,
                token_budgets: list[tuple[float, float, str]] = (), tokens: int = 4096,
                memory: list[tuple[float, float]] = ()) -> list[tuple[System, HeadKVConfig | None]]:
    sets = load_score_sets(scores_path)
    if recipe:
        sets = sets + list(pattern_scores(model, tok))
    importance = "+".join(["copy", *RECIPE] if recipe else ["copy"])
    options = dict(sink=sink, window=window, prefill_chunk=chunk, prefill_mode="full")
    out = [(System("full cache", {"cache": "full"}), None)]
    if all_window:
        none = plan(sets, model.config, "none", 0.0, **options)
        out.append((System(label("none", 0.0, none), {"cache": label("none", 0.0, none)}, none), none))
    for full in budgets:
        chosen = plan(sets, model.config, "retrieval", full, **options)
        name = label("retrieval", full, chosen, importance=importance)
        out.append((System(name, {"cache": name}, chosen), chosen))
        if random_at is not None and full not in random_at:
            continue
        try:
            rand = plan(sets, model.config, "random", full, count=len(chosen.full), seed=0, **options)
        except AttnkitError as e:  # e.g. Gemma-3: every global layer's one KV head is a retrieval head
            print(f"no random-heads control at {full:g}: {e}")
            continue
        name = label("random", full, rand, heads=len(chosen.full))
        out.append((System(name, {"cache": name}, rand), rand))
    for ratio, full, split, *kernel in token_budgets:
        heads = plan(sets, model.config, "retrieval" if full > 0 else "none", full, **options)
        per_head = budget_for_ratio(ratio, len(heads.full), model.config, tokens, sink, window)
        cfg = plan(sets, model.config, "retrieval" if full > 0 else "none", full, **options, head_tokens=per_head,
                   split=split)
        if kernel:  # SnapKV's pooling over neighbouring positions, wider than its default
            cfg = dataclasses.replace(cfg, select_kernel=kernel[0])
        name = label("retrieval" if full > 0 else "none", full, cfg, importance=importance, split=split)
        out.append((System(name, {"cache": name, "head_tokens": per_head}, cfg), cfg))
    for target, memory_full in memory:  # a memory target: full heads and token budgets chosen at each prompt's length
        cfg = plan(sets, model.config, memory=target, memory_full=memory_full, **options)
        name = f"memory {target:g} ({importance}, {memory_full:g} of it on full heads) sink {sink} window {window}"
        out.append((System(name, {"cache": name, "memory": target}, cfg), cfg))
    return out


def probe_memory(model, tok, chosen, example, chat: bool, new_tokens: int, answer_prefix: bool) -> dict[str, dict]:
    """Each system's memory on one prompt run alone, the prompt in one forward: key and value bytes
    held after it and the most held at once (`HeadKVCache.peak_kv_bytes`; the model's own cache holds
    all of it), the process's peak resident memory over the prefill and `new_tokens` decoding steps,
    prefill seconds and median decoding ms per token."""
    import statistics
    import time

    from _rss import PeakRSS

    from attnkit.core.generate import prefill_prompt, step_logits, _session

    ids = example.encode(tok, chat, answer_prefix)[0]
    out = {}
    for system, _ in chosen:
        with PeakRSS() as rss, torch.no_grad():
            started = time.perf_counter()
            done = prefill_prompt(model, system.technique, ids, chunk=ids.shape[1])
            prefill_s = time.perf_counter() - started
            cache = done.cache
            held = cache.kv_bytes() if hasattr(cache, "kv_bytes") else sum(
                t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
                if isinstance(t, torch.Tensor))
            peak = max(getattr(cache, "peak_kv_bytes", held), held)
            steps, token = [], done.logits.argmax(-1)
            with _session(model, system.technique) as session:
                for _ in range(new_tokens):
                    t = time.perf_counter()
                    token = step_logits(model, session, cache, token).argmax(-1)
                    steps.append(time.perf_counter() - t)
        out[system.name] = {"held_kv_bytes": held, "peak_kv_bytes": peak, "peak_rss_gib": rss.gib,
                            "prefill_s": round(prefill_s, 3), "decode_ms": round(1000 * statistics.median(steps), 3),
                            "prompt_tokens": ids.shape[1]}
        print(f"memory of {system.name}: peak KV {peak / 2**20:.1f} MiB, peak RSS {rss.gib} GiB", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--scores", required=True, help="copy (retrieval) scores of this model, e.g. the study's")
    ap.add_argument("--tasks", default="niah_single_1,niah_single_2,niah_multikey_1,niah_multivalue")
    ap.add_argument("--lengths", default="4096")
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--other-samples", type=int, default=None, help="prompts per non-NIAH task (vt, cwe, fwe; "
                    "default: --samples): fewer where each is indicative only")
    ap.add_argument("--budgets", default="0.25", help="fractions of KV heads with the full cache")
    ap.add_argument("--random-at", default=None, help="fractions of --budgets with a random-heads row (default: all; 'none')")
    ap.add_argument("--token-budgets", default="", help="RATIO:FULL:SPLIT,... caches with token budgets (see above)")
    ap.add_argument("--memory", default="", help="memory targets, fractions of the model's own cache "
                    "(e.g. 0.5,0.25,0.125,0.1): full heads and token budgets chosen at each prompt's length; "
                    "TARGET:SHARE (e.g. 0.25:0.75) spends SHARE of that target on full heads instead of --memory-full")
    ap.add_argument("--memory-full", type=float, default=0.5, help="with --memory: the share of the target "
                    "spent on full heads")
    ap.add_argument("--probe-tokens", type=int, default=16, help="memory probe: every attnkit system (and each "
                    "press at --probe-target) runs the first prompt alone, the prompt in one forward, then decodes "
                    "this many tokens: held and peak KV bytes, peak resident memory, prefill s, decode ms/token "
                    "(0: no probe; the presses' held and peak KV bytes come with every answer anyway)")
    ap.add_argument("--probe-target", type=float, default=0.25, help="the --kvpress-targets memory at which "
                    "each press runs the memory probe (a prefill of its own each)")
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--haystack", type=Path, default=None, help="essays for the essay tasks (a .txt or a folder, "
                    "e.g. ../shared/data/retrieval_head/PaulGrahamEssays); default: attnkit's filler prose")
    ap.add_argument("--no-all-window", action="store_true", help="leave out the every-head-windowed row")
    ap.add_argument("--no-recipe", action="store_true", help="choose by the score file alone")
    ap.add_argument("--kvpress", default="", help="kvpress presses on the same prompts, e.g. "
                    "SnapKVPress,StreamingLLMPress,AdaKVPress(SnapKVPress),DuoAttentionPress")
    ap.add_argument("--kvpress-targets", default="0.3,0.15", help="KV memory of the presses (fractions of the full cache)")
    ap.add_argument("--kvpress-samples", type=int, default=None, help="the first N examples per task and length for "
                    "the presses (default: --samples); their paired differences use those prompts only")
    ap.add_argument("--own-pass-samples", type=int, default=None, help="presses that run passes of their own "
                    "over the context (KVzipPress) answer only the first N prompts per task (default: all)")
    ap.add_argument("--kvpress-venv", type=Path, default=Path(__file__).resolve().parent / ".kvpress-venv")
    ap.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill forward, every "
                    "system (0: the whole prompt at once; chunks spare a hybrid model's sliding layers)")
    ap.add_argument("--no-answer-prefix", action="store_true", help="under the chat template, ask the question "
                    "alone; default: the reply starts with RULER's answer prefix, as RULER and kvpress do")
    ap.add_argument("--question-after", action="store_true", help="compress each context before its question "
                    "arrives (query-agnostic, kvpress's default); default: the question inside the compressed prompt")
    ap.add_argument("--trials", type=Path, default=None, help="JSONL of every answer (default: beside the record)")
    ap.add_argument("--device", default="cpu")
    add_record_option(ap, "kv_ruler")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    budgets = [float(x) for x in args.budgets.split(",") if x.strip()]
    random_at = None if args.random_at is None else [] if args.random_at == "none" else \
        [float(x) for x in args.random_at.split(",")]
    token_budgets = []
    for spec in filter(None, (x.strip() for x in args.token_budgets.split(","))):
        try:
            ratio, full, split, *kernel = spec.split(":")
            token_budgets.append((float(ratio), float(full), split, *(int(k) for k in kernel[:1])))
            if len(kernel) > 1:
                raise ValueError
        except ValueError:
            ap.error(f"--token-budgets: {spec!r} is not RATIO:FULL:SPLIT[:KERNEL] (e.g. 0.27:0.1:importance)")
    memory = []
    for spec in filter(None, (x.strip() for x in args.memory.split(","))):
        try:
            target, share = (spec.split(":") + [str(args.memory_full)])[:2]
            memory.append((float(target), float(share)))
        except ValueError:
            ap.error(f"--memory: {spec!r} is not TARGET or TARGET:SHARE (e.g. 0.25 or 0.25:0.75)")
    args.dtype = "float32"
    model, tok = load_model(args.model, device=args.device, dtype=torch.float32)
    record = Record(args, "kv_ruler", {"tasks": tasks, "lengths": lengths, "samples": args.samples,
                                       "other_samples": args.other_samples,
                                       "scores": args.scores, "recipe": not args.no_recipe, "all_window": not args.no_all_window,
                                       "budgets": budgets, "random_at": random_at, "token_budgets": token_budgets,
                                       "memory": [t if f == args.memory_full else [t, f] for t, f in memory],
                                       "memory_full": args.memory_full, "sink": args.sink,
                                       "window": args.window, "prefill": "full (the whole prompt, then trimmed)",
                                       "prefill_chunk": args.prefill_chunk or "whole prompt",
                                       "question": "after compression (query-agnostic)" if args.question_after
                                       else "in the compressed prompt (query-aware)",
                                       "reply_prefix": "none (the question alone)" if args.no_answer_prefix
                                       else "RULER's answer prefix (chat models)",
                                       "haystack": args.haystack.name if args.haystack else "attnkit filler prose"})
    trials = args.trials or (record.path.with_name(record.path.stem + "_trials.jsonl") if record.path else None)
    chosen = systems_for(model, tok, args.scores, budgets, args.sink, args.window, args.prefill_chunk or max(lengths) + 256,
                         not args.no_recipe, not args.no_all_window, random_at, token_budgets, max(lengths),
                         memory)
    from attnkit.evals.niah import load_haystack
    essays = load_haystack(args.haystack) if args.haystack else None
    samples = {t: args.samples if t in R.NIAH_TASKS or args.other_samples is None else args.other_samples
               for t in tasks}
    rows = R.evaluate_ruler(model, tok, tasks, lengths, samples, [s for s, _ in chosen], trials, essays=essays,
                            prefill_chunk=args.prefill_chunk or None, question_after=args.question_after,
                            answer_prefix=not args.no_answer_prefix)
    from attnkit.core.decode import use_chat_template
    probe_example = R.make_example(tasks[0], tok, max(lengths), 0, essays, 0)
    probes = {}
    if args.probe_tokens:
        probes = probe_memory(model, tok, chosen, probe_example, use_chat_template(tok, None), args.probe_tokens,
                              not args.no_answer_prefix)
    press_rows, press_probes = [], {}
    if args.kvpress:
        job = kvpress_job(model, tok, args, tasks, lengths, essays, trials, samples)
        config = model.config
        del model  # kvpress's worker loads the model again: one copy in memory at a time
        import gc
        gc.collect()
        press_rows, press_probes = run_kvpress(tok, args, *job)
        model = SimpleNamespace(config=config)
    pairs = [c for c in chosen if c[1] is not None and c[1].full and not c[1].budgets]  # recipe, then its random
    controls = {a[0].name: b[0].name for a, b in zip(pairs, pairs[1:]) if b[0].name.startswith("random")
                and not a[0].name.startswith("random")}
    # each token-budget cache against the full-heads-only recipe cache nearest its memory (within 0.03x)
    plain = [(c[0].name, kv_ratio(c[1], model.config, max(lengths))) for c in pairs
             if not c[0].name.startswith("random")]
    same_memory = {}
    for system, cfg in chosen:
        if cfg is not None and cfg.budgets and plain:
            name, ratio = min(plain, key=lambda p: abs(p[1] - kv_ratio(cfg, model.config, max(lengths))))
            if abs(ratio - kv_ratio(cfg, model.config, max(lengths))) <= 0.03:
                same_memory[system.name] = name
    for L in lengths:
        def scores_of(name):
            return {(r["task"], r["index"]): r["score"] for r in rows if r["system"] == name and r["length"] == L}
        full = scores_of("full cache")
        for system, cfg in chosen:
            mine = [r for r in rows if r["system"] == system.name and r["length"] == L]
            keys = sorted((r["task"], r["index"]) for r in mine)
            by_key = {(r["task"], r["index"]): r["score"] for r in mine}
            niah = stats.bootstrap_mean([by_key[k] for k in keys if k[0] in R.NIAH_TASKS])
            diff = stats.paired_difference([full.get(k) for k in keys], [by_key[k] for k in keys])
            shown = cfg.resolve(architecture(model.config), L) if cfg is not None and cfg.memory else cfg
            record.emit({"length": L, "system": system.name, "full_heads": None if cfg is None else len(shown.full),
                         "head_tokens": system.fields.get("head_tokens", 0) or (
                             round(sum(n for _, n in shown.budgets) / len(shown.budgets)) if shown and shown.budgets else 0),
                         "kv_ratio": 1.0 if cfg is None else round(kv_ratio(cfg, model.config, L), 4),
                         "tasks": {t: stats.bootstrap_mean([r["score"] for r in mine if r["task"] == t]).as_dict()
                                   for t in tasks},
                         "niah_average": niah.as_dict(), "minus_full": diff.as_dict(),
                         **({"minus_random": stats.paired_difference(
                             [scores_of(controls[system.name]).get(k) for k in keys],
                             [by_key[k] for k in keys]).as_dict()} if system.name in controls else {}),
                         **({"minus_full_heads_same_memory": {"vs": same_memory[system.name], **stats.paired_difference(
                             [scores_of(same_memory[system.name]).get(k) for k in keys],
                             [by_key[k] for k in keys]).as_dict()}} if system.name in same_memory else {})})
        emit_presses(record, rows, press_rows, chosen, model.config, L, tasks)
        if L == max(lengths):
            emit_probes(record, probes, press_probes, L, tasks[0])
    if record.path is not None:
        plot(record.rows, record.path.with_suffix(".png"), args.model)


def kvpress_job(model, tok, args, tasks, lengths, essays, trials, samples: dict) -> tuple:
    """The kvpress worker's job for the RULER prompts attnkit answered (the same token ids): every
    press at every target, one prefill per prompt for all presses (the worker's shared mode), and with
    --probe-tokens each press's memory on the first prompt alone. Returns what `run_kvpress` needs."""
    from kv_vs_kvpress import count_for, duo_scores

    from attnkit.core.decode import eos_ids, use_chat_template
    from attnkit.core.models import pulled_path
    from attnkit.evals.runner import digest

    arch = architecture(model.config)
    chat = use_chat_template(tok, None)
    stop = () if chat else ("\n",)
    examples, prompts = {}, []
    for t in tasks:
        for L in lengths:
            for i in range(min(samples[t], args.kvpress_samples or samples[t])):
                ex = R.make_example(t, tok, L, i, essays, 0)
                ids = ex.encode(tok, chat, not args.no_answer_prefix)[0][0].tolist()
                key = f"{t}-{L}-{i}-{digest(ids)}"  # rows never mix prompts
                examples[key] = (t, L, i, ex, len(ids))
                prompts.append({"id": key, "input_ids": ids, "max_new_tokens": R.ANSWER_TOKENS.get(t, 128),
                                **({"no_own_pass": True} if args.own_pass_samples is not None
                                   and i >= args.own_pass_samples else {}),
                                **({"question_from": R.question_start(tok, ex, chat, not args.no_answer_prefix)}
                                   if args.question_after else {})})
    targets = [float(x) for x in args.kvpress_targets.split(",")]
    sets = load_score_sets(args.scores) + ([] if args.no_recipe else list(pattern_scores(model, tok)))
    duo = duo_scores(sets, arch)
    presses, target_of = [], {}
    tokens = max(lengths)
    for t in targets:
        for name in args.kvpress.split(","):
            if name == "DuoAttentionPress":  # the streaming share of heads that lands on the target
                n = count_for(model.config, t, tokens, args.sink, args.window)
                ratio = round(1 - n / (arch.layers * arch.kv_heads), 4)
            else:
                ratio = round(1 - t, 4)
            presses.append({"name": name, "ratio": ratio})
            target_of[(name, ratio)] = t
    out = trials.with_name(trials.stem + "_kvpress.jsonl")
    marker = out.with_suffix(".settings.json")
    mine = {"model": args.model, "sink": args.sink, "window": args.window, "stop": "eos" if chat else "clean",
            "chat_template": chat, "essays": digest(essays) if essays else "built-in prose",
            **({"question": "after compression"} if args.question_after else {}),
            **({"reply_prefix": "RULER's answer prefix"} if chat and not args.no_answer_prefix else {})}
    if marker.is_file() and json.loads(marker.read_text()) != mine:
        raise SystemExit(f"{out} holds kvpress rows of other settings ({marker.read_text().strip()}): move it away")
    marker.write_text(json.dumps(mine))
    job = {"model": str(pulled_path(args.model)), "eos": sorted(eos_ids(model, tok)), "sink": args.sink,
           "window": args.window, "max_new_tokens": 128, "duo_scores": duo, "presses": presses,
           "threads": torch.get_num_threads(), "stop": mine["stop"], "shared_prefill": True, "prompts": prompts,
           **({"probe": {"prompt": prompts[0]["id"], "max_new_tokens": args.probe_tokens,
                         "presses": [p for p in presses if target_of[(p["name"], p["ratio"])] == args.probe_target]}}
              if args.probe_tokens else {})}
    return job, out, examples, target_of, arch, stop


def run_kvpress(tok, args, job, out, examples, target_of, arch, stop) -> tuple[list[dict], dict]:
    """Runs the worker in kvpress's venv; rows {task, length, index, system, target, kv_ratio, answer,
    score} and {(press, target): memory probe}. The worker's answers resume from the file beside --trials,
    which holds rows of one prompt set and decoding only (a marker file says which)."""
    import os
    import subprocess

    from kv_vs_kvpress import ensure_kvpress_venv

    from attnkit.core.generate import answer_text
    from attnkit.kvcache.config import native_kv_bytes

    python = ensure_kvpress_venv(args.kvpress_venv)
    job_path = out.with_suffix(".job.json")
    job_path.write_text(json.dumps(job))
    subprocess.run([python, Path(__file__).resolve().parent / "kvpress_worker.py", job_path, out], check=True,
                   env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    job_path.unlink()
    rows, failed, probes = [], {}, {}
    for line in out.read_text().splitlines():
        r = json.loads(line)
        if r["prompt"] not in examples or (r["press"], r["ratio"]) not in target_of:
            continue  # another run's presses or prompts: left in the file, unused
        if r.get("probe"):
            if r["prompt"] == job.get("probe", {}).get("prompt"):
                probes[(r["press"], target_of[(r["press"], r["ratio"])])] = r
            continue
        if "error" in r:  # counted and left out of the press's rows (its n says how many it answered)
            failed.setdefault((r["press"], r["ratio"], r["error"]), []).append(r["prompt"])
            continue
        t, L, i, ex, n = examples[r["prompt"]]
        text = answer_text(tok, r["ids"], stop)
        rows.append({"task": t, "length": L, "index": i, "system": f"kvpress {r['press']}",
                     "target": target_of[(r["press"], r["ratio"])], "answer": text, "score": R.score(text, ex.answers),
                     "kv_ratio": r["kv_bytes"] / native_kv_bytes(arch, n, bytes_per_value=4),
                     **({"held_ratio": r["held_kv_bytes"] / native_kv_bytes(arch, n, bytes_per_value=4),
                         "peak_ratio": r["peak_kv_bytes"] / native_kv_bytes(arch, n, bytes_per_value=4)}
                        if "peak_kv_bytes" in r else {}),
                     "decode_ms": r["decode_ms"]})
    for (press, ratio, error), which in failed.items():
        print(f"kvpress {press} at ratio {ratio}: {len(which)} of {len(examples)} prompts skipped: {error}")
    return rows, probes


def emit_probes(record, probes: dict, press_probes: dict, L: int, task: str) -> None:
    """One row per system and press: its memory on the first prompt run alone (see `probe_memory`), and
    its KV bytes against the model's own cache on the same prompt."""
    full = probes.get("full cache", {}).get("held_kv_bytes")
    fields = ("held_kv_bytes", "peak_kv_bytes", "peak_rss_gib", "prefill_s", "decode_ms")
    for name, p in probes.items():
        record.emit({"length": L, "system": name, "memory_probe": {
            "prompt": f"{task} 0", **{k: p[k] for k in fields},
            **({"held_over_full": round(p["held_kv_bytes"] / full, 4),
                "peak_over_full": round(p["peak_kv_bytes"] / full, 4)} if full else {})}})
    for (press, target), p in press_probes.items():
        record.emit({"length": L, "system": f"kvpress {press} {target:g}", "press": press, "target": target,
                     "memory_probe": {"prompt": f"{task} 0", "process": "kvpress's own", **{k: p[k] for k in fields},
                                      **({"held_over_full": round(p["held_kv_bytes"] / full, 4),
                                          "peak_over_full": round(p["peak_kv_bytes"] / full, 4)} if full else {})}})


def emit_presses(record, rows, press_rows, chosen, model_config, L, tasks) -> None:
    """Summary rows of the presses at length L, and each attnkit cache against the best press at its
    memory (the press target nearest its own ratio, within 0.03x), paired over the same prompts."""
    if not press_rows:
        return
    def key(r):
        return r["task"], r["index"]
    full = {key(r): r["score"] for r in rows if r["system"] == "full cache" and r["length"] == L}
    best = {}
    for name, target in dict.fromkeys((r["system"], r["target"]) for r in press_rows if r["length"] == L):
        mine = [r for r in press_rows if (r["system"], r["target"], r["length"]) == (name, target, L)]
        by_key = {key(r): r["score"] for r in mine}
        keys = sorted(by_key)
        niah = stats.bootstrap_mean([by_key[k] for k in keys if k[0] in R.NIAH_TASKS])
        record.emit({"length": L, "system": f"{name} {target:g}", "press": name, "target": target,
                     "kv_ratio": round(sum(r["kv_ratio"] for r in mine) / len(mine), 4),
                     **({k: round(sum(r[k] for r in mine) / len(mine), 4) for k in ("held_ratio", "peak_ratio")}
                        if all("peak_ratio" in r for r in mine) else {}),
                     "tasks": {t: stats.bootstrap_mean([r["score"] for r in mine if r["task"] == t]).as_dict()
                               for t in tasks},
                     "niah_average": niah.as_dict(),
                     "minus_full": stats.paired_difference([full.get(k) for k in keys], [by_key[k] for k in keys]).as_dict()})
        if niah.mean is not None and (target not in best or niah.mean > best[target][0]):
            best[target] = (niah.mean, name, by_key)
    for system, cfg in chosen:
        if cfg is None:
            continue
        ratio = kv_ratio(cfg, model_config, L)
        target = min(best, key=lambda t: abs(t - ratio))
        if abs(target - ratio) > 0.03:
            continue
        _, name, theirs = best[target]
        mine = {key(r): r["score"] for r in rows if r["system"] == system.name and r["length"] == L}
        keys = sorted(k for k in mine if k[0] in R.NIAH_TASKS)
        record.emit({"length": L, "system": system.name, "against_best_press": {
            "press": f"{name} {target:g}", **stats.paired_difference([theirs.get(k) for k in keys],
                                                                      [mine[k] for k in keys]).as_dict()}})


def family(row: dict) -> str:
    """Which line of the plot a summary row belongs to."""
    name = row["system"]
    if name == "full cache":
        return "full cache"
    if name.startswith("kvpress "):
        return row["press"]
    if name.startswith("random"):
        return "random heads full (same count)"
    if name.startswith("memory "):
        share = re.search(r", ([0-9.]+) of it on full heads", name)
        return f"memory target, {share.group(1) if share else '?'} of it on full heads"
    if name.endswith(" evenly"):
        return "no full heads, token budgets evenly (SnapKV layout)"
    if "middle tokens" in name:
        return ("no full heads, token budgets by importance" if name.startswith("all-window")
                else "recipe heads full + token budgets by importance")
    return "recipe heads full, the rest sink + window"


def plot(rows: list[dict], path: Path, model: str) -> None:
    """RULER NIAH average against KV memory, one line per cache family, 95% intervals as bars."""
    from attnkit.evals.plots import memory_curve

    for L in sorted({r["length"] for r in rows}):
        points = []
        for r in rows:
            if r["length"] == L and "niah_average" in r:
                mean, ci = r["niah_average"]["mean"], r["niah_average"]["ci95"]  # no interval from one prompt
                points.append({"family": family(r), "kv_ratio": r["kv_ratio"], "mean": mean,
                               "low": ci[0] if ci else mean, "high": ci[1] if ci else mean})
        out = path if len({r["length"] for r in rows}) == 1 else path.with_name(f"{path.stem}_{L}.png")
        ns = sorted({r["niah_average"]["n"] for r in rows if r["length"] == L and "niah_average" in r}, reverse=True)
        memory_curve(points, out, title=f"{model}, {L} tokens: RULER NIAH average against KV memory "
                                        f"(n={' or '.join(map(str, ns))} per point)")


if __name__ == "__main__":
    import sys
    if len(sys.argv) == 3 and sys.argv[1] == "--plot-only":  # redraw from a record file
        lines = [json.loads(x) for x in Path(sys.argv[2]).read_text().splitlines()]
        head = lines[0]
        plot(lines[1:], Path(sys.argv[2]).with_suffix(".png"), head.get("model", ""))
    else:
        main()
