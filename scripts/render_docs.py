"""Render the figures of README.md and the docs pages (docs/) from the result files in results/.

Every generated block sits between two markers and names the file(s) it was made from:

    <!-- begin: NAME -->
    ...
    <!-- end: NAME -->

    python scripts/render_docs.py           # rewrite the blocks in place
    python scripts/render_docs.py --check   # exit 1 when a block differs from its files, or has none

The verdicts come from attnkit.reproduce.verdicts (the rules the study report uses); nothing here
needs a model or ../shared.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
DOCS = ("README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")))  # pages with blocks
LINK = re.compile(r"(\]\()(?!https?:|mailto:|#|/)([^)\s]+)\)")
STUDY_MODELS = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct", "gemma-3-270m": "Gemma-3-270M",
                "qwen2.5-coder-1.5b-instruct": "Qwen2.5-Coder-1.5B-Instruct"}
BLOCK = re.compile(r"(<!-- begin: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)


class MissingResults(Exception):
    pass


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]


def read_jsonl(path: Path) -> tuple[dict, list[dict]]:
    if not path.is_file():
        raise MissingResults(f"{_rel(path)} is missing")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(lines) < 2:
        raise MissingResults(f"{_rel(path)} holds no rows (a run still going, or one that stopped)")
    return lines[0], lines[1:]


def provenance(head: dict, path: Path) -> str:
    load = f", load average {head['load_at_start']} at start" if "load_at_start" in head else ""
    return (f"*{head['date']}, {head['machine']}{load}; torch {head['torch']}, transformers {head['transformers']}, "
            f"attnkit {head['attnkit']}. Command: `{head['command']}`. Rows: [`{_rel(path)}`]({_rel(path)}).*")


# ---------------------------------------------------------------- the study (README)

def _study(model: str) -> tuple[dict, Path]:
    from attnkit.reproduce.report import load_results
    folder = RESULTS / "study" / model
    results = load_results(folder)
    if not results:
        raise MissingResults(f"{_rel(folder)} holds no study step files")
    return results, folder


def study_claims() -> dict[str, dict]:
    from attnkit.reproduce.report import claims
    return {m: claims(_study(m)[0]) for m in STUDY_MODELS}


def _key(step: str, c: dict) -> str:
    """What makes two models' claims the same row (the KV budgets and Ks are the same settings)."""
    return f"{step}:{c['claim']}"


def study_table() -> str:
    per_model = study_claims()
    order: dict[str, dict] = {}
    for model, steps in per_model.items():
        for step, cs in steps.items():
            for c in cs:
                order.setdefault(_key(step, c), c)
    rows = []
    for key, c in order.items():
        cells = []
        for model, steps in per_model.items():
            found = next((x for s, cs in steps.items() for x in cs if _key(s, x) == key), None)
            cells.append("not run" if found is None else f"{found['ours']}: {found['verdict'].markdown()}")
        rows.append([c["claim"], c["paper"], *cells])
    sources = ", ".join(f"[`{_rel(_study(m)[1])}/`]({_rel(_study(m)[1])}/report.md)" for m in STUDY_MODELS)
    lines = _table(["claim", "paper", *STUDY_MODELS.values()], rows)
    lines += ["", f"*From the study's step files in {sources} (each with its `report.md`). Figures: mean "
              f"[95% interval], n prompts; recall is ROUGE-1 recall of the needle (bootstrap intervals), "
              f"accuracies use Wilson intervals; differences are paired by prompt.*"]
    return "\n".join(lines)


def study_verdicts() -> str:
    from attnkit.reproduce import verdicts as V
    per_model = study_claims()
    names = {"heads": "Retrieval heads", "ablate": "Masking the retrieval heads", "kv": "Retrieval-head KV cache",
             "buckets": "Attention Buckets", "s2a": "System 2 Attention"}
    lines = []
    for step, title in names.items():
        parts = []
        for model, label in STUDY_MODELS.items():
            cs = per_model[model].get(step)
            if not cs:
                parts.append(f"{label}: not run")
                continue
            overall = V.all_hold([c["verdict"] for c in cs])
            words = [c["verdict"].word for c in cs]
            rest = "".join(f", {words.count(w)} " + (w.replace("does", "do") if words.count(w) > 1 else w)
                           for w in dict.fromkeys(words) if w != V.HOLDS)
            parts.append(f"{label}: {overall.word} ({words.count(V.HOLDS)} of {len(cs)} claims hold{rest})")
        lines.append(f"* **{title}**: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def study_time() -> str:
    from attnkit.reproduce.study import STEPS
    parts = []
    for model, label in STUDY_MODELS.items():
        results, folder = _study(model)
        run = next(iter(results.values())).get("run", {})
        minutes = sum(r["seconds"] for r in results.values()) / 60
        missing = [s for s in STEPS if s not in results]
        so_far = f"; steps not yet run: {', '.join(missing)}" if missing else ""
        parts.append(f"{label} {minutes:.0f} min ({run.get('machine', 'machine not recorded')}, "
                     f"{run.get('date', '')}{so_far})")
    return ("*Full study wall time, the sum over steps of the run that finished each (a resumed step counts "
            "its last run only, the trials it reused cost nothing then): " + "; ".join(parts) + ".*")


def kill_resume(model: str = "smollm2-135m-instruct") -> str:
    path = RESULTS / "kill_resume" / f"{model}.json"
    if not path.is_file():
        raise MissingResults(f"{_rel(path)} is missing")
    r = json.loads(path.read_text())
    caught = sum(a["killed"] for a in r["attempts"])
    if "kill_after_s" in r["attempts"][0]:  # a record of the earlier, time-drawn kills
        moments = ", ".join(f"{a['kill_after_s']:g}" for a in r["attempts"]) + " s"
    else:
        moments = ", ".join(f"{a['units_before_kill']} units + {a['then_s']:g} s" for a in r["attempts"])
    same = "equal" if r["figures_equal"] else "**different**"
    return (f"*On {STUDY_MODELS.get(model, model)} ({r['date']}, {r['machine']}): `{r['command']}` SIGKILLed "
            f"{caught} of {len(r['attempts'])} times (after {moments}; one clean run takes {r['run_s']:g} s after "
            f"{r['startup_s']:g} s of start-up), then run to the end: figures of {', '.join(r['steps_compared'])} "
            f"and the report {same} to the uninterrupted run's. Record: [`{_rel(path)}`]({_rel(path)}), written by "
            f"`python scripts/kill_resume.py`.*")


# ---------------------------------------------------------------- benchmarks (docs/benchmarks.md)

def _ratio(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def bench_heads_detect(model: str = "embedded", device: str = "cpu") -> str:
    path = RESULTS / "benchmarks" / f"heads_detect_{model}_{device}.jsonl"
    head, rows = read_jsonl(path)
    body = [[r["length"], r["trial_s"], r.get("plain_s"), _ratio(r.get("trial_over_plain")), r.get("naive_s", "not run"),
             _ratio(r.get("naive_over_trial"))] for r in rows]
    return "\n".join([provenance(head, path), ""] + _table(
        ["context", "(a) trial s", "(b) plain s", "(a)/(b)", "(c) naive s", "(c)/(a)"], body))


def bench_buckets(model: str = "embedded", device: str = "cpu") -> str:
    path = RESULTS / "benchmarks" / f"buckets_{model}_{device}.jsonl"
    head, rows = read_jsonl(path)
    body = [[r["variant"], r["prefill_s"], _ratio(r.get("prefill_over_plain", 1.0)), r["decode_ms_per_token"],
             _ratio(r.get("decode_over_plain", 1.0))] for r in rows]
    return "\n".join([provenance(head, path), ""] + _table(
        ["variant", "prefill s", "prefill / plain", "decode ms/token", "decode / plain"], body))


def _mib(b) -> str:
    return "" if b is None else f"{b / 2 ** 20:.1f} MiB"


def bench_kv_cache(model: str = "embedded", device: str = "cpu", decode_target: float | None = None,
                   window_prefill_target: float | None = None) -> str:
    path = RESULTS / "benchmarks" / f"kv_cache_{model}_{device}.jsonl"
    head, rows = read_jsonl(path)
    rows = [r for r in rows if "cache" in r and "length" in r]
    peaks = any("peak_kv_bytes" in r for r in rows)  # the most a cache held at once while the prompt ran
    full = {r["length"]: r.get("kv_bytes") for r in rows if r["cache"] == "full cache"}

    def peak(r) -> list:
        held = r.get("peak_kv_bytes", full.get(r["length"]) if r["cache"] == "full cache" else None)
        return [] if not peaks else [f"{_mib(held)} ({_ratio(held / full[r['length']])})" if held and full.get(r["length"]) else ""]

    body = [[r["length"], r["cache"], _mib(r.get("kv_bytes")), _ratio(r.get("kv_over_full")), *peak(r), r.get("prefill_s"),
             _ratio(r.get("prefill_over_full")), r.get("decode_ms_per_token"), _ratio(r.get("decode_over_full")),
             r.get("rss_after_prefill_mib", "")] for r in rows]
    lines = [provenance(head, path), ""] + _table(
        ["context", "cache", "KV bytes", "ratio"] + (["peak KV during prefill (ratio)"] if peaks else [])
        + ["prefill s", "ratio", "decode ms/token", "ratio", "RSS after prefill, MiB"], body)
    if decode_target is not None:
        longest = max(r["length"] for r in rows)
        for r in rows:
            if r["length"] != longest or r.get("decode_over_full") is None:
                continue
            checks = [("decode", r["decode_over_full"], decode_target)]
            if window_prefill_target is not None and "window prefill" in r["cache"]:
                checks.append(("prefill", r["prefill_over_full"], window_prefill_target))
            said = "; ".join(f"{what} {got:.2f}x (target <= {want}x): **{'met' if got <= want else 'not met'}**"
                             for what, got, want in checks)
            lines += ["", f"At {longest} tokens, {r['cache']}, against the full cache in the same run: {said}."]
    return "\n".join(lines)


def _est(d: dict | None, signed: bool = False) -> str:
    from attnkit.evals.stats import Estimate
    return "n/a" if not d else Estimate.from_dict(d).text(signed=signed)


def bench_kv_ruler(model: str = "smollm2-135m-instruct", device: str = "cpu", variant: str = "",
                   targets: tuple = (), within: tuple = ()) -> str:
    """The RULER table of one record: attnkit's caches and kvpress's presses (where the run had them),
    paired differences, and for each (memory, share of the full cache) target whether the best attnkit
    cache at that memory meets it and stands at or above every press; for each (memory, points) of
    `within`, whether an attnkit cache at or below that memory scores within that many points of the
    full cache."""
    from attnkit.evals.ruler import NIAH_TASKS as NIAH
    path = RESULTS / "benchmarks" / f"kv_ruler_{model}{variant}_{device}.jsonl"
    head, rows = read_jsonl(path)
    tasks = head["tasks"]
    against = {r["system"]: r["against_best_press"] for r in rows if "against_best_press" in r}
    probes = [r for r in rows if "memory_probe" in r]
    rows = sorted([r for r in rows if "niah_average" in r],
                  key=lambda r: (r["length"], r["system"] != "full cache", -r["kv_ratio"], "press" in r))
    presses = any("press" in r for r in rows)

    def heads(r):
        return "" if "press" in r else r["full_heads"] if r["full_heads"] is not None else "all"

    body = [[r["length"], r["system"], heads(r), r.get("head_tokens") or "", _ratio(r["kv_ratio"]),
             *[_est(r["tasks"].get(t)) for t in tasks], _est(r["niah_average"]),
             "" if r["system"] == "full cache" else _est(r["minus_full"], signed=True),
             _est(r["minus_random"], signed=True) if "minus_random" in r else "",
             _est(r["minus_full_heads_same_memory"], signed=True) if "minus_full_heads_same_memory" in r else "",
             *([f"{_est(against[r['system']], signed=True)} vs {against[r['system']]['press']}"
                if r["system"] in against else ""] if presses else [])]
            for r in rows]
    lines = [provenance(head, path), ""] + _table(
        ["context", "cache", "full KV heads", "middle tokens per window head", "KV memory", *tasks, "NIAH average",
         "minus full (paired)", "minus random heads (paired)",
         "minus full heads alone at this memory (paired)", *(["minus the best press at this memory (paired)"]
                                                             if presses else [])], body)
    full = {r["length"]: r["niah_average"]["mean"] for r in rows if r["system"] == "full cache"}
    ours = [r for r in rows if r["system"] != "full cache" and not r["system"].startswith("random")
            and "press" not in r and full.get(r["length"])]
    if not targets and not within:
        for r in ours:
            share = 100 * r["niah_average"]["mean"] / full[r["length"]]
            lines += ["", f"At {r['length']} tokens, {r['system']} at {r['kv_ratio']:.2f}x of the KV memory keeps "
                          f"{share:.0f}% of the full cache's NIAH average over {len(tasks)} of RULER's "
                          f"{len(NIAH)} NIAH tasks (the target, set at 8K: 90% at 0.30x)."]
    for memory, share in targets:
        near = [r for r in ours if abs(r["kv_ratio"] - memory) <= 0.03]
        if not near:
            lines += ["", f"Target at {memory:.2f}x: no attnkit cache of this run lands within 0.03x of it."]
            continue
        best = max(near, key=lambda r: r["niah_average"]["mean"])
        kept = 100 * best["niah_average"]["mean"] / full[best["length"]]
        vs = against.get(best["system"])
        parts = [f"keeps {kept:.0f}% of the full cache's NIAH average" + (f" (target {100 * share:.0f}%: "
                 f"{'met' if kept >= 100 * share else 'not met'})" if share else "")]
        if vs:
            low, high = vs["ci95"]
            word = ("above it, the interval excludes 0" if low > 0 else "below it, the interval excludes 0"
                    if high < 0 else "no difference shown, the interval includes 0")
            parts.append(f"against the best press at this memory ({vs['press']}) {_est(vs, signed=True)}: {word} "
                         f"(target: at or above every press: {'met' if vs['mean'] >= 0 else 'not met'})")
        own = [r for r in rows if "press" in r and abs(r["target"] - memory) < 1e-6 and "DuoAttention" not in r["press"]]
        if own:  # DuoAttentionPress runs attnkit's own head choice inside kvpress; the presses that score by themselves:
            top = max(own, key=lambda r: r["niah_average"]["mean"])
            parts.append(f"the best press that chooses by itself (all but DuoAttentionPress, which was given attnkit's "
                         f"heads), {top['press']}, scores {_est(top['niah_average'])}")
        lines += ["", f"**Target at {memory:.2f}x**: the best attnkit cache there, {best['system']} "
                      f"({best['kv_ratio']:.3f}x), " + "; ".join(parts) + "."]
    for memory, points in within:
        under = [r for r in ours if r["kv_ratio"] <= memory + 0.005]
        if not under:
            lines += ["", f"Target at or below {memory:.2f}x: no attnkit cache of this run lands there."]
            continue
        best = max(under, key=lambda r: (r["niah_average"]["mean"], -r["kv_ratio"]))
        gap = best["niah_average"]["mean"] - full[best["length"]]
        low = best["minus_full"]["ci95"][0] if best["minus_full"].get("ci95") else None
        bound = ("" if low is None else f"; the paired interval's lower end, {low:+.1f}, is "
                 + ("within" if low >= -points else "past") + f" {points:g} points")
        lines += ["", f"**Target at or below {memory:.2f}x of the model's own cache, within {points:g} points of it**: "
                      f"the best attnkit cache there, {best['system']} ({best['kv_ratio']:.3f}x), scores "
                      f"{_est(best['niah_average'])} against the full cache's {full[best['length']]:.1f}, paired "
                      f"{_est(best['minus_full'], signed=True)}: {gap:+.1f} points "
                      f"({'met' if gap >= -points else 'not met'}){bound}."]
    lines += memory_probe_table(probes, rows)
    after = str(head.get("question", "")).startswith("after")
    kvzip = " KVzipPress runs its own passes that reconstruct the context;" if any(
        "KVzip" in r.get("press", "") for r in rows) else ""
    how = (f" kvpress's presses compress the same {'context' if after else 'whole-prompt'} prefill (compression "
           f"ratio 1 - target;{kvzip} DuoAttentionPress "
           "given attnkit's combined head scores, sink and window); their KV memory is measured (a key AdaKV or "
           "DuoAttention masks counts as freed)." if presses else "")
    lines += ["", f"*Mean RULER score (0-100, RULER's string match) [95% bootstrap interval], n prompts; haystack "
                  f"{head.get('haystack')}; heads chosen by {'copy + echo + induction' if head.get('recipe') else 'copy'} "
                  f"scores, full prefill{_chunks(head)} then trimmed; token budgets chosen by the "
                  f"{_question(head)}; {head.get('reply_prefix', 'no answer prefix in a chat reply (a raw prompt ends with it)')}; "
                  f"the same generated prompts for every cache.{how}*"]
    return "\n".join(lines)


def memory_probe_table(probes: list[dict], rows: list[dict]) -> list[str]:
    """Memory measured, not counted: each attnkit cache and each press on one prompt run alone (the prompt in
    one forward), and for every press at every target the KV bytes its process held with each answer."""
    lines = []
    if probes:
        def order(r):
            return ("press" in r, -(r["memory_probe"].get("held_over_full") or 0), r["system"])
        body = [[r["system"], r["memory_probe"].get("process", "attnkit's"), _mib(m["held_kv_bytes"]),
                 _ratio(m.get("held_over_full")), _mib(m["peak_kv_bytes"]), _ratio(m.get("peak_over_full")),
                 "" if m["peak_rss_gib"] is None else f"{m['peak_rss_gib']:.2f} GiB", m["prefill_s"], m["decode_ms"]]
                for r in sorted(probes, key=order) for m in [r["memory_probe"]]]
        prompt = probes[0]["memory_probe"]["prompt"]
        lines += ["", f"Memory measured on one prompt ({prompt}, {probes[0]['length']} tokens) run alone by each "
                      "system, the prompt in one forward, then 16 decoding steps:", ""] + _table(
            ["cache", "process", "KV held after the prompt", "of the full cache", "KV at its peak", "of the full cache",
             "peak resident memory", "prefill s", "decode ms/token"], body)
    held = [r for r in rows if "press" in r and "peak_ratio" in r]
    if held:
        body = [[r["system"], _ratio(r["kv_ratio"]), _ratio(r["held_ratio"]), _ratio(r["peak_ratio"])]
                for r in sorted(held, key=lambda r: (r["target"], r["press"]), reverse=True)]
        lines += ["", "kvpress's presses, averaged over their answers: the KV memory counted as freed (a key AdaKV or "
                      "DuoAttention masks counts as freed), what kvpress's process held (masked keys included), and "
                      "the most it held at once (the layers before one compressed, that one whole):", ""] + _table(
            ["press", "counted", "held", "at its peak"], body)
    return lines


def question_placement(model: str = "smollm2-135m-instruct", aware: str = "_8k", after: str = "_8k_question_after"
                       ) -> str:
    """Each cache of the query-agnostic run against the same cache on the same prompts with the question
    inside the compressed prompt (the query-aware run's trials), paired by prompt."""
    from attnkit.evals import stats
    from attnkit.evals.ruler import NIAH_TASKS as NIAH

    path = RESULTS / "benchmarks" / f"kv_ruler_{model}{after}_cpu.jsonl"
    head, rows = read_jsonl(path)

    def scores(variant):
        _, trials = read_jsonl(RESULTS / "benchmarks" / f"kv_ruler_{model}{variant}_cpu_trials.jsonl")
        return {(r["system"], r["task"], r["length"], r["index"]): r["score"] for r in trials if r["task"] in NIAH}

    before, later = scores(aware), scores(after)
    body = []
    for r in sorted((r for r in rows if "niah_average" in r), key=lambda r: -r["kv_ratio"]):
        keys = sorted(k for k in later if k[0] == r["system"] and k in before)
        if not keys:
            continue
        body.append([r["system"], _ratio(r["kv_ratio"]), _est(stats.bootstrap_mean([before[k] for k in keys]).as_dict()),
                     _est(stats.bootstrap_mean([later[k] for k in keys]).as_dict()),
                     _est(stats.paired_difference([before[k] for k in keys], [later[k] for k in keys]).as_dict(),
                          signed=True)])
    aware_path = RESULTS / "benchmarks" / f"kv_ruler_{model}{aware}_cpu_trials.jsonl"
    return "\n".join([provenance(head, path), ""] + _table(
        ["cache", "KV memory", "question in the compressed prompt (query-aware)",
         "question after compression (query-agnostic)", "after minus in (paired)"], body) + [
        "", f"*RULER NIAH average over the same prompts (the query-aware answers from [`{_rel(aware_path)}`]"
            f"({_rel(aware_path)})); mean [95% bootstrap interval], n prompts.*"])


def kv_ruler_trials(model: str = "qwen2.5-coder-1.5b-instruct", variant: str = "_4k_question_after",
                    device: str = "cpu", targets: tuple = ()) -> str:
    """The answers a RULER run has committed so far (its trials file), before its summary exists: each
    attnkit cache per task and its NIAH average over the prompts every cache of the run has answered
    (paired with the full cache on those prompts), so a run that spans several sittings shows its n; for
    each (memory, share) of `targets`, whether the best cache at that memory keeps that share so far."""
    from attnkit.evals import stats
    from attnkit.evals.ruler import NIAH_TASKS as NIAH

    path = RESULTS / "benchmarks" / f"kv_ruler_{model}{variant}_{device}_trials.jsonl"
    head, trials = read_jsonl(path)
    run = head["attnkit_run"]
    systems = list(run["systems"])
    answered: dict[tuple, dict] = {}
    for r in trials:
        answered.setdefault((r["task"], r["length"], r["index"]), {})[r["system"]] = r["score"]
    keys = sorted(k for k, by in answered.items() if all(s in by for s in systems))
    if not keys:
        raise MissingResults(f"{_rel(path)}: no prompt answered by every cache yet")
    tasks = list(dict.fromkeys(k[0] for k in keys))
    full = [answered[k]["full cache"] for k in keys if k[0] in NIAH]
    full_mean = sum(full) / len(full) if full else 0.0
    body, best = [], {}  # best: {memory: (share of the full cache's average, cache)}
    for name in systems:
        memory = run["systems"][name].get("memory")
        by_task = [_est(stats.bootstrap_mean([answered[k][name] for k in keys if k[0] == t]).as_dict()) for t in tasks]
        mine = [answered[k][name] for k in keys if k[0] in NIAH]
        niah = stats.bootstrap_mean(mine)
        share = 100 * niah.mean / full_mean if name != "full cache" and full_mean else None
        if share is not None and memory is not None:
            best[memory] = max(best.get(memory, (share, name)), (share, name))
        body.append([name, "1.00x" if memory is None else f"{memory:.3g}x", *by_task, _est(niah.as_dict()),
                     "" if share is None else f"{share:.0f}%",
                     "" if name == "full cache" else _est(stats.paired_difference(full, mine).as_dict(), signed=True)])
    done = len({(k[0], k[2]) for k in keys})
    lines = [f"*{_rel(path)}: {done} prompts answered by every cache so far ({len(trials)} answers in all); "
             f"the run resumes from this file. Model {Path(run['model']).name}, {run['dtype']}, "
             f"question {run.get('question', 'in the prompt')}; {_reply(run)}; prefill chunk "
             f"{run.get('prefill_chunk')}. "
             f"Rows: [`{_rel(path)}`]({_rel(path)}).*", ""] + _table(
        ["cache", "KV memory (target)", *tasks, "NIAH average", "share of the full cache's NIAH average",
         "minus full (paired)"], body) + [
        "", "*Mean RULER score (0-100, RULER's string match) [95% bootstrap interval], n prompts; only prompts "
            "every cache has answered; tasks outside NIAH (vt, cwe, fwe) are indicative at this n.*"]
    for memory, wanted in targets:
        if memory in best:
            kept, name = best[memory]
            lines.append(f"\n**Target at {memory:g}x** (so far): the best cache there, {name}, keeps {kept:.0f}% of "
                         f"the full cache's NIAH average (target {100 * wanted:.0f}%: "
                         f"{'met' if kept >= 100 * wanted else 'not met'}).")
    return "\n".join(lines)


def _reply(run: dict) -> str:
    """How a RULER run's chat replies began: RULER's answer prefix, or the question alone."""
    if not run.get("chat_template"):
        return "raw prompts ending with RULER's answer prefix"
    return "the reply starting with RULER's answer prefix" if run.get("reply_prefix") else \
        "the question alone (no answer prefix in the reply)"


def _chunks(head: dict) -> str:
    chunk = head.get("prefill_chunk")
    return f" in {chunk}-token chunks" if isinstance(chunk, int) else ""


def _question(head: dict) -> str:
    if str(head.get("question", "")).startswith("after"):
        return ("context's last 64 queries before the question arrives (query-agnostic: the context is compressed, "
                "then the question is read through what was kept)")
    return "prompt's last 64 queries (query-aware: the question ends the prompt)"


def kv_choice(model: str = "smollm2-135m-instruct", variants: tuple = ("", "_8k"), name: str = "SmolLM2-135M-Instruct"
              ) -> str:
    """Per committed RULER record of the model and per memory band, the attnkit cache that kept the most
    NIAH average (the README's "which choice" table), beside the best kvpress press where the run had them."""
    body, tasks = [], set()
    for variant in variants:
        path = RESULTS / "benchmarks" / f"kv_ruler_{model}{variant}_cpu.jsonl"
        head, rows = read_jsonl(path)
        tasks.update(head["tasks"])
        rows = [r for r in rows if "niah_average" in r]
        full = {r["length"]: r["niah_average"] for r in rows if r["system"] == "full cache"}
        ours = [r for r in rows if r["system"] != "full cache" and not r["system"].startswith("random")
                and "press" not in r]
        for band in sorted({round(r["kv_ratio"], 1) if r["kv_ratio"] > 0.2 else 0.15 for r in ours}, reverse=True):
            near = [r for r in ours if (round(r["kv_ratio"], 1) if r["kv_ratio"] > 0.2 else 0.15) == band]
            best = max(near, key=lambda r: r["niah_average"]["mean"])
            presses = [r for r in rows if "press" in r and abs(r["kv_ratio"] - best["kv_ratio"]) <= 0.03]
            top = max(presses, key=lambda r: r["niah_average"]["mean"]) if presses else None
            n = best["full_heads"]
            heads = (f"no full KV head, {best['head_tokens']} middle tokens per head" if not n and best.get("head_tokens")
                     else f"{n} full KV head{'s' if n != 1 else ''}" + (
                         f" + {best['head_tokens']} middle tokens per other head" if best.get("head_tokens")
                         else ", the rest sink + window"))
            if " kernel " in best["system"]:  # SnapKV's pooling widened
                heads += f", scores pooled over {best['system'].rsplit(' kernel ', 1)[1]} positions"
            body.append([best["length"], _ratio(best["kv_ratio"]), heads, _est(best["niah_average"]),
                         _est(full[best["length"]]),
                         f"{top['press']}: {_est(top['niah_average'])}" if top else "not run",
                         f"[{_rel(path)}]({_rel(path)})"])
    return "\n".join(_table(["context", "KV memory", "best attnkit cache there", "RULER NIAH average",
                              "full cache", "best kvpress press at that memory", "record"], body) +
                      ["", f"*{name}, {' + '.join(sorted(tasks))}, heads by copy + echo + induction, full prefill, "
                           "the question in the compressed prompt; mean [95% bootstrap interval], n prompts.*"])


def bench_mdqa(model: str = "smollm2-135m-instruct", device: str = "cpu", variant: str = "") -> str:
    path = RESULTS / "benchmarks" / f"mdqa_{model}{variant}_{device}.jsonl"
    head, rows = read_jsonl(path)
    positions = head["positions"]
    body = [[r["system"], r["docs"], r["tokens"], *[_est(r["accuracy"].get(str(p))) for p in positions],
             _est(r["ends_minus_middle"], signed=True), _est(r.get("first_minus_middle"), signed=True),
             _est(r.get("last_minus_middle"), signed=True), r.get("seconds_per_example", "")] for r in rows]
    lines = [provenance(head, path), ""] + _table(
        ["system", "documents", "prompt tokens (mean)", *[f"gold at {p + 1}" for p in positions],
         "ends minus middle (paired)", "first minus middle", "last minus middle", "s per example (same run)"], body)
    for r in rows:
        dip = r["ends_minus_middle"]
        if dip and dip.get("n"):
            low = dip["ci95"][0]
            verdict = ("a middle dip: the interval excludes 0" if low > 0 else
                       "no middle dip shown: the interval reaches 0 or below") + _which_end(r)
            lines += ["", f"{r['system']}, {r['docs']} documents: ends minus middle "
                          f"{_est(dip, signed=True)}: {verdict}."]
        if r.get("minus_one_base"):
            lines += ["", "Buckets minus one base, per position (paired): " + "; ".join(
                f"gold at {int(p) + 1}: {_est(d, signed=True)}" for p, d in r["minus_one_base"].items())]
    lines += ["", f"*Accuracy (%) [Wilson 95%], n questions per position ({head['questions']} NQ-open questions, "
                  f"the same at every position); the gold passage among answer-free passages of other questions; "
                  f"scored by the paper's best-subspan match on the answer's first line.*"]
    return "\n".join(lines)


def _which_end(r: dict) -> str:
    """Which end lifts ends-minus-middle: both (Liu et al.'s U), or one alone."""
    first, last = r.get("first_minus_middle"), r.get("last_minus_middle")
    if not first or not last:
        return ""
    up = [name for name, d in (("first", first), ("last", last)) if d["ci95"][0] > 0]
    if len(up) == 2:
        return " (both ends above the middle: a U)"
    if up:
        return f" (only the {up[0]} position above the middle: {'primacy' if up[0] == 'first' else 'recency'}, not a U)"
    return " (neither end alone above the middle)"


def mdqa_search(model: str = "smollm2-135m-instruct") -> str:
    """One line per committed curve of the model: documents, tokens, ends minus middle and the verdict."""
    out = []
    for path in sorted((RESULTS / "benchmarks").glob(f"mdqa_{model}*_cpu.jsonl")):
        try:
            head, rows = read_jsonl(path)
        except MissingResults:  # a run still going
            continue
        for r in rows:
            dip = r["ends_minus_middle"]
            verdict = ("a middle dip" if dip and dip["ci95"][0] > 0 else "no middle dip shown") + _which_end(r)
            out.append(f"* {STUDY_MODELS.get(model, model)}, {r['docs']} documents (about {r['tokens']} tokens), "
                       f"{r['system']}: ends minus middle {_est(dip, signed=True)} (accuracy points; n questions): "
                       f"{verdict} ([`{_rel(path)}`]({_rel(path)}))")
            if r.get("minus_one_base"):  # buckets on the same prompts as one base, per gold position
                diffs = r["minus_one_base"]
                below = [p for p, d in diffs.items() if d["ci95"][1] < 0]
                above = [p for p, d in diffs.items() if d["ci95"][0] > 0]
                word = ("**holds** (above one base where the interval excludes 0, nowhere below)" if above and not below
                        else "**does not hold**" + (" (below one base at gold position " +
                                                    ", ".join(str(int(p) + 1) for p in below) + ")" if below else
                                                    " (no position's interval excludes 0)"))
                out.append(f"  * buckets minus one base, paired per gold position: " + "; ".join(
                    f"{int(p) + 1}: {_est(d, signed=True)}" for p, d in diffs.items()) + f": the Buckets claim {word}")
    if not out:
        raise MissingResults(f"no mdqa result file of {model}")
    return "\n".join(out)


def bench_vllm_kv(model: str = "smollm2-135m-instruct", variant: str = "") -> str:
    path = RESULTS / "benchmarks" / f"vllm_kv_{model}{variant}_cpu.jsonl"
    head, rows = read_jsonl(path)
    body = [[r["system"], _est(r["recall"]), r.get("kv_tokens", ""), _ratio(r.get("max_concurrency")),
             _ratio(r.get("concurrency_over_full")),
             f"{r['same_tokens']} of {r['n']} ({r['same_tokens_as']})" if "same_tokens" in r else ""] for r in rows]
    sink = head.get("sink", 16)
    longest = head["length"] + head.get("max_new_tokens", 40)
    lines = [provenance(head, path), ""] + _table(
        ["system", "recall (%)", "vLLM KV cache (tokens)", f"max concurrency at {longest} tokens",
         "over vLLM's full cache", "same tokens as"], body)
    plugins = [r for r in rows if "plugin" in r["system"] and r.get("concurrency_over_full") is not None]
    by_name = {r["system"]: r for r in rows}
    full_peaks = {x["clients"]: x.get("peak_running") for r in rows if r["system"] == "vLLM full cache"
                  for x in r.get("load", [])}
    for r in plugins:
        hf = by_name.get(r.get("same_tokens_as", ""))
        if not hf:
            continue
        gap = r["recall"]["mean"] - hf["recall"]["mean"]
        concurrency = (f"{r['concurrency_over_full']:.2f}x by vLLM's start-up figure, "
                       f"**{'met' if r['concurrency_over_full'] >= 2.5 else 'not met'}**")
        peaks = [(x["clients"], x["peak_running"], full_peaks.get(x["clients"])) for x in r.get("load", [])
                 if x.get("peak_running") and full_peaks.get(x["clients"])]
        for clients, peak, full_peak in peaks:  # what ran at once under load: the full prefill's real admission
            concurrency += (f"; under {clients} clients at most {peak} requests ran at once against {full_peak} on "
                            f"vLLM's full cache, {peak / full_peak:.2f}x, **{'met' if peak / full_peak >= 2.5 else 'not met'}**")
        lines += ["", f"Target for {r['system']} (the 0.30x plan: >= 2.5x the concurrent sequences of vLLM's full "
                      f"cache at the same KV memory, recall within 5 points of attnkit's HF cache with the same plan): "
                      f"{concurrency}; recall {_est(r['recall'])} against {_est(hf['recall'])}, {gap:+.1f} points, "
                      f"**{'met' if abs(gap) <= 5 else 'not met'}**."]
    loaded = [r for r in rows if r.get("load")]
    if loaded:
        table = []
        peaked = any("peak_running" in x for r in loaded for x in r["load"])
        for r in loaded:
            for x in r["load"]:
                table.append([r["system"], x["clients"], x["requests"], x["wall_s"], x["req_per_s"], x["gen_tok_per_s"]]
                             + ([x.get("peak_running", "")] if peaked else []))
        lines += ["", "Under load: every client sends one long prompt at once and generates "
                      f"{head.get('load_new_tokens', '')} tokens (ignoring end of sequence), on the same server as "
                      "the row above" + (" (most running at once: vLLM's own count, read every half second)" if peaked
                                         else "") + ":", ""] + _table(
            ["system", "clients", "requests", "wall (s)", "requests/s", "generated tokens/s"]
            + (["most running at once"] if peaked else []), table)
    lines += ["", f"*{head['prompts']} prompts ({head['length']}-token number needles), greedy, float32, at most "
                  f"{head.get('max_new_tokens', 40)} new tokens; the plan: {head['full_heads']} of {head['kv_heads']} KV "
                  f"heads full (copy + echo + induction), the others a {head['window']}-token window, with {sink} sink "
                  f"tokens or none, attending within sink + window in prefill unless the row says full prefill; vLLM "
                  f"{head['vllm']}, VLLM_CPU_KVCACHE_SPACE={head['kv_gib']:g} GiB, --max-num-batched-tokens "
                  f"{head['batched_tokens']}, " + (f"--block-size {head['block_size']}, prefix caching off" if "block_size" in head else
                          "vLLM's default block size and prefix caching") + " for every server; "
                  f"vLLM's figures from its start-up log.*"]
    return "\n".join(lines)


def bench_serve_throughput() -> str:
    path = RESULTS / "benchmarks" / "serve_load_throughput_cpu.jsonl"
    head, rows = read_jsonl(path)
    pairs = {}
    for r in rows:
        pairs.setdefault((r["model"], r["technique"], r["clients"]), {})[r["engine"]] = r
    body = []
    for (model, technique, clients), p in pairs.items():
        b, o = p.get("batched", {}), p.get("one at a time", {})
        body.append([model, technique, clients, b.get("req_per_s"), b.get("tok_per_s"),
                     f"{b.get('p50_s')} / {b.get('p99_s')}", b.get("ttft_p50_s"), o.get("req_per_s"),
                     o.get("tok_per_s"), f"{o.get('p50_s')} / {o.get('p99_s')}", o.get("ttft_p50_s"),
                     _ratio(o.get("batched_over_one"))])
    lines = [provenance(head, path), ""] + _table(
        ["model", "technique", "clients", "batched req/s", "tok/s", "p50 / p99 s", "TTFT p50 s", "one at a time req/s",
         "tok/s", "p50 / p99 s", "TTFT p50 s", "batched / one"], body)
    at32 = [(k, p["one at a time"]["batched_over_one"]) for k, p in pairs.items()
            if k[2] == 32 and "one at a time" in p]
    if at32:
        lines += ["", "Target (32 concurrent short requests: >= 4x the one-at-a-time engine): " + "; ".join(
            f"{m} {t}: {x:.2f}x, {'met' if x >= 4 else 'not met'}" for (m, t, _), x in at32) + " (one run each)."]
    return "\n".join(lines)


def bench_serve_vllm() -> str:
    path = RESULTS / "benchmarks" / "serve_vllm_cpu.jsonl"
    head, rows = read_jsonl(path)
    pairs = {}
    for r in rows:
        pairs.setdefault((r["model"], r["clients"]), {})[r["engine"]] = r
    body = []
    for (model, clients), p in pairs.items():
        cells = [model, clients]
        for engine in ("batched", "one at a time", "vLLM"):
            e = p.get(engine, {})
            cells += [e.get("req_per_s"), e.get("tok_per_s"), f"{e.get('p50_s')} / {e.get('p99_s')}", e.get("ttft_p50_s")]
        body.append(cells + [_ratio(p.get("vLLM", {}).get("attnkit_batched_over_vllm"))])
    lines = [provenance(head, path), ""] + _table(
        ["model", "clients", "attnkit batched req/s", "tok/s", "p50 / p99 s", "TTFT p50 s", "attnkit one at a time req/s",
         "tok/s", "p50 / p99 s", "TTFT p50 s", "vLLM req/s", "tok/s", "p50 / p99 s", "TTFT p50 s",
         "attnkit batched / vLLM"], body)
    at32 = [(m, p["vLLM"]["attnkit_batched_over_vllm"]) for (m, c), p in pairs.items() if c == 32 and "vLLM" in p]
    if at32:
        lines += ["", "Target (attnkit serve batched within 0.5x of vLLM's requests/s at 32 clients, same run): " + "; ".join(
            f"{m}: {x:.2f}x, {'met' if x >= 0.5 else 'not met'}" for m, x in at32) + " (one run)."]
    return "\n".join(lines)


def bench_serve_robustness(model: str = "embedded") -> str:
    path = RESULTS / "benchmarks" / f"serve_load_{model}_cpu.jsonl"
    head, rows = read_jsonl(path)
    r = rows[-1]
    valid = r["requests"] - r["invalid"] - r["disconnected"]
    body = [[r["requests"], f"{r['valid_completed'] - r['disconnected']} of {valid}", r["valid_429"],
             f"{r['invalid_4xx_openai_shape']} of {r['invalid']}", r["disconnected"], r["unexpected"],
             f"{r['p50_s']} s / {r['p99_s']} s",
             f"{r['server_rss_mib_after_50']} -> {r['server_rss_mib_after_all']} MiB ({100 * r['rss_growth']:+.1f}%)"]]
    met = "met" if r["rss_growth"] <= 0.05 and r["unexpected"] == 0 else "not met"
    return "\n".join([provenance(head, path), ""] + _table(
        ["requests", "valid completed", "refused (429)", "invalid answered 4xx in OpenAI shape", "disconnected",
         "unexpected", "p50 / p99 latency (valid)", "server RSS after 50 -> after all"], body) + [
        "", f"Target (no unexpected answer; RSS after all within 5% of RSS after 50): **{met}**."])


def bench_startup() -> str:
    path = RESULTS / "benchmarks" / "startup_cli_cpu.jsonl"
    head, rows = read_jsonl(path)
    body = [[f"`{r['what']}`" if r["what"].startswith("attnkit") else r["what"], r["seconds"], r["ratio"]] for r in rows]
    cli = next(r for r in rows if r["what"].startswith("attnkit"))
    met = "met" if cli["seconds"] < 0.5 else "not met"
    return "\n".join([provenance(head, path), ""] + _table(["what", "seconds (best of runs)", "ratio"], body)
                     + ["", f"Target (< 0.5 s): **{met}**."])


def bench_lmeval_ruler(model: str = "smollm2-135m-instruct", variant: str = "_2k") -> str:
    """RULER needles three ways (lm-eval, attnkit's loop on lm-eval's prompts, attnkit eval ruler) per task
    and system, with the answers of the first two compared one by one."""
    path = RESULTS / "benchmarks" / f"lmeval_ruler_{model}{variant}_cpu.jsonl"
    head, rows = read_jsonl(path)
    ways = ("lm-eval", "attnkit on lm-eval's prompts", "attnkit eval ruler")
    scores = {(r["task"], r["system"], r["way"]): r for r in rows if r["kind"] == "score"}
    agree = {(r["task"], r["system"]): r for r in rows if r["kind"] == "agreement"}
    body = []
    for task, system in dict.fromkeys((r["task"], r["system"]) for r in rows if r["kind"] == "score"):
        a = agree.get((task, system))
        cells = [_est(scores.get((task, system, w))) for w in ways]
        tokens = " / ".join(str(scores[(task, system, w)].get("prompt_tokens", "?")) if (task, system, w) in scores
                            else "n/a" for w in (ways[0], ways[2]))
        body.append([f"`{task}`", system, *cells, f"{a['equal_answers']} / {a['n']}" if a else "n/a", tokens])
    settings = head["settings"]
    trials = head["trials"]
    lm = [json.loads(x) for x in (ROOT / trials).read_text().splitlines()[1:] if '"way": "lm-eval"' in x]
    late = sum(r["score"] > 0 and not any(a.lower() in r["answer"].strip().split("\n")[0].lower() for a in r["answers"])
               for r in lm)
    same = sum(a["equal_answers"] for a in agree.values())
    pairs = sum(a["n"] for a in agree.values())
    return "\n".join(_table(["task", "system", "lm-eval (its prompts, its scoring)", "attnkit's loop on lm-eval's prompts",
                             "`attnkit eval ruler` (its own prompts)", "equal answers (first two)",
                             "prompt tokens (lm-eval / attnkit)"], body)
                     + ["", f"*Mean RULER score (0-100) with 95% bootstrap interval and n, at lm-eval's max_seq_length "
                            f"{settings['length']} (prompt + 128 answer tokens; attnkit's own prompts at "
                            f"{settings['length'] - 128} tokens), without the chat template, {settings['samples']} "
                            f"prompts per task. Answers: [`{trials}`]({trials}) and [`{head['attnkit_trials']}`]"
                            f"({head['attnkit_trials']}).*", "",
                       f"lm-eval's answers and attnkit's loop on the same prompts: **{same} of {pairs} equal**. "
                       f"lm-eval's answers credited only after their first line break (where `attnkit eval ruler` "
                       f"would stop reading): {late} of {len(lm)}.", "", provenance(head, path)])


def bench_model_load() -> str:
    path = RESULTS / "benchmarks" / "model_load_real_cpu.jsonl"
    head, rows = read_jsonl(path)
    body = [[r["title"], f"`{r['model']}`", f"{r['parameters'] / 1e9:.2f}B", f"{r['download_mb']:,} MB",
             f"{r['disk_gib']} GiB", f"{r['load_s']} s", f"{r['peak_rss_gib']} GiB"] for r in rows]
    return "\n".join(_table(["real model", "pull name", "parameters", "download", "on disk (bf16)",
                             "load (float32, CPU)", "peak memory"], body) + ["", provenance(head, path)])


def paper_head_scores() -> str:
    from attnkit.reproduce import verdicts as V
    path = RESULTS / "paper_head_scores.json"
    if not path.is_file():
        raise MissingResults(f"{_rel(path)} is missing")
    data = json.loads(path.read_text())
    body = []
    for m in data["models"]:
        v = V.sparsity(m["above"], m["heads"], counted=V.MIN_N)  # the authors' scores: their own trials
        body.append([m["model"], m["heads"], m["above"], f"{100 * m['above'] / m['heads']:.1f}%",
                     f"{m['top'][0]} ({m['top'][1]})", v.word])
    return "\n".join(_table(["model (the authors' score file)", "heads", "above 0.1", "share", "top head", "sparsity rule"],
                            body) + ["", f"*From [`{_rel(path)}`]({_rel(path)}), written by `{data['command']}`.*"])


BLOCKS = {
    "study-table": study_table, "study-verdicts": study_verdicts, "study-time": study_time,
    "paper-head-scores": paper_head_scores, "kill-resume": kill_resume, "bench-model-load": bench_model_load,
    "bench-heads-detect-embedded": bench_heads_detect,
    "bench-buckets-embedded": bench_buckets,
    "bench-kv-cache-embedded": bench_kv_cache,
    "bench-kv-cache-smollm2": lambda: bench_kv_cache("smollm2-135m-instruct", decode_target=0.6,
                                                     window_prefill_target=0.8),
    "bench-kv-cache-qwen-16k": lambda: bench_kv_cache("qwen2.5-coder-1.5b-instruct", decode_target=0.5),
    "bench-kv-ruler-smollm2": bench_kv_ruler,
    "kv-choice-smollm2": kv_choice,
    "bench-kv-ruler-smollm2-8k": lambda: bench_kv_ruler(variant="_8k", targets=((0.30, 0.9), (0.15, 0.0))),
    "bench-kv-ruler-smollm2-8k-question-after": lambda: bench_kv_ruler(variant="_8k_question_after",
                                                                       targets=((0.30, 0.9), (0.15, 0.0))),
    "question-placement-smollm2-8k": question_placement,
    "bench-kv-ruler-gemma-16k": lambda: bench_kv_ruler("gemma-3-270m", variant="_16k", within=((0.5, 5.0),)),
    "bench-kv-ruler-gemma-32k": lambda: bench_kv_ruler("gemma-3-270m", variant="_32k", within=((0.5, 5.0),)),
    "bench-kv-ruler-gemma-16k-kernel15": lambda: bench_kv_ruler("gemma-3-270m", variant="_16k_kernel15",
                                                                within=((0.5, 5.0),)),
    "kv-choice-gemma": lambda: kv_choice("gemma-3-270m", ("_16k", "_16k_kernel15"), "Gemma-3-270M"),
    "kv-ruler-qwen-4k-question-after-progress": lambda: kv_ruler_trials(targets=((0.25, 0.95), (0.1, 0.9))),
    "kv-ruler-qwen-4k-question-after-no-prefix-progress": lambda: kv_ruler_trials(
        variant="_4k_question_after_no_prefix"),
    "kv-ruler-qwen-4k-memory-share": lambda: kv_ruler_trials(variant="_4k_memory_share"),
    "bench-mdqa-smollm2": bench_mdqa,
    "bench-mdqa-smollm2-20": lambda: bench_mdqa(variant="_20docs"),
    "bench-mdqa-smollm2-20-buckets": lambda: bench_mdqa(variant="_20docs_buckets"),
    "mdqa-search-smollm2": mdqa_search,
    "mdqa-search-gemma": lambda: mdqa_search("gemma-3-270m"),
    "bench-mdqa-gemma": lambda: bench_mdqa("gemma-3-270m"),
    "bench-vllm-kv-smollm2": bench_vllm_kv,
    "bench-vllm-kv-smollm2-full-prefill": lambda: bench_vllm_kv(variant="_full_prefill"),
    "bench-vllm-kv-smollm2-full-prefill-batched2048": lambda: bench_vllm_kv(variant="_full_prefill_batched2048"),
    "bench-vllm-kv-qwen": lambda: bench_vllm_kv("qwen2.5-coder-1.5b-instruct"),
    "bench-serve-throughput": bench_serve_throughput,
    "bench-serve-robustness": bench_serve_robustness,
    "bench-serve-vllm": bench_serve_vllm,
    "bench-startup": bench_startup,
    "bench-lmeval-ruler-smollm2": bench_lmeval_ruler,
}


def render(text: str, where: str = "") -> tuple[str, list[str]]:
    """The text with every block re-rendered, and the problems found (unknown block, missing files)."""
    problems = []

    def one(m):
        name = m.group("name")
        if name not in BLOCKS:
            problems.append(f"{where}: unknown block {name!r}")
            return m.group(0)
        try:
            body = BLOCKS[name]()
        except MissingResults as e:
            problems.append(f"{where}: block {name}: {e}")
            return m.group(0)
        return f"{m.group(1)}{_relative(body, where)}\n{m.group(4)}"

    return BLOCK.sub(one, text), problems


def _relative(body: str, where: str) -> str:
    """A block's links are written from the repository root; in a page below it (docs/...) they climb up."""
    up = "../" * where.count("/")
    return LINK.sub(lambda m: f"{m.group(1)}{up}{m.group(2)})", body) if up else body


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 on any difference or missing file")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    bad = []
    for name in DOCS:
        path = ROOT / name
        old = path.read_text()
        new, problems = render(old, name)
        bad += problems
        if args.check and new != old:
            bad.append(f"{name}: a generated block differs from its result files (run scripts/render_docs.py)")
        elif not args.check and new != old:
            path.write_text(new)
            print(f"rewrote {name}")
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
