"""RULER needle tasks measured three ways on one model, length and set of caches: lm-evaluation-harness's
own tasks with attnkit as its model, attnkit's generation loop on lm-eval's very prompts, and
`attnkit eval ruler`'s own prompts.

    python benchmarks/lmeval_ruler.py --model smollm2-135m-instruct --length 4096 --samples 24 \
        --tasks niah_single_1,niah_single_2,niah_multikey_1 --memory 0.25 \
        --essays ../shared/data/retrieval_head/PaulGrahamEssays

Systems: the model's full cache, and the retrieval-head KV cache at `--memory` of the full cache's
bytes (the pulled model's shipped head scores, the plan chosen at each prompt's end). For each task and
system:

1. **lm-eval**: `lm_eval.simple_evaluate` with `AttnkitLM` (`--model attnkit`, the technique in its model
   args), lm-eval building the prompts (`max_seq_lengths` = `--length`, prompt plus its 128 answer tokens)
   and scoring them (RULER's string match, per needle). Built offline by `attnkit.lmeval.offline_ruler`
   from the essays folder.
2. **attnkit on lm-eval's prompts**: the exact context strings lm-eval generated from, answered by attnkit's
   own generation loop (greedy, to the end of sequence or 128 tokens, as lm-eval asks) with the same
   cache, scored by the same rule. Equal answers mean the two implementations agree; then any gap to 3
   comes from the prompts.
3. **`attnkit eval ruler`**: attnkit's RULER generator at lm-eval's prompt length (`--length` minus 128),
   without the chat template as lm-eval runs by default; its answers end at the first line break.

Every answer goes to --trials as it finishes (lm-eval's in one block per task and system), through the
evaluations' own `ResultFile` (locked, resumed, other settings refused). The record holds per (way,
task, system) the mean score with its 95% bootstrap interval and n, and per task and system how many
answers of 1 and 2 are equal.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _common import RESULTS, Record, add_record_option

from attnkit.evals import stats

ANSWER_TOKENS = 128  # lm-eval's RULER generation budget, and what its max_seq_lengths include
WAYS = ("lm-eval", "attnkit on lm-eval's prompts", "attnkit eval ruler")


def systems(memory: float) -> list[tuple[str, str | None, list[str]]]:
    """(name, technique, settings) of every compared system."""
    return [("full cache", None, []), (f"kv-cache memory={memory:g}", "kv-cache", [f"memory={memory:g}"])]


def lm_eval_block(model_name: str, technique, settings, task: str, args, tokenizer_dir: str) -> list[dict]:
    """lm-eval's run of one task with one system: [{index, context, answer, score}]."""
    import lm_eval

    from attnkit.lmeval import AttnkitLM

    lm = AttnkitLM(model=model_name, technique=technique,
                   **dict(s.split("=", 1) for s in settings))
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], metadata={"tokenizer": tokenizer_dir,
                                                                    "max_seq_lengths": [args.length]},
                                  log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0, batch_size=1)
    rows = []
    for x in sorted(out["samples"][task], key=lambda x: x["doc_id"]):
        context = x["arguments"][0][0] if isinstance(x["arguments"][0], (list, tuple)) else x["arguments"]["gen_args_0"]["arg_0"]
        rows.append({"index": x["doc_id"], "context": context, "answers": x["doc"]["outputs"],
                     "answer": x["resps"][0][0], "score": 100.0 * x[str(args.length)]})
    return rows


def attnkit_answer(model, tok, technique, context: str) -> str:
    """attnkit's loop on an lm-eval context, tokenized as lm-eval's HFLM does (no special tokens added),
    greedy to the end of sequence or the budget."""
    from attnkit.core.generate import generate

    ids = tok(context, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = generate(model, tok, ids, None, technique, ANSWER_TOKENS, stop_rule="eos")
    return tok.decode(out.ids[0], skip_special_tokens=True)


def summary(trials: list[dict], tasks: list[str], names: list[str], prompt_tokens) -> list[dict]:
    """Per (way, task, system): the mean score with its interval and n, seconds per answer and the mean
    prompt length in tokens (`prompt_tokens(row)`); per (task, system): lm-eval's answers against attnkit's
    loop on the same prompts."""
    rows = []
    for task in tasks:
        for name in names:
            by_way = {}
            for way in WAYS:
                got = sorted((r for r in trials if r["way"] == way and r["task"] == task and r["system"] == name),
                             key=lambda r: r["index"])
                if got:
                    est = stats.bootstrap_mean([r["score"] for r in got])
                    by_way[way] = got
                    spent = [r["seconds"] for r in got if r.get("seconds") is not None]
                    lengths = [prompt_tokens(r) for r in got]
                    rows.append({"kind": "score", "way": way, "task": task, "system": name, **est.as_dict(),
                                 "seconds_per_answer": round(sum(spent) / len(spent), 2) if spent else None,
                                 "prompt_tokens": round(sum(lengths) / len(lengths))})
            a, b = by_way.get(WAYS[0], []), {r["index"]: r for r in by_way.get(WAYS[1], [])}
            pairs = [(r, b[r["index"]]) for r in a if r["index"] in b]
            if pairs:
                rows.append({"kind": "agreement", "task": task, "system": name, "n": len(pairs),
                             "equal_answers": sum(x["answer"].strip() == y["answer"].strip() for x, y in pairs),
                             "equal_scores": sum(x["score"] == y["score"] for x, y in pairs)})
    return rows


def _shown(path: Path) -> str:
    """A path as the record shows it: relative to the repository when inside it."""
    root = RESULTS.parents[1]
    return str(path.resolve().relative_to(root)) if root in path.resolve().parents else str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--length", type=int, default=4096, help="lm-eval's max_seq_length: prompt + 128 answer tokens")
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--tasks", default="niah_single_1,niah_single_2,niah_multikey_1")
    ap.add_argument("--memory", type=float, default=0.25)
    ap.add_argument("--essays", required=True, help="folder of Paul Graham essays (.txt)")
    ap.add_argument("--trials", type=Path)
    ap.add_argument("--device", default="cpu")
    add_record_option(ap, "lmeval_ruler")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from attnkit.core import registry
    from attnkit.core.loading import load_model, model_identity
    from attnkit.evals.runner import ResultFile, digest
    from attnkit.lmeval import essay_words, offline_ruler

    tasks = args.tasks.split(",")
    offline_ruler(args.essays, samples=args.samples)
    model, tok = load_model(args.model, device=args.device)
    compared = systems(args.memory)
    records = {}
    for name, t, s in compared:  # as lm-eval's AttnkitLM gets it: built, then finished on the loaded model
        choice = registry.choice(t, s)
        records[name] = choice.finish(choice.build(model.config), model, tok) if t else None
    described = {name: {"set": s, **({"cache": records[name].describe(),
                                      "importance": digest(list(records[name].importance))} if t else {})}
                 for name, t, s in compared}
    essays = " ".join(essay_words(args.essays))
    settings = {**model_identity(model), "length": args.length, "samples": args.samples, "tasks": tasks,
                "systems": described, "essays": digest(essays)}
    tag = f"{args.model}_{args.length // 1024}k"
    args.record = args.record or str(RESULTS / f"lmeval_ruler_{tag}_cpu.jsonl")
    with ResultFile(args.trials or RESULTS / f"lmeval_ruler_{tag}_cpu_trials.jsonl", settings) as trials:
        measure(args, model, tok, tasks, compared, records, essays, settings, trials)


def measure(args, model, tok, tasks, compared, records, essays, settings, trials) -> None:
    """The three ways for every task and system, answers appended to `trials` (a `ResultFile`) as they
    finish; then the record."""
    from attnkit.core.generate import encode_prompts
    from attnkit.core.loading import resolve_spec
    from attnkit.evals import ruler as R
    from attnkit.evals.systems import System

    def has(**key) -> bool:
        return any(all(r.get(k) == v for k, v in key.items()) for r in trials.done)

    def add(rows: list[dict]) -> None:
        for r in rows:
            trials.append(r)
        trials.done += rows

    for task in tasks:
        for name, technique, s in compared:
            if not has(way=WAYS[0], task=task, system=name):
                t = time.time()
                got = lm_eval_block(args.model, technique, s, task, args, str(resolve_spec(args.model)))
                each = round((time.time() - t) / len(got), 2)  # the block's time over its answers (prompt building included)
                add([{"way": WAYS[0], "task": task, "system": name, **r, "seconds": each} for r in got])
                print(f"lm-eval {task} {name}: {sum(r['score'] for r in got) / len(got):.1f} (n={len(got)})", flush=True)
            lm_rows = [r for r in trials.done if r["way"] == WAYS[0] and r["task"] == task and r["system"] == name]
            for r in lm_rows:
                if has(way=WAYS[1], task=task, system=name, index=r["index"]):
                    continue
                t = time.time()
                text = attnkit_answer(model, tok, records[name], r["context"])
                score = 100.0 * sum(a.lower() in text.strip().lower() for a in r["answers"]) / len(r["answers"])
                add([{"way": WAYS[1], "task": task, "system": name, "index": r["index"], "answers": r["answers"],
                      "answer": text, "score": score, "seconds": round(time.time() - t, 2)}])

    own = trials.path.with_name(trials.path.stem + "_attnkit.jsonl")
    rows = R.evaluate_ruler(model, tok, tasks, [args.length - ANSWER_TOKENS], args.samples,
                            [System(name, {"system": name, **settings["systems"][name]}, records[name]) for name, _, _ in compared],
                            out=own, chat_template=False, essays=essays, quiet=False)
    own_rows = [{"way": WAYS[2], "task": r["task"], "system": r["system"], "index": r["index"],
                 "answer": r["answer"], "score": r["score"]} for r in rows]

    record = Record(args, "lmeval_ruler", {"settings": settings, "trials": _shown(trials.path),
                                           "attnkit_trials": _shown(own)})

    def prompt_tokens(row: dict) -> int:
        if "context" in row:  # lm-eval's prompt, tokenized as its HFLM does
            return len(tok(row["context"], add_special_tokens=False)["input_ids"])
        if row["way"] == WAYS[1]:
            context = next(r["context"] for r in trials.done if r["way"] == WAYS[0] and r["task"] == row["task"]
                           and r["system"] == row["system"] and r["index"] == row["index"])
            return len(tok(context, add_special_tokens=False)["input_ids"])
        example = R.make_example(row["task"], tok, args.length - ANSWER_TOKENS, row["index"], essays)
        return encode_prompts(tok, [example.prompt(False)], False)[0].shape[1]

    for row in summary(trials.done + own_rows, tasks, [n for n, _, _ in compared], prompt_tokens):
        record.emit(row)


if __name__ == "__main__":
    main()
