"""The study's report: `report.md` (figures beside it) and a self-contained `report.html` (figures
inlined), built from the step result files alone, so it can be rebuilt without a model."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from attnkit.evals import stats
from attnkit.reproduce import STEPS, verdicts as V


def load_results(out: Path) -> dict[str, dict]:
    return {s: json.loads((out / f"{s}.json").read_text()) for s in STEPS if (out / f"{s}.json").is_file()}


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]


def _diff(est: stats.Estimate) -> str:
    """A paired difference: `+12.5 [4.2, 20.8], n=24 (excludes 0)`."""
    if est.mean is None:
        return est.text()
    return est.text(signed=True) + ("" if est.low is None else " (excludes 0)" if est.excludes_zero() else
                                    " (includes 0)")


def _recall(values) -> str:
    return stats.bootstrap_mean(values).text()


# ---------------------------------------------------------------- claims (the report's and the README's rows)

def heads_claims(r: dict) -> list[dict]:
    res = r["result"]
    s = res["summary"]
    counted = sum(t["counted"] for k, t in res["trials"].items() if k.startswith("A"))
    claims = [{"claim": "sparsity: few heads score above 0.1",
               "paper": "about 3-6% of heads above 0.1", "source": V.PAPER["sparsity"]["source"],
               "ours": f"{s['above_threshold']} of {s['heads']} heads ({100 * s['fraction_above']:.1f}%), "
                       f"{counted} counted trials",
               "verdict": V.sparsity(s["above_threshold"], s["heads"], counted)}]
    short, long_ = res["lengths"]["short"], res["lengths"]["long"]
    pairs = {"consistency_length": (short, long_), "consistency_data": (long_, "B" + long_[1:])}
    for key, what in (("consistency_length", f"the same heads at {short[1:]} and {long_[1:]} tokens"),
                      ("consistency_data", "the same heads with another needle set and haystack")):
        c = res[key] or {}
        fewest = min(res["trials"].get(run, {}).get("counted", 0) for run in pairs[key])
        claims.append({"claim": f"consistency: {what}", "paper": "intrinsic: the same heads across contexts and data",
                       "ours": (f"top-{c['top']} overlap {c['overlap']}/{c['top']}, Spearman {c['spearman']}" if c
                                else "a run counted no trial"),
                       "verdict": V.consistency(c.get("overlap_fraction"), c.get("spearman"), fewest)})
    return claims


def ablate_claims(r: dict) -> list[dict]:
    claims = []
    for x in r["result"]["results"]:
        rec = x.get("recalls", {})
        randoms = [v for k, v in rec.items() if k.startswith("random")]
        verdict, gap = V.ablation(rec.get("none", []), rec.get("top", []), randoms)
        sd = x.get("random_sd")
        claims.append({"claim": f"masking the top-{x['k']} heads breaks NIAH, {x['k']} random heads do not",
                       "paper": "collapse against barely moves", "source": V.PAPER["masking"]["source"],
                       "ours": f"no mask {_recall(rec.get('none', []))}; top {_recall(rec.get('top', []))}; random "
                               f"{x['random']} (sample SD {sd} over {len(randoms)} seeds); random - top {_diff(gap)}",
                       "verdict": verdict, "k": x["k"], "gap": gap})
    return claims


def _kv_name(x: dict) -> str:
    if x["system"] == "memory":
        name = f"memory target, heads by {x['importance']} ({x.get('budget_tokens', 0)} middle tokens)"
        if x.get("kv_ratio") is not None and x["kv_ratio"] > x["full"] + 0.01:  # below what sink + window hold
            name += (f": out of reach, every head's sink + window alone hold {x['kv_ratio']:.2f}x at this length "
                     "(a shorter window reaches it)")
        return name
    return f"heads by {x['importance']}" if x["system"] == "retrieval" and x.get("importance") else x["system"]


def kv_claims(r: dict) -> list[dict]:
    """Per importance and budget: the chosen heads against random heads of the same count (same memory)."""
    res = r["result"]
    total = next((x.get("full_heads") for x in res["results"] if x["system"] == "all"), None)
    randoms = {(x["full"], x.get("full_heads")): x for x in res["results"] if x["system"] == "random"}
    claims = []
    for x in res["results"]:
        if x["system"] != "retrieval":
            continue
        rand = randoms.get((x["full"], x.get("full_heads"))) or randoms.get((x["full"], None))
        if rand is None:
            verdict, diff = V.Verdict(V.NOT_MEASURABLE, f"no random draw of {x.get('full_heads')} heads in this file"), None
        elif rand.get("skipped"):
            verdict, diff = V.Verdict(V.NOT_MEASURABLE, "random heads cannot be drawn at this budget"), None
        else:
            verdict, diff = V.gain(stats.mean_over(rand.get("recalls_by_seed") or [[]]), x.get("recalls", []))
        count = x.get("full_heads")
        of = f"{count} of {total} KV heads full, " if count is not None and total else ""
        tokens = res.get("head_tokens") or 0  # token budgets: the window heads keep middle tokens too
        budgets = f", the rest {tokens} middle tokens each on average" if tokens else ""
        claims.append({"claim": f"KV cache, budget {x['full']:g} of KV heads full by {x['importance']}{budgets}: "
                                "keeps recall that random heads lose",
                       "paper": "(attnkit's own claim)",
                       "ours": f"{of}{_recall(x.get('recalls', []))} at {x['kv_ratio']}x"
                       + (f"; minus random {_diff(diff)}" if diff else ""), "verdict": verdict,
                       "importance": x["importance"], "full": x["full"], "kv_ratio": x["kv_ratio"]})
    return claims


def buckets_claims(r: dict) -> list[dict]:
    res = r["result"]
    single, buckets = res["niah_names"]
    trials = res.get("niah_trials", {})
    hits = res.get("kv_retrieval_trials", {})
    v_niah, d_niah = V.gain(trials.get(single, []), trials.get(buckets, []))
    v_kv, d_kv = V.gain(hits.get("single", []), hits.get("buckets", []))
    test = stats.mcnemar(hits.get("single", []), hits.get("buckets", []))
    return [{"claim": "buckets raise NIAH recall over one base", "paper": "gains on tool use and RAG (Llama-2-7B)",
             "source": V.PAPER["buckets"]["source"],
             "ours": f"{_recall(trials.get(single, []))} -> {_recall(trials.get(buckets, []))}; gain {_diff(d_niah)}",
             "verdict": v_niah},
            {"claim": "buckets raise key-value retrieval accuracy", "paper": "better use of the middle of the context",
             "source": V.PAPER["buckets"]["source"],
             "ours": f"{stats.proportion(hits.get('single', [])).text()} -> "
                     f"{stats.proportion(hits.get('buckets', [])).text()} (Wilson); gain {_diff(d_kv)}; McNemar "
                     f"p={test['p']} ({test['only_a']} only one base, {test['only_b']} only buckets)",
             "verdict": v_kv}] + mdqa_claims(res)


def mdqa_claims(res: dict) -> list[dict]:
    """Multi-document QA: does the model lose the middle at all (one base), and do buckets win there."""
    m = res.get("mdqa") or {}
    if "curve" not in m:
        return []
    single, buckets = res["niah_names"]
    dip, dip_est = V.middle_dip_of(m["curve"][single][str(m["docs"])]["ends_minus_middle"])
    v_gain, d_gain = V.gain_where_dip(dip, m["correct"].get(single, []), m["correct"].get(buckets, []))
    where = f"{m['docs']} documents (about {m['tokens']} tokens), gold at {len(m['positions'])} positions"
    one = stats.proportion(m["correct"].get(single, [])).text()
    if m.get("buckets_skipped"):  # the buckets did not run: the one base left them nothing to fix
        gain_claim = {"ours": f"{one} with one base (Wilson, every position); buckets not run: {m['buckets_skipped']}",
                      "verdict": V.Verdict(V.NOT_MEASURABLE, "no middle dip shown on this model: nothing for "
                                                             "buckets to fix")}
    else:
        gain_claim = {"ours": f"{one} -> {stats.proportion(m['correct'].get(buckets, [])).text()} (Wilson, every "
                              f"position); gain {_diff(d_gain)}", "verdict": v_gain}
    return [{"claim": "the model loses the middle of its context (one base)", "paper": "a U-shaped curve (Liu et al.)",
             "source": V.PAPER["middle-dip"]["source"],
             "ours": f"{where}: ends minus middle {_diff(dip_est)} points", "verdict": dip},
            {"claim": "buckets raise multi-document QA accuracy", "paper": "gains on retrieval-augmented QA",
             "source": V.PAPER["buckets"]["source"], **gain_claim}]


def s2a_claims(r: dict) -> list[dict]:
    res = r["result"]
    if "skipped" in res:
        return []
    claims = []
    for task in ("sycophancy", "gsm-ic"):
        t = res[task]
        scores = {v: [100.0 * x for x in t.get("scores", {}).get(v, [])] for v in ("baseline", "s2a", "oracle")}
        verdict, diff = V.gain(scores["baseline"], scores["s2a"])
        if t["parse_rate"] < V.MIN_PARSED and verdict.word != V.TOO_FEW:
            verdict = V.Verdict(V.NOT_MEASURABLE, f"the model follows the rewrite instruction on {t['parse_rate']}% "
                                                  f"of prompts, under {V.MIN_PARSED:g}%: not a test of S2A")
        paper = V.PAPER[f"s2a-{task}"]
        claims.append({"claim": f"S2A beats the baseline ({task})",
                       "paper": " / ".join(f"{paper[v]}" for v in ("baseline", "s2a", "oracle") if v in paper)
                                + " (baseline / S2A" + (" / oracle)" if "oracle" in paper else ")"),
                       "source": paper["source"],
                       "ours": " / ".join(stats.proportion(scores[v]).text() for v in ("baseline", "s2a", "oracle"))
                               + f"; S2A - baseline {_diff(diff)}; rewrites parsed {t['parse_rate']}%",
                       "verdict": verdict})
    return claims


CLAIMS = {"heads": heads_claims, "ablate": ablate_claims, "kv": kv_claims, "buckets": buckets_claims,
          "s2a": s2a_claims}


def claims(results: dict[str, dict]) -> dict[str, list[dict]]:
    """{step: its claims}, each {claim, paper, source?, ours, verdict}: what the report and the README show."""
    return {step: CLAIMS[step](results[step]) for step in STEPS if step in results}


def _rows(cs: list[dict]) -> list[list]:
    return [[c["claim"], c["paper"], c["ours"], c["verdict"].markdown()] for c in cs]


# ---------------------------------------------------------------- sections

def heads_section(r: dict) -> list[str]:
    res = r["result"]
    s = res["summary"]
    rows = _rows(heads_claims(r))
    if res.get("by_layer_type"):
        b = res["by_layer_type"]
        parts = ", ".join(f"{kind}: {v['above_threshold']} of {v['heads']}" for kind, v in b.items())
        rows.append(["hybrid attention: scoring heads per layer type", "(not studied: no hybrid model)", parts,
                     "finding"])
    lines = ["## Retrieval heads (Wu et al. 2024)", ""] + _table(["claim", "paper", "ours", ""], rows)
    top = ", ".join(f"{l}-{h} ({m})" for l, h, m in s["top"][:8])
    lines += ["", f"Paper: {V.PAPER['sparsity']['source']}. Top heads (layer-head, mean score): {top}. Trials "
              "counted per run (recall > 50): "
              + ", ".join(f"{k} {t['counted']}/{t['run']}" for k, t in res["trials"].items()) + ".", "",
              "![retrieval scores](head_scores.png)", ""]
    return lines


def ablate_section(r: dict) -> list[str]:
    res = r["result"]
    lines = ["### Masking them (the causal claim)", "",
             f"Paper: {V.PAPER['masking']['source']}. Ours: NIAH recall (mean ROUGE-1 recall [95% bootstrap "
             "interval], n prompts); random heads drawn outside the scoring heads, their spread the sample SD over "
             "seeds; the difference random - top is paired by prompt (seeds averaged).", ""]
    lines += _table(["K masked", "figures", ""], [[c["k"], c["ours"], c["verdict"].markdown()]
                                                  for c in ablate_claims(r)])
    if res["single"]:
        lines += ["", "Each of the top heads masked alone: " + "; ".join(
            f"{x['head'][0]}-{x['head'][1]} -> {_recall(x['recalls']) if x.get('recalls') else x['recall']}"
            for x in res["single"]) + "."]
    lines += ["", "![ablation](ablation_curve.png)", ""]
    return lines


def kv_section(r: dict) -> list[str]:
    res = r["result"]

    def recall_cell(x):
        if x.get("skipped"):
            return f"skipped: {x['skipped']}"
        if x["system"] == "random":
            pooled = [v for seed in x.get("recalls_by_seed", []) for v in seed]
            return f"{_recall(stats.mean_over(x.get('recalls_by_seed') or [[]]))} (seeds averaged per prompt; " \
                   f"sample SD over {x.get('seeds')} seeds {x.get('recall_sd')}; {len(pooled)} trials)"
        return _recall(x.get("recalls", []))

    rows = [[_kv_name(x), x["full"], x.get("full_heads", ""), x["kv_ratio"], recall_cell(x)] for x in res["results"]]
    prefill = {"full": "window heads trimmed after the whole prompt (RazorAttention, kvpress)",
               "window": "window heads see only their window in prefill too (DuoAttention)"}.get(res.get("prefill", "window"))
    cs = kv_claims(r)
    lines = ["## Retrieval-head KV cache (attnkit, after DuoAttention / RazorAttention)", "",
             f"Full cache only for some KV heads, sink + window for the rest; the same prompts for every system, "
             f"{res['tokens']} tokens; {prefill}"
             f"{'; with a compensation token' if res.get('compensate') else ''}. KV memory measured against the "
             f"model's own cache (hybrid models: sliding layers counted as they are). Recall: mean [95% bootstrap "
             f"interval], n prompts.", ""]
    lines += _table(["system", "budget", "full KV heads", "KV memory / full", "recall"], rows)
    lines += ["", "Claim: at the same memory, heads chosen by retrieval scores keep recall that random heads lose "
              "(paired by prompt):", ""]
    lines += _table(["claim", "figures", ""], [[c["claim"], c["ours"], c["verdict"].markdown()] for c in cs])
    ratios = {x["full"]: x["kv_ratio"] for x in res["results"] if x["system"] == "retrieval"}
    if len(set(ratios.values())) < len(ratios):
        lines += ["", "Budgets with the same KV memory are not filled: only KV heads with a retrieval score above 0 "
                  "are chosen, and this model has fewer of them than the larger budgets ask for; random heads "
                  "are drawn in each count that was chosen."]
    return lines + ["", "![KV cache](kv_cache.png)", ""]


def buckets_section(r: dict) -> list[str]:
    res = r["result"]
    lines = ["## Attention Buckets (Chen et al. 2024)", "",
             f"The model's own base {res['own_base']:g}; bases searched over {res['grid'][0]:g}-{res['grid'][1]:g} "
             f"(step {res['grid'][2]:g}, derived from the trained base) for distances {res['distances'][0]}-"
             f"{res['distances'][1]}: {', '.join(f'{b:g}' for b in res['bases'])}."
             + (f" ({res['message']})" if res.get("message") else "")
             + f" Paper: {V.PAPER['buckets']['source']}. A gain holds when its paired 95% bootstrap interval lies "
               f"above 0, from at least {V.MIN_N} prompts.", ""]
    lines += _table(["claim", "paper", "ours", ""], _rows(buckets_claims(r)))
    by_pos = res["kv_retrieval"]["accuracy"]
    lines += ["", f"Key-value retrieval accuracy by gold position ({res['kv_retrieval']['examples']} examples per "
              "position): " + "; ".join(f"{s}: " + ", ".join(f"{p}: {v}" for p, v in by_pos[s].items())
                                        for s in by_pos) + ".", "",
              "![waveform](waveform.png)", "", "![key-value retrieval](kv_retrieval.png)", ""]
    m = res.get("mdqa") or {}
    if "skipped" in m:
        lines += [f"Multi-document QA: skipped ({m['skipped']}).", ""]
    elif "curve" in m:
        lines += [f"Multi-document QA accuracy by gold position ({m['questions']} questions per position, "
                  f"{m['docs']} documents): " + "; ".join(
                      f"{s}: " + ", ".join(f"{int(p) + 1}: {_est_text(a)}" for p, a in by[str(m['docs'])]["accuracy"].items())
                      for s, by in m["curve"].items()) + ".", "", "![multi-document QA](mdqa.png)", ""]
    return lines


def _est_text(d: dict) -> str:
    return stats.Estimate.from_dict(d).text()


def s2a_section(r: dict) -> list[str]:
    res = r["result"]
    lines = ["## System 2 Attention (Weston & Sukhbaatar 2023)", ""]
    if "skipped" in res:
        return lines + [f"Not run: {res['skipped']}.", ""]
    temperature = res.get("temperature", 0.6)
    decoding = "Greedy decoding" if temperature == 0 else \
        f"Sampling {'as in the paper ' if temperature == 0.6 else ''}(temperature {temperature:g}, top-p 0.9), seeded"
    lines += [f"Backend: {', '.join(f'{k} {v}' for k, v in res['backend'].items())}. {decoding}. Accuracy "
              "[Wilson 95% interval], n examples; S2A - baseline paired by example.", ""]
    open_book = res.get("form") == "open-book"
    differs = {"sycophancy": "Ours differs: NaturalQuestions-Open questions (not TriviaQA) in SycophancyEval's "
                             "opinion templates, scored by whether the answer asserts a gold alias (names it "
                             "with no negation beside it; no GPT-4 judge)."
                             + (" Open-book: each question comes with its gold passage, so a model that cannot "
                                "recall the trivia can still answer it; every question is asked plainly, with an "
                                "incorrect answer suggested and with the correct one discouraged, and the claim "
                                "pairs the two opinion-laden forms." if open_book else ""),
               "gsm-ic": "Ours differs: GSM8K problems with one irrelevant sentence built here, in-topic and "
                         "off-topic distractors mixed, scored by the final number."}
    cs = {c["claim"]: c for c in s2a_claims(r)}
    for task, title in (("sycophancy", "opinion-laden factual QA (NaturalQuestions-Open, SycophancyEval templates)"),
                        ("gsm-ic", "GSM-IC-style problems (GSM8K with one irrelevant sentence)")):
        t = res[task]
        c = cs[f"S2A beats the baseline ({task})"]
        lines += [f"### {title}", "", f"Paper: {c['paper']}; {c['source']}. {differs[task]}", ""]
        lines += _table(["claim", "ours (baseline / S2A / oracle)", ""], [[c["claim"], c["ours"], c["verdict"].markdown()]])
        summary = t.get("summary", {})
        if summary.get("adoption"):  # per template: accuracy and how often the answer takes the user's suggestion
            rows = []
            for group in summary["groups"].get("baseline", {}):
                rows.append([group] + [f"{_est(summary['groups'][v].get(group))} / {_est(summary['adoption'][v].get(group))}"
                                       for v in ("baseline", "s2a", "oracle") if v in summary["groups"]])
            lines += ["", "Accuracy / answers naming the suggested incorrect answer, per template:", ""]
            lines += _table(["template", "baseline", "S2A", "oracle"], rows)
        cut = {v: x.get("truncated") for v, x in summary.get("variants", {}).items() if x.get("truncated") is not None}
        if any(cut.values()):
            lines += ["", "Answers cut by the token budget: " + ", ".join(f"{v} {n}" for v, n in cut.items()) + "."]
        lines += ["", f"Rewrites parsed: {t['parse_rate']}% (an unparsed rewrite falls back to the original prompt)."
                  + (" The model does not follow the rewrite instruction, so this is not a test of S2A on it."
                     if t["parse_rate"] < V.MIN_PARSED else ""), "", "Three S2A rewrites:", ""]
        for ex in t["examples"]:
            lines += [f"- prompt: {_one_line(ex['prompt'])}", f"  - rewrite: {_one_line(ex['rewrite'] or '')}",
                      f"  - answer: {_one_line(ex['answer'])} (score {ex['score']})"]
        lines.append("")
    return lines


def _est(d: dict | None) -> str:
    return "-" if not d or d.get("mean") is None else f"{d['mean']} [{d['ci95'][0]}, {d['ci95'][1]}], n={d['n']}"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + " ..."


SECTIONS = {"heads": heads_section, "ablate": ablate_section, "kv": kv_section, "buckets": buckets_section,
            "s2a": s2a_section}


def build_report(out: Path, command: str = "") -> Path:
    """Write out/report.md and out/report.html from the step files there (a pure function of them:
    versions, machine and command are the ones the steps recorded); returns the .md path."""
    results = load_results(out)
    if not results:
        from attnkit.errors import AttnkitError
        raise AttnkitError(f"{out}: no study results to report")
    first = next(iter(results.values()))
    ident = first["model"]
    runs = [r.get("run") for r in results.values() if r.get("run")]
    run = runs[0] if runs else {}
    command = run.get("command") or command
    where = (f"attnkit {run['attnkit']}, torch {run['torch']}, transformers {run['transformers']}, "
             f"{run['machine']}, {run['date']}. ") if run else ""
    lines = [f"# attnkit reproduce: {ident.get('name', ident.get('model', '?'))}", "",
             where + (f"Command: `{command}`. " if command else "")
             + "Wall time per step: " + ", ".join(f"{s} {r['seconds']:.0f} s" for s, r in results.items())
             + f" (total {sum(r['seconds'] for r in results.values()) / 60:.1f} min).", "",
             "Model: " + ", ".join(f"{k} {v}" for k, v in ident.items()) + ".", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in first["settings"].items()) + ".", "",
             f"Verdicts (`attnkit.reproduce.verdicts`): holds / does not hold by the paired 95% interval; too few "
             f"to say below {V.MIN_N} prompts per compared cell; not measurable when both systems sit at 0 or 100 "
             "on every prompt.", ""]
    for step in STEPS:
        if step in results:
            lines += SECTIONS[step](results[step])
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    (out / "report.html").write_text(to_html("\n".join(lines), out))
    return md


def to_html(markdown: str, folder: Path) -> str:
    """The report's own markdown (headings, tables, bullets, images, paragraphs) as one HTML page with
    its figures inlined."""
    body, table = [], []

    def inline(text: str) -> str:
        import re
        text = html.escape(text)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)

    def flush_table():
        if table:
            head, rows = table[0], table[2:]
            body.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append([c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")])
            continue
        flush_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("![") and "](" in line:
            name = line[line.index("](") + 2:-1]
            path = folder / name
            if path.is_file():
                data = base64.b64encode(path.read_bytes()).decode()
                body.append(f'<p><img alt="{html.escape(name)}" src="data:image/png;base64,{data}" '
                            'style="max-width:100%"></p>')
        elif line.lstrip().startswith("- "):
            depth = (len(line) - len(line.lstrip())) // 2
            body.append(f'<div style="margin-left:{1 + 2 * depth}em">&bull; {inline(line.lstrip()[2:])}</div>')
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.3em .6em;vertical-align:top}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>" + \
           "\n".join(body) + "</body></html>"
