"""The study's report: `report.md` (figures beside it) and a self-contained `report.html` (figures
inlined), built from the step result files alone, so it can be rebuilt without a model."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from attnkit.reproduce.study import STEPS

PAPER_SPARSITY = "< 5% of heads in every model family tried (Llama-2, Yi, Qwen1.5, Mistral, 4K-100K)"


def load_results(out: Path) -> dict[str, dict]:
    return {s: json.loads((out / f"{s}.json").read_text()) for s in STEPS if (out / f"{s}.json").is_file()}


def _verdict(ok: bool | None) -> str:
    return {True: "holds", False: "**does not hold**", None: "not measurable (no counted trial, or both at 0 or 100)"}[ok]


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]


def _gain_verdict(a: float | None, b: float | None, gain: dict) -> bool | None:
    """Holds when the gain's interval lies above 0; not measurable when both sit at the same bound."""
    if gain["ci95"] is None or (a == b and a in (0.0, 100.0)):
        return None
    return gain["ci95"][0] > 0


def _ci(ci) -> str:
    return f" [{ci[0]}, {ci[1]}]" if ci else ""


def heads_section(r: dict) -> list[str]:
    res = r["result"]
    s = res["summary"]
    counted = sum(t["counted"] for k, t in res["trials"].items() if k.startswith("A"))
    frac = s["fraction_above"]
    sparse_ok = None if not counted else (0 < frac < 0.05)
    ours = (f"{s['above_threshold']} of {s['heads']} heads ({100 * frac:.1f}%) score above {s['threshold']}"
            if counted else "no detection trial was answered well enough to count (recall > 50)")
    rows = [["sparsity: few heads copy from the context", PAPER_SPARSITY, ours, _verdict(sparse_ok)]]
    for key, what in (("consistency_length", f"the same heads at {res['lengths']['short'][1:]} and "
                                             f"{res['lengths']['long'][1:]} tokens"),
                      ("consistency_data", "the same heads with another needle set and haystack")):
        c = res[key]
        if c is None:
            rows.append([f"consistency: {what}", "intrinsic: the same heads across contexts and data",
                         "a run counted no trial", _verdict(None)])
            continue
        ok = c["overlap_fraction"] >= 0.5 and (c["spearman"] or 0) >= 0.5
        rows.append([f"consistency: {what}", "intrinsic: the same heads across contexts and data",
                     f"top-{c['top']} overlap {c['overlap']}/{c['top']}, Spearman {c['spearman']}", _verdict(ok)])
    if res.get("by_layer_type"):
        b = res["by_layer_type"]
        parts = ", ".join(f"{kind}: {v['above_threshold']} of {v['heads']}" for kind, v in b.items())
        rows.append(["hybrid attention: scoring heads per layer type", "(not studied: no hybrid model)", parts,
                     "finding"])
    lines = ["## Retrieval heads (Wu et al. 2024)", ""] + _table(["claim", "paper", "ours", ""], rows)
    top = ", ".join(f"{l}-{h} ({m})" for l, h, m in s["top"][:8])
    lines += ["", f"Top heads (layer-head, mean score): {top}. Trials counted per run: "
              + ", ".join(f"{k} {t['counted']}/{t['run']}" for k, t in res["trials"].items()) + ".", "",
              "![retrieval scores](head_scores.png)", ""]
    return lines


def ablate_section(r: dict) -> list[str]:
    res = r["result"]
    rows, verdicts = [], []
    for x in res["results"]:
        drop_top = (x["none"] or 0) - (x["top"] or 0)
        drop_rand = (x["none"] or 0) - (x["random"] or 0)
        ok = drop_top >= 25 and drop_top >= 2 * max(drop_rand, 0)
        verdicts.append(ok)
        rows.append([x["k"], x["none"], x["top"], f"{x['random']} ± {x['random_std']}", _verdict(ok)])
    lines = ["### Masking them (the causal claim)", "",
             "Paper (Fig. 7): masking the top retrieval heads collapses needle-in-a-haystack recall; masking as "
             "many random heads barely moves it. Ours (random heads: mean ± sd over seeds, drawn outside the "
             "scoring heads):", ""]
    lines += _table(["K masked", "no mask", "top-K", "random K", ""], rows)
    if res["single"]:
        lines += ["", "Each of the top heads masked alone: " + ", ".join(
            f"{h[0]}-{h[1]} -> {s['recall']}" for h, s in ((x["head"], x) for x in res["single"])) + "."]
    lines += ["", "![ablation](ablation_curve.png)", ""]
    return lines


def kv_section(r: dict) -> list[str]:
    res = r["result"]

    def name(x):
        return f"heads by {x['importance']}" if x["system"] == "retrieval" and x.get("importance") else x["system"]

    rows = [[name(x), x["full"], x["kv_ratio"], f"skipped: {x['skipped']}" if x.get("skipped") else
             x["recall"] if "recall_std" not in x else f"{x['recall']} ± {x['recall_std']}"] for x in res["results"]]
    first = next((x.get("importance") for x in res["results"] if x["system"] == "retrieval"), None)
    by = {(x["system"], x["full"]): x["recall"] for x in res["results"]
          if x["system"] != "retrieval" or x.get("importance") == first}
    checks = [by[("retrieval", f)] > by[("random", f)] for s, f in by
              if s == "retrieval" and by.get(("random", f)) is not None]
    ok = None if not checks else all(checks)
    prefill = {"full": "window heads trimmed after the whole prompt (RazorAttention, kvpress)",
               "window": "window heads see only their window in prefill too (DuoAttention)"}.get(res.get("prefill", "window"))
    lines = ["## Retrieval-head KV cache (attnkit, after DuoAttention / RazorAttention)", "",
             f"Full cache only for some KV heads, sink + window for the rest; the same prompts for every system, "
             f"{res['tokens']} tokens; {prefill}"
             f"{'; with a compensation token' if res.get('compensate') else ''}. KV memory measured against the "
             f"model's own cache (hybrid models: sliding layers counted as they are). Claim: at the same memory, "
             f"heads chosen by retrieval ({first or 'copy'}) score keep recall that random heads lose: {_verdict(ok)}.", ""]
    lines += _table(["system", "full fraction", "KV memory / full", "recall"], rows)
    ratios = {x["full"]: x["kv_ratio"] for x in res["results"] if x["system"] == "retrieval" and x.get("importance", first) == first}
    if len(set(ratios.values())) < len(ratios):
        lines += ["", "Budgets with the same KV memory are not filled: only KV heads with a retrieval score above 0 "
                  "are chosen, and this model has fewer of them than the larger budgets ask for (random heads "
                  "are drawn in the same number)."]
    return lines + ["", "![KV cache](kv_cache.png)", ""]


def buckets_section(r: dict) -> list[str]:
    res = r["result"]
    single, buckets = res["niah_names"]
    gain, kvg = res["niah_gain"], res["kv_retrieval_gain"]
    acc = res["kv_retrieval"]["mean"]
    ok = _gain_verdict(res["niah"][single]["mean"], res["niah"][buckets]["mean"], gain)
    ok_kv = _gain_verdict(acc["single"], acc["buckets"], kvg)
    rows = [["buckets raise NIAH recall over one base", "gains on tool use and RAG (Llama-2-7B)",
             f"{res['niah'][single]['mean']}{_ci(res['niah'][single]['ci95'])} -> "
             f"{res['niah'][buckets]['mean']}{_ci(res['niah'][buckets]['ci95'])}; gain {gain['mean']}{_ci(gain['ci95'])}",
             _verdict(ok)],
            ["buckets raise key-value retrieval accuracy", "better use of the middle of the context",
             f"{acc['single']}{_ci(res['kv_retrieval_ci']['single'])} -> {acc['buckets']}"
             f"{_ci(res['kv_retrieval_ci']['buckets'])}; gain {kvg['mean']}{_ci(kvg['ci95'])}", _verdict(ok_kv)]]
    lines = ["## Attention Buckets (Chen et al. 2024)", "",
             f"The model's own base {res['own_base']:g}; bases searched over {res['grid'][0]:g}-{res['grid'][1]:g} "
             f"(step {res['grid'][2]:g}, derived from the trained base) for distances {res['distances'][0]}-"
             f"{res['distances'][1]}: {', '.join(f'{b:g}' for b in res['bases'])}."
             + (f" ({res['message']})" if res.get("message") else "")
             + " A gain holds when its 95% bootstrap interval over paired trials lies above 0.", ""]
    lines += _table(["claim", "paper", "ours (mean [95% CI])", ""], rows)
    by_pos = res["kv_retrieval"]["accuracy"]
    lines += ["", "Key-value retrieval accuracy by gold position: " + "; ".join(
        f"{s}: " + ", ".join(f"{p}: {v}" for p, v in by_pos[s].items()) for s in by_pos) + ".", "",
        "![waveform](waveform.png)", "", "![key-value retrieval](kv_retrieval.png)", ""]
    return lines


def s2a_section(r: dict) -> list[str]:
    res = r["result"]
    lines = ["## System 2 Attention (Weston & Sukhbaatar 2023)", ""]
    if "skipped" in res:
        return lines + [f"Not run: {res['skipped']}.", ""]
    lines += [f"Backend: {', '.join(f'{k} {v}' for k, v in res['backend'].items())}. Sampling as in the paper (temperature 0.6, top-p 0.9), seeded.", ""]
    for task, title in (("sycophancy", "opinion-laden factual QA (NaturalQuestions-Open, SycophancyEval templates)"),
                        ("gsm-ic", "GSM-IC-style problems (GSM8K with one irrelevant sentence)")):
        t = res[task]
        v, paper = t["summary"]["variants"], t["summary"]["paper"]
        rows = [[name, paper.get(name), f"{v[name]['mean']}{_ci(v[name]['ci95'])}" if name in v else None]
                for name in ("baseline", "s2a", "oracle")]
        gain = (v["s2a"]["mean"] or 0) - (v["baseline"]["mean"] or 0)
        lines += [f"### {title}", ""] + _table(["variant", "paper (LLaMA-2-70B-chat)", "ours (accuracy [95% CI])"], rows)
        lines += ["", f"S2A minus baseline: {gain:+.1f} points. Rewrites parsed: {t['parse_rate']}% "
                  "(an unparsed rewrite falls back to the original prompt)."
                  + (" The model does not follow the rewrite instruction, so this is not a test of S2A on it."
                     if t["parse_rate"] < 50 else ""), "", "Three S2A rewrites:", ""]
        for ex in t["examples"]:
            lines += [f"- prompt: {_one_line(ex['prompt'])}", f"  - rewrite: {_one_line(ex['rewrite'] or '')}",
                      f"  - answer: {_one_line(ex['answer'])} (score {ex['score']})"]
        lines.append("")
    return lines


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + " ..."


SECTIONS = {"heads": heads_section, "ablate": ablate_section, "kv": kv_section, "buckets": buckets_section,
            "s2a": s2a_section}


def build_report(out: Path, command: str = "") -> Path:
    """Write out/report.md and out/report.html from the step files there; returns the .md path."""
    import torch
    import transformers

    import attnkit

    results = load_results(out)
    if not results:
        from attnkit.errors import AttnkitError
        raise AttnkitError(f"{out}: no study results to report")
    first = next(iter(results.values()))
    ident = first["model"]
    lines = [f"# attnkit reproduce: {ident.get('name', ident.get('model', '?'))}", "",
             f"attnkit {attnkit.__version__}, torch {torch.__version__}, transformers {transformers.__version__}. "
             + (f"Command: `{command}`. " if command else "")
             + "Wall time per step: " + ", ".join(f"{s} {r['seconds']:.0f} s" for s, r in results.items())
             + f" (total {sum(r['seconds'] for r in results.values()) / 60:.1f} min).", "",
             "Model: " + ", ".join(f"{k} {v}" for k, v in ident.items()) + ".", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in first["settings"].items()) + ".", ""]
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
