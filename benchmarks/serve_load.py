"""Load on `attnkit serve`, against server processes started here on loopback ports.

Robustness (default): N requests from C concurrent clients, half of them streaming, a random mix of
valid and invalid requests, and a share of streaming clients that disconnect mid-stream. Reports
completed / failed counts, p50 and p99 latency of the valid requests, and the server's resident
memory after the first 50 requests and after all of them. An "unexpected" result is a valid request
that does not succeed (429 is counted apart: a full queue is a correct answer), or an invalid one
that is not a 4xx in OpenAI's error shape.

    python benchmarks/serve_load.py --requests 500 --concurrency 40

Throughput (`--throughput`): short valid streaming requests (max_tokens 16, greedy) at 1, 8, 32 and
64 concurrent clients, the batching engine (`--max-batch 32`) against one request at a time
(`--max-batch 1`) in the same run, per model and technique: requests/s, tokens/s, p50/p99 latency
and time to first token, and the ratio batched / one at a time. With `--vllm-python`, vLLM's own
server (float32, the same threads) on each real model in the same run, and attnkit batched / vLLM.

    python benchmarks/serve_load.py --throughput --models embedded,smollm2-135m-instruct
    python benchmarks/serve_load.py --throughput --models smollm2-135m-instruct --kv '' \
        --vllm-python benchmarks/.vllm-venv/bin/python --record results/benchmarks/serve_vllm_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from _common import Record, add_record_option

BAD = [{"max_tokens": -5}, {"top_p": -1}, {"temperature": 9}, {"n": 3}, {"seed": "x"}, {"max_tokens": "abc"},
       {"messages": [{"role": "wizard", "content": "hi"}]}, {"messages": []}, {"messages": "hi"},
       {"messages": [{"role": "user", "content": None}]}, {"model": "gpt-9"}]


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(url: str, rng: random.Random) -> dict:
    body = {"model": "embedded", "messages": [{"role": "user", "content": "The lucky number of Ashford is"}],
            "max_tokens": rng.randint(1, 16), "temperature": rng.choice([0, 0.7]), "stream": rng.random() < 0.5}
    valid = rng.random() < 0.7
    if not valid:
        body.update(rng.choice(BAD))
    t = time.perf_counter()
    try:
        with httpx.stream("POST", url, json=body, timeout=300) as r:
            text = r.read().decode()
            status = r.status_code
    except httpx.HTTPError as e:
        return {"valid": valid, "status": None, "error": type(e).__name__, "s": time.perf_counter() - t}
    ok = status == 200 and (not body["stream"] or text.rstrip().endswith("data: [DONE]"))
    shaped = False
    if status >= 400:
        try:
            shaped = set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
        except (ValueError, KeyError, TypeError):
            pass
    return {"valid": valid, "status": status, "ok": ok, "shaped": shaped, "s": time.perf_counter() - t}


def start_server(model: str, *extra: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "attnkit.cli", "serve", "--model", model, "--port", str(port),
                               *extra], stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            httpx.get(base + "/health", timeout=1)
            return server, base
        except httpx.HTTPError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                sys.exit(f"the server did not start: {model} {' '.join(extra)}")
            time.sleep(0.2)


def start_vllm(python: str, model: str):
    """vLLM's OpenAI server on the same model (its own venv, `attnkit serve --engine vllm`'s command),
    float32, on the same 2 threads as attnkit's server."""
    from attnkit.core.loading import resolve_spec
    from attnkit.serve import vllm

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = vllm.command(vllm.find_python(python), resolve_spec(model), model, "127.0.0.1", port, "float32")
    env = {**vllm.environment(None), "OMP_NUM_THREADS": str(torch_threads()), "VLLM_CPU_KVCACHE_SPACE": "2"}
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    if not vllm.wait_until_healthy(server, base, 900):
        server.kill()
        sys.exit(f"vLLM did not start: {model}")
    return server, base


def torch_threads() -> int:
    import torch
    return min(2, torch.get_num_threads())


def timed_stream(url: str, i: int, model: str | None = None) -> dict:
    """One short greedy streaming request: latency, time to first token, completion tokens."""
    body = {"messages": [{"role": "user", "content": f"The lucky number of place {i} is"}], "max_tokens": 16,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    t = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", url, json=body, timeout=600) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code}
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if first is None and data.get("choices") and data["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    return {"ok": True, "s": time.perf_counter() - t, "ttft": first if first is not None else time.perf_counter() - t,
            "tokens": tokens}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def throughput(args, rec) -> None:
    levels = [int(x) for x in args.levels.split(",")]
    for model in args.models.split(","):
        techniques = {"plain": []}
        if args.kv:
            techniques["kv cache"] = args.kv.split()
        for technique, flags in techniques.items():
            rows = {}
            engines = [("batched", str(args.max_batch)), ("one at a time", "1")]
            if args.vllm_python and technique == "plain" and model != "embedded":
                engines.append(("vLLM", None))
            for engine, batch in engines:
                server, base = start_vllm(args.vllm_python, model) if batch is None else \
                    start_server(model, "--max-batch", batch, *flags)
                name = model if batch is None else None
                try:
                    timed_stream(base + "/v1/chat/completions", -1, name)  # warm-up
                    for c in levels:
                        n = max(args.min_requests, 2 * c)
                        t = time.perf_counter()
                        with ThreadPoolExecutor(c) as pool:
                            res = list(pool.map(lambda i: timed_stream(base + "/v1/chat/completions", i, name),
                                                range(n)))
                        wall = time.perf_counter() - t
                        good = [r for r in res if r["ok"]]
                        row = {"model": model, "technique": technique, "engine": engine, "clients": c, "requests": n,
                               "failed": n - len(good), "req_per_s": round(len(good) / wall, 2),
                               "tok_per_s": round(sum(r["tokens"] for r in good) / wall, 1),
                               "p50_s": pct([r["s"] for r in good], 0.5), "p99_s": pct([r["s"] for r in good], 0.99),
                               "ttft_p50_s": pct([r["ttft"] for r in good], 0.5)}
                        rows[(engine, c)] = row
                        if engine == "one at a time":
                            row["batched_over_one"] = round(rows[("batched", c)]["req_per_s"] / row["req_per_s"], 2)
                        if engine == "vLLM":
                            row["attnkit_batched_over_vllm"] = round(rows[("batched", c)]["req_per_s"] /
                                                                     row["req_per_s"], 2)
                        rec.emit(row)
                finally:
                    server.terminate()
                    server.wait(10)


def disconnecting(url: str, rng: random.Random) -> dict:
    """A streaming client that reads two chunks and goes away."""
    body = {"messages": [{"role": "user", "content": "The lucky number of Ashford is"}], "max_tokens": 64,
            "stream": True}
    t = time.perf_counter()
    try:
        with httpx.stream("POST", url, json=body, timeout=300) as r:
            for k, _ in enumerate(r.iter_lines()):
                if k >= 2:
                    break
    except httpx.HTTPError:
        pass
    return {"valid": True, "disconnect": True, "status": 200, "ok": True, "s": time.perf_counter() - t}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=40)
    ap.add_argument("--disconnect", type=float, default=0.1, help="share of clients that leave mid-stream")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--throughput", action="store_true", help="the batched-vs-one-at-a-time sweep instead")
    ap.add_argument("--models", default="embedded,smollm2-135m-instruct")
    ap.add_argument("--levels", default="1,8,32,64")
    ap.add_argument("--min-requests", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--vllm-python", default=None, help="throughput: also vLLM's server on each real model, in the "
                    "venv of this Python (bash scripts/vllm_venv.sh builds benchmarks/.vllm-venv)")
    ap.add_argument("--kv", default="--kv-choose none --kv-sink 16 --kv-window 128",
                    help="serve flags of the KV-cache rows ('' to leave them out)")
    add_record_option(ap, "serve_load")
    args = ap.parse_args()
    if args.throughput:
        args.model = "throughput"
        return throughput(args, Record(args, "serve_load", {"models": args.models, "levels": args.levels,
                                                            "max_batch": args.max_batch, "kv": args.kv,
                                                            "vllm": bool(args.vllm_python)}))
    rec = Record(args, "serve_load", {"requests": args.requests, "concurrency": args.concurrency,
                                      "disconnect": args.disconnect, "seed": args.seed})
    server, base = start_server(args.model)
    try:
        one(base + "/v1/chat/completions", random.Random(-1))  # warm-up
        rngs = [random.Random(args.seed * 100_003 + i) for i in range(args.requests)]
        leave = {i for i in range(args.requests) if rngs[i].random() < args.disconnect}
        url = base + "/v1/chat/completions"
        work = lambda i: disconnecting(url, rngs[i]) if i in leave else one(url, rngs[i])  # noqa: E731
        t = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(work, range(min(50, args.requests))))
            before = rss_mib(server.pid)
            results += list(pool.map(work, range(min(50, args.requests), args.requests)))
        wall = time.perf_counter() - t
        time.sleep(1)
        after = rss_mib(server.pid)
        health = httpx.get(base + "/health", timeout=5).json()
    finally:
        server.terminate()
        server.wait(10)
    valid = [r for r in results if r["valid"]]
    invalid = [r for r in results if not r["valid"]]
    busy = sum(r["status"] == 429 for r in valid)
    unexpected = (sum(not r.get("ok") and r["status"] != 429 for r in valid)
                  + sum(not (r["status"] and 400 <= r["status"] < 500 and r["shaped"]) for r in invalid))
    lat = sorted(r["s"] for r in valid if r.get("ok") and not r.get("disconnect"))
    rec.emit({
        "requests": len(results), "concurrency": args.concurrency, "wall_s": round(wall, 1),
        "disconnected": sum(bool(r.get("disconnect")) for r in results),
        "valid_completed": sum(bool(r.get("ok")) for r in valid), "valid_429": busy,
        "invalid_4xx_openai_shape": sum(bool(r["status"] and 400 <= r["status"] < 500 and r["shaped"]) for r in invalid),
        "invalid": len(invalid), "unexpected": unexpected,
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
        "server_rss_mib_after_50": round(before, 1), "server_rss_mib_after_all": round(after, 1),
        "rss_growth": round(after / before - 1, 4),
        "server_stats": health})


if __name__ == "__main__":
    main()
