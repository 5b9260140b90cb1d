"""The retrieval-head KV cache inside vLLM (attnkit's plugin) against vLLM's own full cache, and the
same plan in attnkit's HF cache, on the same prompts (the same token ids for every system).

    bash scripts/vllm_venv.sh      # once: vLLM's venv, with attnkit's plugin
    python benchmarks/vllm_kv.py --model smollm2-135m-instruct --length 4096

The plan: the full-cache KV heads by copy + echo + induction scores (the recipe), as many as fit
--target of the model's own cache at --length with 16 sink tokens, the other heads a --window token
window attending within sink + window in prefill too (what vLLM's cache can hold: it frees a window head's
blocks as the prefill moves on). Three routes in vLLM (`--servers`): the plugin's sink + window heads with
the window prefill (`sink`), the same with the full prefill (`sink-full-prefill`: window heads read the
whole prompt, their blocks held until it ends, then trimmed), and vLLM's own sliding window without sinks
(`no-sink`); attnkit's HF cache runs each with the same plan. Every vLLM server starts with the same KV
memory (VLLM_CPU_KVCACHE_SPACE) and block size; the rows carry vLLM's own figures from its start-up log
(KV cache tokens, maximum concurrency at --length tokens per request: what vLLM promises before any
request, the full prefill's reservation of the whole prompt included) and their ratio, recall on the
number needles (6 needles x depths, ROUGE-1 recall as attnkit's NIAH scores it, bootstrap 95%), how many
prompts vLLM decodes token for token as attnkit's HF cache with the same plan does (greedy, float32), and,
under load (--clients), requests and generated tokens per second with that many clients sending the long
prompts at once, with the most requests vLLM ran at once (its own metrics, read every half second).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from _common import Record, add_record_option
from kv_vs_kvpress import answer_of, count_for, prompts_for

from attnkit.core.decode import eos_ids
from attnkit.core.generate import Stopper, generate
from attnkit.core.loading import load_config, load_model, resolve_spec
from attnkit.evals import niah as N
from attnkit.evals import stats
from attnkit.evals.runner import progress_bar
from attnkit.kvcache.plan import choosable, plan
from attnkit.heads.patterns import pattern_scores
from attnkit.heads.scores import load_scores
from attnkit.kvcache.technique import vllm_overrides
from attnkit.serve import vllm

HERE = Path(__file__).resolve().parent
LOG_LINE = re.compile(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")


def start_vllm(python: str, path: Path, overrides: dict | None, chunk: int, args, log: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    longest = args.length + max(args.max_new_tokens, args.load_new_tokens) + 64
    argv = vllm.command(python, path, "model", "127.0.0.1", port, "float32", overrides, longest,
                        ("--max-num-batched-tokens", str(chunk), "--max-num-seqs", "64",
                         "--block-size", str(args.block_size), "--no-enable-prefix-caching"))  # every server alike:
    # the prompts share an essay haystack, so a prefix cache would spare the full cache's prefills
    env = {**vllm.environment(None), "VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib)}
    fh = open(log, "w")
    server = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    if not vllm.wait_until_healthy(server, base, args.start_timeout):
        server.kill()
        sys.exit(f"vLLM did not start; its log: {log}")
    found = LOG_LINE.search(log.read_text())
    figures = {"kv_tokens": int(found.group(1).replace(",", "")),
               "max_concurrency": float(found.group(3))} if found else {}
    return server, base, figures


def ask_vllm(base: str, ids: list[int], max_new: int, ignore_eos: bool = False) -> list[int]:
    body = {"model": "model", "prompt": ids, "max_tokens": max_new, "temperature": 0, "return_token_ids": True,
            "ignore_eos": ignore_eos}
    r = httpx.post(base + "/v1/completions", json=body, timeout=3600)
    r.raise_for_status()
    return list(r.json()["choices"][0]["token_ids"])


RUNNING = re.compile(r"^vllm:num_requests_running\{[^}]*\} ([\d.e+]+)$", re.M)


def running(base: str) -> int | None:
    """Requests vLLM is running now (prefilling or decoding), from its own metrics."""
    try:
        return int(sum(float(v) for v in RUNNING.findall(httpx.get(base + "/metrics", timeout=5).text)))
    except (httpx.HTTPError, ValueError):
        return None


def load(base: str, prompts: list[dict], clients: int, new_tokens: int) -> dict:
    """`clients` requests at once, each a long prompt (cycled) generating `new_tokens` tokens; the most
    requests vLLM ran at once, read every half second while they go."""
    jobs = [prompts[i % len(prompts)]["input_ids"] for i in range(clients)]
    seen, stop = [], threading.Event()

    def watch():
        while not stop.wait(0.5):
            now = running(base)
            if now is not None:
                seen.append(now)

    watcher = threading.Thread(target=watch, daemon=True)
    t = time.perf_counter()
    watcher.start()
    try:
        with ThreadPoolExecutor(clients) as pool:
            outs = list(pool.map(lambda ids: ask_vllm(base, ids, new_tokens, ignore_eos=True), jobs))
    finally:
        stop.set()
        watcher.join()
    wall = time.perf_counter() - t
    return {"clients": clients, "requests": len(jobs), "wall_s": round(wall, 1), "req_per_s": round(len(jobs) / wall, 3),
            "gen_tok_per_s": round(sum(map(len, outs)) / wall, 2), "peak_running": max(seen, default=None)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--depths", default="10,35,65,90")
    ap.add_argument("--target", type=float, default=0.30, help="KV memory of the plan, a fraction of the full cache")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--scores", type=Path, default=None, help="copy scores (default: the study's for the model)")
    ap.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE of both vLLM servers")
    ap.add_argument("--batched-tokens", type=int, default=256, help="vLLM's --max-num-batched-tokens (its prefill "
                    "chunk, which a window head's blocks must also hold)")
    ap.add_argument("--block-size", type=int, default=32, help="vLLM's KV block size (a sink takes whole blocks)")
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--clients", default="8,32", help="load rows: this many clients at once (empty: none)")
    ap.add_argument("--load-new-tokens", type=int, default=128, help="tokens each load request generates")
    ap.add_argument("--attnkit-systems", default="full,no-sink,sink,sink-full-prefill",
                    help="which of attnkit's HF systems to run (a slow model: 'sink' alone is the one the target "
                         "compares with)")
    ap.add_argument("--servers", default="full,no-sink,sink,sink-full-prefill",
                    help="which vLLM servers to run: vLLM's full cache and the plugin's routes (no-sink: vLLM's "
                         "own window; sink: sink + window, window prefill; sink-full-prefill: sink + window, full "
                         "prefill); each is compared with attnkit's HF system of the same name where it ran")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--vllm-python", default=str(HERE / ".vllm-venv" / "bin" / "python"))
    ap.add_argument("--start-timeout", type=float, default=600)
    add_record_option(ap, "vllm_kv")
    args = ap.parse_args()
    args.dtype = "float32"
    python = vllm.find_python(args.vllm_python)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    model, tok = load_model(args.model, dtype=torch.float32)
    folder = Path(args.scores).parent if args.scores else HERE.parent / "results" / "study" / args.model
    copy = load_scores(args.scores or folder / "head_scores.json")
    if (folder / "echo.json").is_file() and (folder / "induction.json").is_file():
        echo, induction = load_scores(folder / "echo.json"), load_scores(folder / "induction.json")
    else:
        echo, induction = pattern_scores(model, tok)
    n = count_for(model.config, args.target, args.length, args.sink, args.window)
    kv = {sink: plan([copy, echo, induction], model.config, "retrieval", count=n, sink=sink, window=args.window,
                     prefill_chunk=2048, prefill_mode=mode) for sink, mode in ((0, "window"), (args.sink, "window"))}
    kv_full_prefill = plan([copy, echo, induction], model.config, "retrieval", count=n, sink=args.sink,
                           window=args.window, prefill_chunk=2048, prefill_mode="full")
    assert kv[0].full == kv[args.sink].full == kv_full_prefill.full

    chat = N.use_chat_template(tok, None)
    haystack = N.load_haystack(None)
    prompts = prompts_for(tok, "number", args.length, [float(d) for d in args.depths.split(",")], haystack, chat)
    stopper = Stopper(tok, eos_ids(model, tok), "clean")
    rec = Record(args, "vllm_kv", {"length": args.length, "target": args.target, "window": args.window, "sink": args.sink,
                                   "full_heads": len(kv[0].full), "kv_heads": len(choosable(model.config)),
                                   "kv_gib": args.kv_gib, "batched_tokens": args.batched_tokens,
                                   "block_size": args.block_size, "max_new_tokens": args.max_new_tokens,
                                   "load_new_tokens": args.load_new_tokens, "prompts": len(prompts),
                                   "servers": args.servers, "vllm": subprocess.run(
                                       [python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                                       text=True).stdout.strip()})

    logs = HERE / ".vllm-logs"  # vLLM's start-up logs (the rows carry their figures)
    logs.mkdir(exist_ok=True)
    # the answers and load rows so far, committed beside the results so that a run longer than one sitting
    # resumes on another machine; their names carry a hash of the settings, so runs never mix
    trials = HERE.parent / "results" / "benchmarks" / "vllm_kv_trials"
    trials.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(json.dumps([args.model, args.max_new_tokens, sorted(kv[0].full), args.window,
                                   [q["id"] for q in prompts]]).encode()).hexdigest()[:12]
    done = trials / f"{args.model}_attnkit_{key}.jsonl"  # one line per finished (system, prompt): a rerun resumes
    outputs: dict[str, list[list[int]]] = {}
    finished = {(d["system"], d["prompt"]): d["ids"] for d in map(json.loads, done.read_text().splitlines())} \
        if done.is_file() else {}
    sink_name = f"{args.sink} sink tokens"
    hf = {"full": ("attnkit full cache", None), "no-sink": ("attnkit plan, no sink", kv[0]),
          "sink": (f"attnkit plan, {sink_name}", kv[args.sink]),
          "sink-full-prefill": (f"attnkit plan, {sink_name}, full prefill", kv_full_prefill)}
    wanted = [w.strip() for w in args.attnkit_systems.split(",") if w.strip()]
    if set(wanted) - set(hf):
        sys.exit(f"--attnkit-systems: choose among {', '.join(hf)}")
    for name, technique in (hf[w] for w in wanted):
        with progress_bar() as bar:
            job = bar.add_task(name, total=len(prompts))
            for q in prompts:
                if (name, q["id"]) not in finished:
                    ids = generate(model, tok, torch.tensor([q["input_ids"]]), None, technique, args.max_new_tokens,
                                   stop_rule="eos").ids[0]
                    finished[(name, q["id"])] = ids
                    with done.open("a") as fh:
                        fh.write(json.dumps({"system": name, "prompt": q["id"], "ids": ids}) + "\n")
                bar.advance(job)
        outputs[name] = [finished[(name, q["id"])] for q in prompts]
    del model
    figures, loads = {}, {}
    config = load_config(args.model)
    every_server = {"full": ("vLLM full cache", None, "attnkit full cache"),
                    "no-sink": ("vLLM + attnkit plugin, no sink (vLLM's window)", vllm_overrides(kv[0], config),
                                "attnkit plan, no sink"),
                    "sink": (f"vLLM + attnkit plugin, {sink_name}", vllm_overrides(kv[args.sink], config),
                             f"attnkit plan, {sink_name}"),
                    "sink-full-prefill": (f"vLLM + attnkit plugin, {sink_name}, full prefill",
                                          vllm_overrides(kv_full_prefill, config), f"attnkit plan, {sink_name}, full prefill")}
    chosen = [w.strip() for w in args.servers.split(",") if w.strip()]
    if not chosen or set(chosen) - set(every_server):
        sys.exit(f"--servers: choose among {', '.join(every_server)}")
    servers = [(w, *every_server[w]) for w in every_server if w in chosen]
    same_as = {}
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    vkey = hashlib.sha1(json.dumps([key, args.kv_gib, args.batched_tokens, args.block_size, args.sink,
                                    args.load_new_tokens, clients]).encode()).hexdigest()[:12]
    vdone = trials / f"{args.model}_vllm_{vkey}.jsonl"  # vLLM's figures, answers and load rows as they come: a rerun resumes
    kept = [json.loads(x) for x in vdone.read_text().splitlines()] if vdone.is_file() else []

    def keep(entry: dict) -> None:
        kept.append(entry)
        with vdone.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")

    for short, name, ov, same in servers:
        same_as[name] = same
        answers = {d["prompt"]: d["ids"] for d in kept if d["system"] == name and "prompt" in d}
        loads[name] = {d["load"]["clients"]: d["load"] for d in kept if d["system"] == name and "load" in d}
        figures[name] = next((d["figures"] for d in kept if d["system"] == name and "figures" in d), None)
        wants_load = short != "no-sink"  # vLLM's window without sinks keeps too little to be worth loading
        missing_load = [c for c in clients if c not in loads[name]] if wants_load else []
        if figures[name] is None or len(answers) < len(prompts) or missing_load:
            server, base, figures[name] = start_vllm(python, resolve_spec(args.model), ov, args.batched_tokens, args,
                                                     logs / f"vllm_{short}.log")
            keep({"system": name, "figures": figures[name]})
            try:
                with progress_bar() as bar:
                    job = bar.add_task(name, total=len(prompts))
                    for q in prompts:
                        if q["id"] not in answers:
                            answers[q["id"]] = ask_vllm(base, q["input_ids"], args.max_new_tokens)
                            keep({"system": name, "prompt": q["id"], "ids": answers[q["id"]]})
                        bar.advance(job)
                for c in missing_load:
                    loads[name][c] = load(base, prompts, c, args.load_new_tokens)
                    keep({"system": name, "load": loads[name][c]})
                    print(f"{name}: load {loads[name][c]}", flush=True)
            except httpx.HTTPError as e:  # the server died or failed a request: what it finished is kept
                sys.exit(f"{name} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}); its log: {logs / f'vllm_{short}.log'}; "
                         f"the answers and load rows so far are in {vdone}, and a rerun resumes from them")
            finally:
                server.terminate()
                server.wait(30)
        outputs[name] = [answers[q["id"]] for q in prompts]
        loads[name] = [loads[name][c] for c in clients if c in loads[name]]
    full = figures.get("vLLM full cache", {})
    for name, outs in outputs.items():
        recalls = [N.recall(answer_of(tok, stopper, ids), q["reference"]) for ids, q in zip(outs, prompts)]
        row = {"system": name, "n": len(prompts), "recall": stats.bootstrap_mean(recalls).as_dict(),
               "answers": [answer_of(tok, stopper, ids) for ids in outs[:3]]}
        if name.startswith("vLLM"):
            row.update(figures[name])
            if full.get("max_concurrency") and figures[name].get("max_concurrency"):
                row["concurrency_over_full"] = round(figures[name]["max_concurrency"] / full["max_concurrency"], 2)
            if same_as[name] in outputs:
                row["same_tokens_as"] = same_as[name]
                row["same_tokens"] = sum(a == b for a, b in zip(outs, outputs[same_as[name]]))
            if loads.get(name):
                row["load"] = loads[name]
        rec.emit(row)


if __name__ == "__main__":
    main()
