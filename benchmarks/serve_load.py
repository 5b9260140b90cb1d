"""Load on `attnkit serve`: N requests from C concurrent clients, half of them streaming, a random mix of
valid and invalid requests, against a server process started here on a loopback port.

Reports completed / failed counts, p50 and p99 latency of the valid requests, and the server's
resident memory before and after. An "unexpected" result is a valid request that does not succeed
(429 is counted apart: a full queue is a correct answer), or an invalid one that is not a 4xx in
OpenAI's error shape.

    python benchmarks/serve_load.py --requests 200 --concurrency 40
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=40)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "attnkit.cli", "serve", "--model", args.model, "--port", str(port),
                               "--max-queue", str(args.max_queue)], stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.HTTPError:
                if time.time() > deadline or server.poll() is not None:
                    sys.exit("the server did not start")
                time.sleep(0.2)
        one(base + "/v1/chat/completions", random.Random(-1))  # warm-up
        before = rss_mib(server.pid)
        rngs = [random.Random(args.seed * 100_003 + i) for i in range(args.requests)]
        t = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda r: one(base + "/v1/chat/completions", r), rngs))
        wall = time.perf_counter() - t
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
    lat = sorted(r["s"] for r in valid if r.get("ok"))
    print(json.dumps({
        "requests": len(results), "concurrency": args.concurrency, "wall_s": round(wall, 1),
        "valid_completed": sum(bool(r.get("ok")) for r in valid), "valid_429": busy,
        "invalid_4xx_openai_shape": sum(bool(r["status"] and 400 <= r["status"] < 500 and r["shaped"]) for r in invalid),
        "invalid": len(invalid), "unexpected": unexpected,
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
        "server_rss_mib_before": round(before, 1), "server_rss_mib_after": round(after, 1),
        "server_stats": health}))


if __name__ == "__main__":
    main()
