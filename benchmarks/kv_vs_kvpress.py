"""attnkit's retrieval-head KV cache against NVIDIA kvpress's presses, at equal KV memory, on the
same NIAH prompts (the same token ids for every system).

For every context length and needle kind (6-digit number needles, the retrieval-head detection
sentence needles), the prompts are built once with attnkit's NIAH builder (the chat template when
the tokenizer has one). Then, at each KV-memory target (fraction of the model's own cache):

* attnkit: full-cache heads chosen by each importance (copy score, copy + echo + induction, learned
  gates when a gate file is given, random), with window heads seeing only their window in prefill
  ("window", DuoAttention's streaming heads) or trimmed after a whole-prompt prefill ("full", what
  RazorAttention and kvpress do), and the compensation token; as many heads as fit the target;
* kvpress (its own venv, created here: kvpress 0.5.5 pins transformers < 5.3): no press,
  StreamingLLM, SnapKV, ExpectedAttention, TOVA, Knorm at compression ratio 1 - target, and
  DuoAttentionPress given attnkit's combined scores with attnkit's sink and window.

Every system's answer ends by attnkit's clean stop rule and is scored by ROUGE-1 recall of the
needle. Rows go to OUT/rows.jsonl (attnkit) and OUT/kvpress_rows.jsonl as they finish; a rerun
resumes. The summary (OUT/summary.md, OUT/summary.json, OUT/recall_vs_memory.png) has recall,
measured KV bytes over the full cache's, prefill seconds and decode ms/token side by side.

    python benchmarks/kv_vs_kvpress.py --model smollm2 --lengths 2048 --out bench/kvp_smollm2
    python benchmarks/kv_vs_kvpress.py --model smollm2 --lengths 8192 --depths 50 --targets 0.15,0.3 --out ...

Score files: --scores DIR with head_scores.json (copy scores, `attnkit heads detect` or `attnkit
reproduce --only heads`); echo.json / induction.json are computed when missing. Every other score
file there (gates.json from `attnkit heads gates`, copy scores measured at another length ...) is a
source named by its stem, and a variant joins sources with "+": `--variants copy+copy8k:full`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from attnkit.core.decode import cache_kwarg, eos_ids
from attnkit.core.family import architecture
from attnkit.core.generate import PLAIN, Stopper, prefill
from attnkit.kvcache.config import HeadKVConfig, native_kv_bytes
from attnkit.core.loading import load_model
from attnkit.errors import AttnkitError
from attnkit.evals import niah as N
from attnkit.evals.runner import run_grid
from attnkit.kvcache.plan import plan
from attnkit.heads.scores import load_scores, save_scores

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data" / "retrieval_head"
PRESSES = ("StreamingLLMPress", "SnapKVPress", "ExpectedAttentionPress", "TOVAPress", "KnormPress")
KVPRESS = "kvpress==0.5.5"


def ensure_kvpress_venv(path: Path) -> Path:
    """A venv with kvpress and torch 2.13.0 (the CPU build on disk); created once."""
    python = path / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import kvpress"], capture_output=True).returncode == 0:
        return python
    print(f"creating the kvpress venv at {path} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", KVPRESS], check=True)
    return python


def prompts_for(tok, kind: str, length: int, depths: list[float], haystack: str, chat: bool,
                max_needles: int | None = None) -> list[dict]:
    from attnkit.reproduce.study import number_needles

    if kind == "number":
        needles = number_needles(6, 0)
    else:
        path = SHARED / "haystack_for_detect" / "needles.jsonl"
        if not path.is_file():
            raise SystemExit(f"sentence needles need {path} (../shared/data); run with --needles number")
        needles = N.load_needles(path)
    needles = needles[:max_needles] if max_needles else needles
    builder = N.prompt_builder("clean", tok, haystack, chat, length)
    out = []
    for i, needle in enumerate(needles):
        for depth in depths:
            built = builder.build(needle, length, depth)
            digest = hashlib.sha1(str(built.input_ids[0].tolist()).encode()).hexdigest()[:8]  # rows never mix prompts
            out.append({"id": f"{kind}-{length}-{i}-{depth:g}-{digest}", "kind": kind, "length": length, "depth": depth,
                        "needle": i, "reference": needle.real_needle, "input_ids": built.input_ids[0].tolist(),
                        "tokens": built.input_ids.shape[1]})
    return out


def answer_of(tok, stopper: Stopper, ids: list[int]) -> str:
    row, kept = stopper.new_row(), []
    for t in ids:
        kept.append(t)
        if stopper.stops(row, kept):
            break
    return tok.decode(kept, skip_special_tokens=True).strip()


@torch.no_grad()
def run_attnkit(model, tok, technique, ids: list[int], chunk: int | None, max_new: int, stopper: Stopper) -> dict:
    """Prefill, then greedy decoding with every step timed; the answer stops by the clean rule."""
    x = torch.tensor([ids], device=next(model.parameters()).device)
    with (technique or PLAIN).prepare(model) as session:
        cache = session.new_cache()
        t = time.perf_counter()
        out = prefill(model, x, None, cache, chunk)
        prefill_s = time.perf_counter() - t
        size = cache.kv_bytes() if hasattr(cache, "kv_bytes") else \
            sum(t_.numel() * t_.element_size() for layer in cache.layers for t_ in (layer.keys, layer.values))
        generated, steps, row = [], [], stopper.new_row()
        nxt = out.logits[0, -1].argmax().item()
        for _ in range(max_new):
            generated.append(nxt)
            if stopper.stops(row, generated):
                break
            t = time.perf_counter()
            out = model(input_ids=torch.tensor([[nxt]], device=x.device), **cache_kwarg(model, cache), use_cache=True)
            steps.append(time.perf_counter() - t)
            nxt = out.logits[0, -1].argmax().item()
    return {"ids": generated, "kv_bytes": size, "prefill_s": round(prefill_s, 4),
            "decode_ms": round(1000 * statistics.median(steps), 3) if steps else None}


def count_for(model_config, target: float, length: int, sink: int, window: int, compensate: bool = False) -> int:
    """The most full-cache KV heads whose cache stays within `target` of the model's own."""
    arch = architecture(model_config)
    pool = [(l, g) for l in arch.full_layers for g in range(arch.kv_heads)]
    native = native_kv_bytes(arch, length)
    best = 0
    for n in range(len(pool) + 1):  # bytes depend on how many heads are full, not which
        if HeadKVConfig(frozenset(pool[:n]), sink, window, compensate=compensate).kv_bytes(arch, length) <= \
                target * native + 1e-9:
            best = n
    return best


def duo_scores(sets: list[dict], arch) -> list[list[float]]:
    """attnkit's combined head importance as DuoAttentionPress takes it: [layers, KV heads], 0 in sliding layers."""
    from attnkit.kvcache.plan import combine

    kv = combine(sets, arch.layers, arch.query_heads, arch.kv_heads)
    return [[kv[(l, g)] if arch.layer_types[l] == "full" else 0.0 for g in range(arch.kv_heads)]
            for l in range(arch.layers)]


VARIANTS = "copy:window,copy+echo+induction:window,copy+echo+induction:full,gates:full," \
           "copy+echo+induction:full:compensated,random:full"


def attnkit_systems(sources: dict, model_config, target: float, length: int, sink: int, window: int,
                    spec: str | None = None) -> list[dict]:
    """(name, technique, chunk) of every attnkit row at one memory target; `spec` as --variants."""
    systems = []
    variants = []
    for item in (spec or VARIANTS).split(","):
        importance, mode, *rest = item.split(":")
        missing = [name for name in importance.split("+") if name not in sources and importance != "random"]
        if missing:
            print(f"skipped: {item}: no {', '.join(m + '.json' for m in missing)} in --scores", file=sys.stderr)
            continue
        variants.append((importance, mode, rest == ["compensated"]))
    for importance, mode, comp in variants:
        n = count_for(model_config, target, length, sink, window, comp)
        how = "random" if importance == "random" else "retrieval"
        names = ["copy", "echo", "induction"] if importance == "random" else importance.split("+")
        sets = [scores for name in names for scores in sources[name]]
        chunk = length if mode == "full" else 2048
        name = f"attnkit {importance}, {mode} prefill" + (", compensated" if comp else "")
        try:
            cfg = plan(sets, model_config, how, count=n, sink=sink, window=window, prefill_chunk=chunk,
                       compensate=comp, prefill_mode=mode)
        except AttnkitError as e:  # e.g. no head left to draw at random (Gemma-3 has 3 global KV heads)
            print(f"skipped: {name} at {target:g}x: {e}", file=sys.stderr)
            continue
        systems.append({"system": name, "target": target, "technique": cfg, "chunk": chunk, "full_heads": len(cfg.full)})
    return systems


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lengths", default="2048")
    p.add_argument("--kinds", default="number,sentence", help="needle kinds: number, sentence")
    p.add_argument("--depths", default="25,75")
    p.add_argument("--max-needles", type=int, default=None, help="the first N needles of each kind (6 numbers, 3 sentences)")
    p.add_argument("--targets", default="0.15,0.3,0.5", help="KV memory, fractions of the model's own cache")
    p.add_argument("--sink", type=int, default=16)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--scores", type=Path, required=True, help="folder with head_scores.json (+ echo, induction, gates)")
    p.add_argument("--haystack", type=Path, default=SHARED / "PaulGrahamEssays")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--presses", default=",".join(PRESSES) + ",DuoAttentionPress")
    p.add_argument("--variants", default=None, help="attnkit rows, e.g. copy:window,copy+echo+induction:full "
                                                  "(importance:prefill[:compensated]); default: all")
    p.add_argument("--full-chunk", type=int, default=None,
                   help="prefill chunk of the full-cache row (default: the whole prompt at once); on a hybrid "
                        "model at 32K, chunks spare the sliding layers a full-length mask")
    p.add_argument("--skip-kvpress", action="store_true")
    p.add_argument("--kvpress-venv", type=Path, default=HERE / ".kvpress-venv")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok = load_model(args.model)
    arch = architecture(model.config)
    chat = N.use_chat_template(tok, None)
    lengths, depths = [int(x) for x in args.lengths.split(",")], [float(x) for x in args.depths.split(",")]
    targets = [float(x) for x in args.targets.split(",")]
    haystack = N.load_haystack(args.haystack if args.haystack.exists() else None)

    # --- score sources --------------------------------------------------------------------------
    copy_path = args.scores / "head_scores.json"
    if not copy_path.is_file():
        raise SystemExit(f"{copy_path} is missing: attnkit reproduce --model {args.model} --quick --only heads "
                         f"--out {args.scores}")
    if not (args.scores / "echo.json").is_file():
        from attnkit.heads.patterns import pattern_scores
        echo, induction = pattern_scores(model, tok)
        save_scores(echo, args.scores / "echo.json")
        save_scores(induction, args.scores / "induction.json")
    # every score file of the folder is a source named by its stem (head_scores.json: "copy");
    # a variant's importance joins sources with "+" (their combination, kvcache.plan.combine)
    sources = {}
    for f in sorted(args.scores.glob("*.json")):
        try:
            sources["copy" if f.stem == "head_scores" else f.stem] = [load_scores(f)]
        except (AttnkitError, ValueError, KeyError, TypeError) as e:
            print(f"not a score file, left out: {f} ({e})", file=sys.stderr)

    # --- prompts (exported once: kvpress answers the same token ids) ------------------------------
    prompts = [q for length in lengths for kind in args.kinds.split(",")
               for q in prompts_for(tok, kind, length, depths, haystack, chat, args.max_needles)]
    by_id = {q["id"]: q for q in prompts}
    stopper = Stopper(tok, eos_ids(model, tok), "clean")
    settings = {"model": args.model, "sink": args.sink, "window": args.window, "chat_template": chat,
                "max_new_tokens": args.max_new_tokens, "haystack": str(args.haystack)}
    if args.full_chunk:  # only when set, so folders from before the option still resume
        settings["full_chunk"] = args.full_chunk

    # --- attnkit rows -----------------------------------------------------------------------------
    systems = {"full cache": {"system": "full cache", "target": 1.0, "technique": None, "chunk": args.full_chunk,
                              "full_heads": None}}
    tokens = {L: round(statistics.fmean(q["tokens"] for q in prompts if q["length"] == L)) for L in lengths}
    for length in lengths:  # heads are counted to fit the target at the prompts' mean token count
        for t in targets:
            for s in attnkit_systems(sources, model.config, t, tokens[length], args.sink, args.window, args.variants):
                systems[f"{s['system']} @ {t:g} @ {length}"] = {**s, "length": length}
    cells = [{"system": s["system"], "target": s["target"], "prompt": q["id"]}
             for key, s in systems.items() for q in prompts if s.get("length", q["length"]) == q["length"]]

    def work(cell):
        key = cell["system"] if cell["system"] == "full cache" else \
            f"{cell['system']} @ {cell['target']:g} @ {by_id[cell['prompt']]['length']}"
        s, q = systems[key], by_id[cell["prompt"]]
        row = run_attnkit(model, tok, s["technique"], q["input_ids"], s["chunk"], args.max_new_tokens, stopper)
        answer = answer_of(tok, stopper, row["ids"])
        return {**row, "answer": answer, "recall": N.recall(answer, q["reference"]), "full_heads": s["full_heads"]}

    rows = run_grid(cells, ("system", "target", "prompt"), work, args.out / "rows.jsonl",
                    description="attnkit trials", settings=settings)

    # --- kvpress rows -----------------------------------------------------------------------------
    kv_rows = []
    if not args.skip_kvpress:
        python = ensure_kvpress_venv(args.kvpress_venv)
        from attnkit.core.models import pulled_path
        duo = duo_scores(sources["copy"] + sources["echo"] + sources["induction"], arch)
        presses = [{"name": "none", "ratio": 0.0}]
        for t in targets:
            for name in args.presses.split(","):
                if name == "DuoAttentionPress":
                    continue
                presses.append({"name": name, "ratio": round(1 - t, 4)})
        jobs = []
        for length in lengths:
            mine = [q for q in prompts if q["length"] == length]
            duo_presses = []
            if "DuoAttentionPress" in args.presses:
                for t in targets:  # the streaming fraction that lands on the target, as attnkit's rows
                    n = count_for(model.config, t, tokens[length], args.sink, args.window)
                    duo_presses.append({"name": "DuoAttentionPress", "ratio": round(1 - n / (arch.layers * arch.kv_heads), 4),
                                        "target": t})
            jobs.append((length, mine, presses + duo_presses))
        out_rows = args.out / "kvpress_rows.jsonl"
        marker = args.out / "kvpress_settings.json"
        mine_settings = {k: settings[k] for k in ("model", "sink", "window", "max_new_tokens")}
        if marker.is_file() and json.loads(marker.read_text()) != mine_settings:
            raise SystemExit(f"{out_rows} holds rows of other settings ({marker.read_text().strip()}): use another --out")
        marker.write_text(json.dumps(mine_settings))
        for length, mine, press_list in jobs:
            job = {"model": str(pulled_path(args.model)), "eos": sorted(eos_ids(model, tok)), "sink": args.sink,
                   "window": args.window, "max_new_tokens": args.max_new_tokens, "duo_scores": duo,
                   "presses": press_list, "threads": torch.get_num_threads(),
                   "prompts": [{"id": q["id"], "input_ids": q["input_ids"]} for q in mine]}
            job_path = args.out / f"kvpress_job_{length}.json"
            job_path.write_text(json.dumps(job))
            env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
            subprocess.run([python, HERE / "kvpress_worker.py", job_path, out_rows], check=True, env=env)
        wanted = {(p["name"], p["ratio"], q["id"]): p for _, mine, ps in jobs for p in ps for q in mine}
        for line in out_rows.read_text().splitlines():
            r = json.loads(line)
            if (r["press"], r["ratio"], r["prompt"]) not in wanted:
                continue  # another run's rows (other targets, presses or prompts) stay in the file, unused
            q = by_id[r["prompt"]]
            answer = answer_of(tok, stopper, r["ids"])
            spec = wanted[(r["press"], r["ratio"], r["prompt"])]
            target = 1.0 if r["press"] == "none" else spec.get("target", round(1 - r["ratio"], 4))
            kv_rows.append({**r, "target": target, "answer": answer, "recall": N.recall(answer, q["reference"])})

    summarize(rows, kv_rows, by_id, arch, args)


def summarize(rows, kv_rows, by_id, arch, args):
    """Mean recall, KV bytes over the model's own cache for the same prompt (float32), median
    prefill seconds and decode ms/token per (length, needle kind, system, memory target)."""
    groups: dict[tuple, list] = {}
    for r in rows:
        q = by_id[r["prompt"]]
        groups.setdefault((q["length"], q["kind"], r["system"], r["target"]), []).append(r)
    for r in kv_rows:
        q = by_id[r["prompt"]]
        name = "kvpress no press" if r["press"] == "none" else f"kvpress {r['press']}"
        groups.setdefault((q["length"], q["kind"], name, r["target"]), []).append(r)
    table = []
    for (length, kind, system, target), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][3], kv[0][2])):
        ratio = statistics.fmean(r["kv_bytes"] / native_kv_bytes(arch, by_id[r["prompt"]]["tokens"], bytes_per_value=4)
                                 for r in rs)
        decode = [r["decode_ms"] for r in rs if r.get("decode_ms")]
        table.append({"length": length, "kind": kind, "system": system, "target": target,
                      "kv_ratio": round(ratio, 3),
                      "recall": round(statistics.fmean(r["recall"] for r in rs), 1), "trials": len(rs),
                      "prefill_s": round(statistics.median(r["prefill_s"] for r in rs), 2),
                      "decode_ms": round(statistics.median(decode), 1) if decode else None})
    (args.out / "summary.json").write_text(json.dumps(table, indent=1))
    lines = []
    for (length, kind) in sorted({(t["length"], t["kind"]) for t in table}):
        lines += [f"\n### {args.model}, {length} tokens, {kind} needles\n",
                  "| system | target | KV memory (measured) | recall | prefill s | decode ms/token |",
                  "|---|---|---|---|---|---|"]
        for t in table:
            if (t["length"], t["kind"]) == (length, kind):
                lines.append(f"| {t['system']} | {t['target']:g}x | {t['kv_ratio']:.3f}x | {t['recall']} "
                             f"(n={t['trials']}) | {t['prefill_s']} | {t['decode_ms']} |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(table, args.out / "recall_vs_memory.png", args.model)


def plot(table, path, model):
    from attnkit.evals.plots import pyplot

    plt = pyplot()
    panels = sorted({(t["length"], t["kind"]) for t in table})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (length, kind) in zip(axes[0], panels):
        mine = [t for t in table if (t["length"], t["kind"]) == (length, kind)]
        for system in sorted({t["system"] for t in mine}):
            pts = sorted((t["kv_ratio"], t["recall"]) for t in mine if t["system"] == system)
            style = "-o" if system.startswith("attnkit") else "--s"
            if system in ("full cache", "kvpress no press"):
                ax.scatter(*zip(*pts), color="black", zorder=3, s=50, label=system if system == "full cache" else None)
                continue
            ax.plot(*zip(*pts), style, label=system, markersize=4, lw=1.2)
        ax.set_title(f"{model}: {length} tokens, {kind} needles", fontsize=9)
        ax.set_xlabel("KV memory (measured, fraction of the full cache)")
        ax.set_ylabel("NIAH recall")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
