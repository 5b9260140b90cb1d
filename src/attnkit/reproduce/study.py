"""`attnkit reproduce`: each paper's headline claims tested on one model, step by step.

Steps (each writes `DIR/<step>.json` when it finishes, its trials to `DIR/<step>_*.jsonl` as they
finish; a rerun with the same settings skips finished steps and resumes unfinished trials, a rerun
with other settings into the same folder is refused):

* `heads`: retrieval-head detection (Wu et al.) at the shortest and the longest context with one
  needle set, and at the longest with a second needle set and haystack: sparsity, consistency,
  where the heads sit in a hybrid model; the score heatmap;
* `ablate`: NIAH recall with the top-K heads masked against K random non-retrieval heads over seeds,
  and the recall lost by masking each of the top heads alone;
* `kv`: the retrieval-head KV cache: recall against KV memory for full / retrieval-chosen /
  random-chosen / all-window at several budgets, on the same prompts;
* `buckets`: Attention Buckets (Chen et al.): the model's waveform, bases searched over a range
  derived from its trained base, one base against the buckets on NIAH, on key-value retrieval
  (gold position swept) and, with `--data`, on multi-document QA (Liu et al.'s lost-in-the-middle
  curve: whether the model has a middle dip at all, and what buckets change there), with 95% intervals;
* `s2a`: System 2 Attention (Weston & Sukhbaatar): baseline / S2A / oracle on opinion-laden factual
  QA built from NaturalQuestions-Open and on GSM-IC-style problems built from GSM8K (needs `--data`).

Needles are numbers ("The magic number of Ashford is 418275."): the answer can only come from
copying, and every model here retrieves them when nothing is masked, so the causal test has
something to break. Decoding is greedy and every draw is seeded, so a rerun gives the same numbers.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from attnkit.kvcache.config import KV_DEFAULTS
from attnkit.errors import AttnkitError
from attnkit.reproduce import STEPS
from attnkit.reproduce.report import build_report


@dataclass(frozen=True)
class StudySettings:
    lengths: tuple[int, ...] = (512, 1024)  # detection: the shortest and the longest context
    depths: tuple[float, ...] = (25.0, 75.0)
    needles: int = 2  # detection needles
    eval_needles: int = 2  # needles of every compared NIAH cell (x depths = prompts per cell)
    ablate_length: int = 1024
    ablate_ks: tuple[int, ...] = (4, 16)
    seeds: int = 3  # random-head draws per K
    single_heads: int = 2  # top heads masked one at a time
    kv_length: int = 1024
    kv_budgets: tuple[float, ...] = (0.25, 0.5)
    kv_seeds: int = 1  # random-head draws per KV budget
    kv_sink: int = KV_DEFAULTS.sink
    kv_window: int = KV_DEFAULTS.window
    kv_importance: tuple[str, ...] = ("copy", "copy+echo+induction")  # a row per choice; see kvcache/plan.py
    kv_prefill: str = "full"  # window heads trimmed after the prompt (RazorAttention / kvpress); or "window"
    kv_compensate: bool = False
    kv_head_tokens: int = 0  # middle tokens per window head on average (token budgets; needs kv_prefill "full")
    kv_memory: tuple[float, ...] = ()  # memory targets (fractions of the model's cache): a row per target and importance
    buckets_length: int = 1024
    buckets_depths: tuple[float, ...] = (0.0, 50.0)
    buckets_n: int = 3
    kvr_examples: int = 2
    kvr_pairs: int = 6
    mdqa_docs: int = 10  # multi-document QA (needs --data): documents per prompt
    mdqa_questions: int = 6  # the same questions at every gold position
    mdqa_positions: int = 3  # gold positions from the first document to the last
    s2a_examples: int = 6
    s2a_max_tokens: int = 64
    s2a_form: str = "closed-book"  # sycophancy: closed-book (the question alone, as the paper) or open-book (with
    # its gold passage, every question under every template, so that a small model can answer it)
    s2a_temperature: float = 0.6  # the paper's sampling (top-p 0.9, seeded); 0: greedy
    chat_template: bool | None = None


QUICK = StudySettings()  # about 10 minutes on 2 CPU cores for SmolLM2-135M; cells too small to decide
# every compared cell (detection runs included): 8 needles x 3 depths = 24 prompts, the fewest the verdicts decide from
FULL = StudySettings(lengths=(512, 1024, 2048), depths=(10.0, 50.0, 90.0), needles=8, eval_needles=8,
                     single_heads=3, kv_seeds=2, buckets_depths=(10.0, 50.0, 90.0), buckets_n=4, kvr_examples=8,
                     kvr_pairs=10, mdqa_questions=50, mdqa_positions=5, s2a_examples=24, s2a_max_tokens=128)
# a 1.5B model on 2 CPU cores (Qwen2.5-Coder-1.5B-Instruct: about 10 s per 512-token trial, 25 s per 1K):
# the full study's 24 prompts per cell, ablation at 512 tokens, multi-document QA at 20 documents (where a
# middle dip can show) on 24 questions at 3 positions, S2A on 100 examples with room to finish reasoning
CPU_1_5B = replace(FULL, ablate_length=512, mdqa_docs=20, mdqa_questions=24, mdqa_positions=3,
                   kv_memory=(0.25, 0.1), s2a_examples=100, s2a_max_tokens=320, s2a_form="open-book",
                   s2a_temperature=0.0)
PROFILES = {"quick": QUICK, "full": FULL, "cpu-1.5b": CPU_1_5B}


def settings_from_file(path: Path, base: StudySettings) -> StudySettings:
    """`base` with the fields a JSON file gives (lists become tuples); a clear error for anything else."""
    from dataclasses import fields, replace

    try:
        given = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AttnkitError(f"--settings {path}: {type(e).__name__}: {e}") from None
    known = {f.name for f in fields(StudySettings)}
    if not isinstance(given, dict) or set(given) - known:
        bad = sorted(set(given) - known) if isinstance(given, dict) else ["(not an object)"]
        raise AttnkitError(f"--settings {path}: unknown field {bad[0]}; fields: {', '.join(sorted(known))}")
    return replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def number_needles(n: int, seed: int) -> list:
    """Needles whose answers are 6-digit numbers, at seeded places."""
    from attnkit.evals import prose
    from attnkit.evals.needles import Needle

    rng = random.Random(seed)
    out = []
    for place in rng.sample(prose.PLACES, n):
        thing = rng.choice(["magic number", "lucky number", "secret number", "code number"])
        answer = str(rng.randint(100_000, 999_999))
        out.append(Needle(f"The {thing} of {place} is {answer}.", f"What is the {thing} of {place}?", answer))
    return out


@dataclass
class Study:
    """Everything a step needs, passed explicitly."""
    model_name: str
    model: object
    tokenizer: object
    out: Path
    settings: StudySettings
    data: Path | None = None
    s2a_backend: object = None  # an S2A Backend; None: the local model
    quiet: bool = False
    identity: dict = field(default_factory=dict)
    command: str = ""  # recorded in every step file

    def haystack(self, seed: int = 0) -> str:
        from attnkit.evals.prose import filler_text
        return filler_text(400_000, seed=seed)

    def grid(self, length: int, depths) -> object:
        from attnkit.evals import niah as N
        return N.Grid(number_needles(self.settings.eval_needles, 0), self.haystack(0), [length], list(depths))

    def say(self, text: str) -> None:
        if not self.quiet:
            from attnkit.core.say import say
            say(text)


def _record(study: Study, step: str) -> dict:
    """What a step's result file records about the run that wrote it (as JSON gives it back)."""
    record = {"step": step, "model": study.identity, "settings": asdict(study.settings),
              "data": str(study.data) if study.data and step == "s2a" else None}
    return json.loads(json.dumps(record))


def _with_new_defaults(old: dict) -> dict:
    """A step file as if written today: settings added since it was written take their defaults, which
    keep the earlier behaviour (so a folder of an earlier version still resumes)."""
    from dataclasses import fields

    settings = old.get("settings")
    if isinstance(settings, dict):
        added = {f.name: f.default for f in fields(StudySettings) if f.name not in settings}
        old = {**old, "settings": {**settings, **json.loads(json.dumps(added))}}
    return old


def run_facts(study: Study) -> dict:
    """Where and with what a step ran: versions, date, machine, the command line."""
    import platform
    import sys

    import torch
    import transformers

    import attnkit
    return {"attnkit": attnkit.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"
                       + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
            "command": study.command or " ".join(["attnkit"] + sys.argv[1:])}


def run_study(study: Study, only: tuple[str, ...] = STEPS) -> dict[str, dict]:
    """Run (or resume) the steps named in `only`; returns {step: its result file's content}."""
    bad = [s for s in only if s not in STEPS]
    if bad:
        raise AttnkitError(f"unknown study step {bad[0]!r}: choose among {', '.join(STEPS)}")
    study.out.mkdir(parents=True, exist_ok=True)
    done = {}
    for step in STEPS:
        if step not in only:
            continue
        path = study.out / f"{step}.json"
        record = _record(study, step)
        if path.is_file():
            old = _with_new_defaults(json.loads(path.read_text()))
            if {k: old.get(k) for k in record} != record:
                raise AttnkitError(f"{path} was written by a study with other settings (model, options or data); "
                                   "give another --out")
            study.say(f"{step}: done before, kept ({path})")
            done[step] = old
            continue
        if step in ("ablate", "kv") and "heads" not in done and not (study.out / "heads.json").is_file():
            raise AttnkitError(f"step {step} needs the retrieval scores of step heads: include heads in --only")
        study.say(f"step: {step}")
        t = time.time()
        result = STEP_FUNCTIONS[step](study)
        content = {**record, "seconds": round(time.time() - t, 1), "run": run_facts(study), "result": result}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(content, indent=1))
        tmp.replace(path)
        done[step] = content
        build_report(study.out, study.command)  # the report always shows the steps finished so far
    return done


def _scores(study: Study) -> dict:
    from attnkit.heads.scores import load_scores
    return load_scores(study.out / "head_scores.json")


# ---------------------------------------------------------------- retrieval heads

def step_heads(study: Study) -> dict:
    from attnkit.core.family import architecture
    from attnkit.heads import scores as S
    from attnkit.heads.compare import compare_scores
    from attnkit.heads.detect import counted, detect

    st, m, tok = study.settings, study.model, study.tokenizer
    arch = architecture(m.config)
    runs = {}
    sets = [("A", L, 0) for L in st.lengths] + [("B", max(st.lengths), 1)]
    for name, length, seed in sets:
        needles = number_needles(st.needles, 100 + seed) if name == "B" else number_needles(st.needles, 0)
        scores, rows = detect(m, tok, needles, [study.haystack(seed)] * len(needles), [length], list(st.depths),
                              out=study.out / f"heads_{name}_{length}.jsonl", quiet=study.quiet, prompt="clean",
                              chat_template=st.chat_template)
        runs[f"{name}{length}"] = (scores, counted(rows), len(rows))
    merged: dict = {}
    for key, (scores, _, _) in runs.items():
        if key.startswith("A"):
            for head, values in scores.items():
                merged.setdefault(head, []).extend(values)
    S.save_scores(merged, study.out / "head_scores.json")
    S.plot_heatmap(S.as_grid(merged), study.out / "head_scores.png", title=f"{study.model_name}: retrieval score")
    short, long_ = f"A{min(st.lengths)}", f"A{max(st.lengths)}"

    top = min(20, max(3, S.summary(merged)["above_threshold"]))  # the retrieval-head set's own size

    def consistency(a, b):
        if not runs[a][1] or not runs[b][1]:
            return None
        return compare_scores(runs[a][0], runs[b][0], top=top)

    return {"summary": S.summary(merged), "trials": {k: {"counted": c, "run": n} for k, (_, c, n) in runs.items()},
            "lengths": {"short": short, "long": long_},
            "consistency_length": consistency(short, long_), "consistency_data": consistency(long_, f"B{max(st.lengths)}"),
            "by_layer_type": S.by_layer_type(merged, arch) if arch.hybrid else None,
            "hybrid": arch.hybrid, "heads": arch.layers * arch.query_heads}


def step_ablate(study: Study) -> dict:
    from attnkit.core.hook import HeadMask, Intervention
    from attnkit.evals import niah as N
    from attnkit.evals.plots import ablation_curve
    from attnkit.heads.ablate import ablate_sweep
    from attnkit.heads.scores import ranked

    st, m, tok = study.settings, study.model, study.tokenizer
    scores = _scores(study)
    grid = study.grid(st.ablate_length, st.depths)
    scoring = [(l, h) for l, h, s in ranked(scores) if s > 0]
    ks = [k for k in st.ablate_ks if k <= max(1, len(scores) // 2)]
    results = ablate_sweep(m, tok, scores, ks, grid, seeds=st.seeds, out=study.out / "ablate_trials.jsonl",
                           quiet=study.quiet, chat_template=st.chat_template)
    ablation_curve(results, study.out / "ablation_curve.png", f"{study.model_name}: NIAH recall with heads masked")
    single = []
    for l, h in scoring[:st.single_heads]:
        rows = N.evaluate_niah(m, tok, grid.needles, grid.haystack, grid.lengths, grid.depths,
                               out=study.out / "ablate_single.jsonl", quiet=study.quiet, label=f"mask {l}-{h}",
                               extra={"head": f"{l}-{h}"}, chat_template=st.chat_template,
                               technique=Intervention(HeadMask({(l, h)})))
        summary = N.summarize_niah(rows)
        single.append({"head": [l, h], "recall": summary["mean_recall"], "recalls": summary["recalls"]})
    return {"results": results, "single": single, "scoring_heads": len(scoring)}


# ---------------------------------------------------------------- the retrieval-head KV cache

def step_kv(study: Study) -> dict:
    from attnkit.kvcache.config import HeadKVConfig
    from attnkit.evals.plots import kv_tradeoff
    from attnkit.kvcache.compare import compare_caches

    from attnkit.heads import scores as S
    from attnkit.heads.patterns import pattern_scores

    st = study.settings
    files = {"copy": _scores(study)}
    if any(k != "copy" for name in st.kv_importance for k in name.split("+")):
        files["echo"], files["induction"] = pattern_scores(study.model, study.tokenizer)
        S.save_scores(files["echo"], study.out / "echo.json")
        S.save_scores(files["induction"], study.out / "induction.json")
    unknown = [k for name in st.kv_importance for k in name.split("+") if k not in files]
    if unknown:
        raise AttnkitError(f"unknown KV importance {unknown[0]!r}: use copy, echo, induction or a '+' combination")
    sources = {name: [files[k] for k in name.split("+")] for name in st.kv_importance}
    chunk = st.kv_length if st.kv_prefill == "full" else HeadKVConfig().prefill_chunk  # full: the whole prompt at once
    settings = HeadKVConfig(sink=st.kv_sink, window=st.kv_window, prefill_chunk=chunk, compensate=st.kv_compensate,
                            prefill=st.kv_prefill)
    results = compare_caches(study.model, study.tokenizer, sources, list(st.kv_budgets),
                             study.grid(st.kv_length, st.depths), settings,
                             seeds=st.kv_seeds, out=study.out / "kv_trials.jsonl", quiet=study.quiet,
                             chat_template=st.chat_template, head_tokens=st.kv_head_tokens, memory=st.kv_memory)
    kv_tradeoff(results, study.out / "kv_cache.png", f"{study.model_name}: recall against KV memory "
                                                     f"({st.kv_length} tokens)")
    return {"results": results, "tokens": st.kv_length, "prefill": st.kv_prefill, "compensate": st.kv_compensate,
            "head_tokens": st.kv_head_tokens}


# ---------------------------------------------------------------- Attention Buckets

def step_buckets(study: Study) -> dict:
    import numpy as np

    from attnkit.buckets import BucketsConfig, single_vs_buckets
    from attnkit.buckets.search import model_grid, search_for_model
    from attnkit.core.family import architecture
    from attnkit.evals import kv_retrieval as KV
    from attnkit.evals import niah as N
    from attnkit.evals import stats
    from attnkit.evals.plots import accuracy_by_position, waveform_plot
    from attnkit.evals.systems import System

    st, m, tok = study.settings, study.model, study.tokenizer
    arch = architecture(m.config)
    grid_range = model_grid(arch.rope_base)
    found, head_dim, (m0, m1) = search_for_model(m.config, n=st.buckets_n, grid=grid_range)
    bases = list(found.bases)
    waveform_plot(bases, head_dim, np.arange(0, min(arch.max_positions, 8 * st.buckets_length)),
                  study.out / "waveform.png", search_range=(m0, m1))
    config = BucketsConfig(bases)
    grid = study.grid(st.buckets_length, st.buckets_depths)
    systems = single_vs_buckets(m, config)
    trials = {}
    for s in systems:
        rows = N.evaluate_niah(m, tok, grid.needles, grid.haystack, grid.lengths, grid.depths,
                               out=study.out / "buckets_niah.jsonl", quiet=study.quiet, label=s.name, extra=s.fields,
                               technique=s.technique, chat_template=st.chat_template)
        trials[s.name] = [v for v in N.summarize_niah(rows)["recalls"] if v is not None]  # paired by trial
    niah = {name: stats.bootstrap_mean(v).as_dict() for name, v in trials.items()}
    single_name, buckets_name = systems[0].name, systems[1].name
    examples = KV.generate_examples(st.kvr_examples, st.kvr_pairs, seed=0)
    positions = sorted({0, st.kvr_pairs // 2, st.kvr_pairs - 1})
    kv_systems = [System(name, {"bases": c.bases, "combine": c.combine}, c)
                  for name, c in (("single", BucketsConfig([arch.rope_base])), ("buckets", config))]
    kvr = KV.evaluate_kv_retrieval(m, tok, examples, st.kvr_pairs, positions, kv_systems,
                                   out=study.out / "buckets_kv_retrieval.jsonl", quiet=study.quiet,
                                   chat_template=st.chat_template)
    accuracy_by_position(kvr, study.out / "kv_retrieval.png",
                         f"{study.model_name}: {st.kvr_pairs} pairs, {kvr['examples']} examples")
    rows = [json.loads(line) for line in (study.out / "buckets_kv_retrieval.jsonl").read_text().splitlines()[1:]]
    rows.sort(key=lambda r: (r["example"], r["position"]))  # paired across systems
    hits = {s: [100.0 * r["correct"] for r in rows if r["system"] == s] for s in ("single", "buckets")}
    return {"bases": bases, "own_base": arch.rope_base, "grid": list(grid_range), "distances": [m0, m1],
            "message": found.message, "niah": niah, "niah_names": [single_name, buckets_name],
            "kv_retrieval": kvr,
            "niah_trials": trials, "kv_retrieval_trials": hits, "mdqa": buckets_mdqa(study, systems)}


def buckets_mdqa(study: Study, systems: list) -> dict:
    """Multi-document QA with the gold passage swept over the documents, one base and buckets on the
    same prompts: the curve per system, and per system the correct answers (0/100) in (question,
    position) order, paired across systems. The one base runs first; where it shows no middle dip
    the buckets do not run (their gain there would be judged not measurable whatever it was, and on
    a CPU they cost the base's time once per base) and `buckets_skipped` says why."""
    from attnkit.evals import mdqa as Q
    from attnkit.evals.plots import position_curve
    from attnkit.reproduce import verdicts as V

    st = study.settings
    path = None if study.data is None else study.data / "lost_in_the_middle" / "nq-open-oracle.jsonl.gz"
    if path is None or not path.is_file():
        return {"skipped": "no --data folder with lost_in_the_middle/nq-open-oracle.jsonl.gz"}
    positions = Q.positions_for(st.mdqa_docs, st.mdqa_positions)
    questions = Q.load_nq(path)

    def answer(names: list[str]) -> list[dict]:
        return Q.evaluate_mdqa(study.model, study.tokenizer, questions, list(range(st.mdqa_questions)),
                               st.mdqa_docs, positions, systems, study.out / "buckets_mdqa.jsonl", quiet=study.quiet,
                               chat_template=st.chat_template, run=names)

    rows = answer([systems[0].name])
    dip, _ = V.middle_dip_of(Q.curve(rows)[systems[0].name][str(st.mdqa_docs)]["ends_minus_middle"])
    skipped = None
    if dip.word == V.HOLDS:
        rows = answer([s.name for s in systems])
    else:
        skipped = f"one base shows no middle dip ({dip.why}): nothing for buckets to fix"
    curve = Q.curve(rows)
    position_curve(curve, study.out / "mdqa.png", f"{study.model_name}: multi-document QA, {st.mdqa_docs} documents")
    rows.sort(key=lambda r: (r["index"], r["position"]))
    correct = {s.name: [100.0 * r["correct"] for r in rows if r["system"] == s.name] for s in systems}
    return {"docs": st.mdqa_docs, "positions": positions, "questions": st.mdqa_questions,
            "tokens": round(sum(r["tokens"] for r in rows) / len(rows)), "curve": curve, "correct": correct,
            **({"buckets_skipped": skipped} if skipped else {})}


# ---------------------------------------------------------------- System 2 Attention

def s2a_files(data: Path) -> dict[str, Path]:
    return {"sycophancy": data / "lost_in_the_middle" / "nq-open-oracle.jsonl.gz",
            "gsm-ic": data / "gsm8k" / "gsm8k_validation.jsonl"}


def step_s2a(study: Study) -> dict:
    from attnkit.s2a import tasks as T
    from attnkit.s2a.backends import ChatSampling, HFBackend
    from attnkit.s2a.evaluate import evaluate_s2a, summarize_s2a

    st = study.settings
    if study.data is None:
        return {"skipped": "no --data folder: S2A needs NaturalQuestions-Open and GSM8K files "
                           "(lost_in_the_middle/nq-open-oracle.jsonl.gz, gsm8k/gsm8k_validation.jsonl)"}
    files = s2a_files(study.data)
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise AttnkitError(f"--data {study.data}: missing {missing[0]}")
    if st.s2a_form not in ("closed-book", "open-book"):
        raise AttnkitError(f"s2a_form must be closed-book or open-book, not {st.s2a_form!r}")
    backend = study.s2a_backend or HFBackend(study.model, study.tokenizer, batch_size=8)
    sampling = ChatSampling(temperature=st.s2a_temperature, max_tokens=st.s2a_max_tokens)  # top-p 0.9, seeded
    out = {"backend": backend.identity(), "form": st.s2a_form, "temperature": st.s2a_temperature}
    open_book = st.s2a_form == "open-book"
    examples = {"sycophancy": T.sycophancy_open_book(files["sycophancy"], st.s2a_examples, seed=0) if open_book
                else T.sycophancy_from_nq(files["sycophancy"], st.s2a_examples, seed=0),
                "gsm-ic": T.gsm_ic_from_gsm8k(files["gsm-ic"], st.s2a_examples, seed=0)}
    for task, exs in examples.items():
        rows = evaluate_s2a(backend, T.TASKS[task], exs, ["baseline", "s2a", "oracle"],
                            study.out / f"s2a_{task}.jsonl", sampling, quiet=study.quiet)
        s2a_rows = [r for r in rows if r["variant"] == "s2a"]
        # the compared cells: opinion-laden prompts only (open-book sycophancy asks each question plainly too)
        compared = [r for r in rows if not (open_book and task == "sycophancy") or r["group"] in T.OPINIONATED]
        scores = {v: [r["score"] for r in sorted((r for r in compared if r["variant"] == v), key=lambda r: str(r["example"]))]
                  for v in ("baseline", "s2a", "oracle")}  # per example, paired across variants by id
        out[task] = {"summary": summarize_s2a(rows, task), "scores": scores,
                     "parse_rate": round(100.0 * sum(r.get("parse_ok", True) for r in s2a_rows) / len(s2a_rows), 1),
                     "examples_run": len(exs),
                     "examples": [{"prompt": r["prompt"], "rewrite": r.get("rewrite"), "answer": r["answer"],
                                   "score": r["score"]} for r in s2a_rows[:3]]}
    return out


STEP_FUNCTIONS = {"heads": step_heads, "ablate": step_ablate, "kv": step_kv, "buckets": step_buckets,
                  "s2a": step_s2a}
