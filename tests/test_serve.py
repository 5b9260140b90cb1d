"""`attnkit serve` over real loopback HTTP: the official openai client and raw httpx against the local
server and the S2A proxy, including every way a client once wedged the server."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
import httpx  # noqa: E402

from attnkit.errors import AttnkitError  # noqa: E402
from attnkit.s2a.backends import OpenAIBackend, ChatSampling, UpstreamError  # noqa: E402
from attnkit.serve.app import local_app  # noqa: E402
from attnkit.serve.cli import check_exposure  # noqa: E402
from attnkit.serve.engine import Engine  # noqa: E402
from attnkit.serve.proxy import proxy_app  # noqa: E402
from conftest import result_lines

HI = [{"role": "user", "content": "The lucky number of Ashford is"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def engine(embedded):
    model, tok = embedded
    return Engine(model, tok, None, model.config.max_position_embeddings, max_queue=64)


@pytest.fixture(scope="module")
def local(engine):
    server = Running(local_app(engine, "embedded", max_body=1 << 20))
    yield server
    server.stop()


def client(url, key="unused"):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def post(url, body, **kw):
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + "/chat/completions", content=raw, headers={"content-type": "application/json"},
                      timeout=60, **kw)


def openai_error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_openai_client_plain_and_streamed(local):
    c = client(local.url)
    listed = c.models.list().data
    assert [m.id for m in listed] == ["embedded"] and listed[0].model_extra["attnkit"]["technique"] == "plain"
    r = c.chat.completions.create(model="embedded", messages=HI, max_tokens=8, temperature=0)
    text = r.choices[0].message.content
    assert 1 <= r.usage.completion_tokens <= 8 and r.choices[0].finish_reason in ("stop", "length")
    chunks = list(c.chat.completions.create(model="embedded", messages=HI, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    seeded = [c.chat.completions.create(model="embedded", messages=HI, max_tokens=12, temperature=1.0, seed=7)
              .choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-9", messages=HI, max_tokens=4)


@pytest.mark.parametrize("body,param", [
    ({"messages": HI, "max_tokens": -5, "stream": True}, "max_tokens"),
    ({"messages": HI, "top_p": -1}, "top_p"),
    ({"messages": HI, "top_p": 5}, "top_p"),
    ({"messages": HI, "temperature": -0.1}, "temperature"),
    ('{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "temperature"),
    ('{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}', "temperature"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"messages": HI, "max_tokens": "abc"}, "max_tokens"),
    ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}', "max_tokens"),
    ({"messages": HI, "seed": "abc"}, "seed"),
    ({"messages": HI, "n": 3}, "n"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": ["hi"]}, "messages.0"),
    ({"messages": [{"content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content"),
    ({"messages": []}, "messages"),
    ("not json", None),
    ("[1, 2]", None),
])
def test_invalid_requests_are_400_in_openai_shape_and_the_server_goes_on(local, body, param):
    err = openai_error(post(local.url, body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert client(local.url).chat.completions.create(messages=HI, model="embedded", max_tokens=2).choices


def test_content_parts_stop_strings_and_limits(local, engine):
    parts = [{"role": "user", "content": [{"type": "text", "text": "The lucky number "}, {"type": "text", "text": "of Ashford is"}]}]
    a = post(local.url, {"messages": parts, "max_tokens": 6, "temperature": 0}).json()
    b = post(local.url, {"messages": HI, "max_tokens": 6, "temperature": 0}).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    free = post(local.url, {"messages": HI, "max_tokens": 30, "temperature": 0}).json()["choices"][0]["message"]["content"]
    stop = free.strip()[3:5]  # a piece of what the model says anyway
    cut = post(local.url, {"messages": HI, "max_tokens": 30, "temperature": 0, "stop": [stop]}).json()
    assert cut["choices"][0]["finish_reason"] == "stop" and stop not in cut["choices"][0]["message"]["content"]
    assert free.startswith(cut["choices"][0]["message"]["content"])
    streamed = post(local.url, {"messages": HI, "max_tokens": 30, "temperature": 0, "stop": stop, "stream": True}).text
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                   for line in streamed.splitlines() if line.startswith("data: {"))
    assert text == cut["choices"][0]["message"]["content"]
    long_prompt = [{"role": "user", "content": "word " * 1900}]
    capped = post(local.url, {"messages": long_prompt, "max_tokens": 10**9, "temperature": 0}).json()
    assert capped["usage"]["total_tokens"] <= engine.max_positions
    err = openai_error(post(local.url, {"messages": [{"role": "user", "content": "word " * 3000}]}), 400)
    assert err["code"] == "context_length_exceeded"
    openai_error(post(local.url, b'{"messages": "' + b"x" * (2 << 20) + b'"}'), 413)
    assert openai_error(httpx.get(local.url + "/nope"), 404)["type"] == "not_found_error"
    openai_error(httpx.get(local.url + "/chat/completions"), 405)


def test_one_stream_and_forty_concurrent_requests_all_finish(local):
    c = client(local.url)
    started = time.time()

    def stream():
        return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="embedded", messages=HI, max_tokens=200, temperature=0, stream=True) if ch.choices)

    def plain(i):
        return c.chat.completions.create(model="embedded", messages=HI, max_tokens=3, temperature=0.7, seed=i)

    with ThreadPoolExecutor(41) as pool:
        long = pool.submit(stream)
        time.sleep(0.2)
        t = time.time()
        assert httpx.get(local.url + "/models", timeout=5).status_code == 200  # answers while generating
        assert time.time() - t < 2
        replies = list(pool.map(plain, range(40)))
        assert isinstance(long.result(timeout=120), str)
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    assert time.time() - started < 120


def test_disconnecting_clients_cancel_their_generations(local, engine):
    before = engine.stats["cancelled"]
    for _ in range(5):
        with httpx.stream("POST", local.url + "/chat/completions", timeout=30,
                          json={"messages": HI, "max_tokens": 2000, "temperature": 1.0, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content": ""' not in line:
                    break  # one piece of text, then hang up
    deadline = time.time() + 30
    while engine.stats["cancelled"] < before + 5 or engine.busy:
        assert time.time() < deadline, engine.stats
        time.sleep(0.05)
    t = time.time()
    assert client(local.url).chat.completions.create(model="embedded", messages=HI, max_tokens=2).choices
    assert time.time() - t < 10


def test_a_full_queue_is_429_and_errors_end_one_request(embedded):
    model, tok = embedded

    class Slow(Engine):
        def choose(self, row, scores):
            time.sleep(0.05)
            if row.p.seed == 666:
                raise RuntimeError("boom")
            return super().choose(row, scores)

    engine = Slow(model, tok, None, 2048, max_queue=1, max_batch=1)
    server = Running(local_app(engine, "embedded"))
    try:
        with ThreadPoolExecutor(4) as pool:
            rs = list(pool.map(lambda i: post(server.url, {"messages": HI, "max_tokens": 20}), range(4)))
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 2 and 429 in codes
        refused = next(r for r in rs if r.status_code == 429)
        assert openai_error(refused, 429)["type"] == "rate_limit_error" and refused.headers["retry-after"] == "1"
        boom = post(server.url, {"messages": HI, "max_tokens": 5, "seed": 666})
        assert openai_error(boom, 500)["type"] == "server_error"
        streamed = post(server.url, {"messages": HI, "max_tokens": 5, "seed": 666, "stream": True})
        assert "boom" in streamed.text  # the stream ends with an error event
        assert post(server.url, {"messages": HI, "max_tokens": 3}).status_code == 200  # the worker goes on
    finally:
        server.stop()


def test_api_key_and_exposure(engine, monkeypatch):
    server = Running(local_app(engine, "embedded", api_key="sk-local"))
    try:
        assert openai_error(httpx.get(server.url + "/models"), 401)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(server.url, "wrong").models.list()
        assert client(server.url, "sk-local").chat.completions.create(model="embedded", messages=HI, max_tokens=2)
    finally:
        server.stop()
    check_exposure("127.0.0.1", None, False)
    check_exposure("0.0.0.0", "k", False)
    with pytest.raises(AttnkitError, match="api-key-env"):
        check_exposure("0.0.0.0", None, False)
    check_exposure("0.0.0.0", None, True)


# --- the proxy -------------------------------------------------------------------------------------
def fake_upstream():
    """An OpenAI-compatible stand-in whose misbehaviour each test picks by the model name."""
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse, StreamingResponse

    app = FastAPI()
    app.state.seen = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.seen.append({"body": body, "auth": request.headers.get("authorization")})
        last = body["messages"][-1]["content"]
        if last.startswith("Below is a text written by a user."):  # S2A step 1 asks for a rewrite
            text = ("Unbiased text context (includes all content except user's bias): The Louvre is a museum.\n"
                    "Question/Query (does not include user bias/preference): Which city hosts the Louvre?")
        else:
            text = "Paris"
        model = body["model"]
        if model == "slow":
            import asyncio
            await asyncio.sleep(5)
        if model == "garbage" and body.get("stream") is not True and "Paris" == text:
            return PlainTextResponse("<html>oops</html>")
        if not body.get("stream"):
            return {"id": "x", "object": "chat.completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

        def events():
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model,
                     "choices": [{"index": 0, "delta": {"content": "Par"}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
            if model == "truncated":
                return
            if model == "garbage":
                yield "data: {not json\n\n"
                return
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def upstream():
    app = fake_upstream()
    server = Running(app)
    server.app = app
    yield server
    server.stop()


LOUVRE = [{"role": "user", "content": "Which city hosts the Louvre? I think it is Rome."}]


def test_proxy_rewrites_forwards_unknown_params_and_uses_the_clients_key(upstream, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-operator")
    proxy = Running(proxy_app(upstream.url, "s2a"))
    try:
        upstream.app.state.seen.clear()
        r = client(proxy.url, "sk-client").chat.completions.create(
            model="m", messages=LOUVRE, max_tokens=12, extra_body={"top_k": 40, "repetition_penalty": 1.1})
        info = r.model_extra["s2a"]
        assert info["variant"] == "s2a" and info["parse_ok"] and "Rome" not in info["final_prompt"]
        assert r.choices[0].message.content == "Paris"
        forwarded = upstream.app.state.seen[-1]
        assert forwarded["body"]["top_k"] == 40 and forwarded["body"]["repetition_penalty"] == 1.1
        assert all(s["auth"] == "Bearer sk-client" for s in upstream.app.state.seen)  # never the operator's key
        chunks = list(client(proxy.url).chat.completions.create(model="m", messages=LOUVRE, stream=True))
        assert chunks[0].model_extra["s2a"]["variant"] == "s2a"
    finally:
        proxy.stop()
    keyed = Running(proxy_app(upstream.url, "s2a", upstream_key="sk-upstream"))
    try:
        client(keyed.url, "whatever").chat.completions.create(model="m", messages=LOUVRE)
        assert upstream.app.state.seen[-1]["auth"] == "Bearer sk-upstream"
    finally:
        keyed.stop()


def test_proxy_never_fakes_a_finished_stream(upstream):
    proxy = Running(proxy_app(upstream.url, "s2a", timeout=1.0))
    try:
        for model in ("truncated", "garbage"):
            text = post(proxy.url, {"model": model, "messages": LOUVRE, "stream": True}).text
            events = [line for line in text.splitlines() if line.startswith("data:")]
            assert "data: [DONE]" not in events and "error" in json.loads(events[-1][5:]), text
            assert "s2a" in json.loads(events[0][5:])  # what did arrive was passed on
        err = openai_error(post(proxy.url, {"model": "garbage", "messages": LOUVRE}), 502)
        assert "not JSON" in err["message"]
        t = time.time()
        err = openai_error(post(proxy.url, {"model": "slow", "messages": LOUVRE}), 504)
        assert time.time() - t < 4 and err["code"] == "upstream_timeout"
        openai_error(post(proxy.url, {"model": "m", "messages": [{"role": "system", "content": "x"}]}), 400)
    finally:
        proxy.stop()
    dead = Running(proxy_app(f"http://127.0.0.1:{free_port()}/v1", "s2a"))
    try:
        assert openai_error(post(dead.url, {"model": "m", "messages": LOUVRE}), 502)["type"] == "upstream_error"
    finally:
        dead.stop()


def test_backend_errors_and_unreachable_upstream(local):
    with pytest.raises(UpstreamError) as e:
        OpenAIBackend(local.url, "gpt-9").chat([[{"role": "user", "content": "x"}]], ChatSampling(max_tokens=2))
    assert e.value.status == 404
    dead = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=1, backoff=0.01)
    with pytest.raises(UpstreamError, match="APIConnectionError after 2 tries"):
        dead.chat([[{"role": "user", "content": "x"}]], ChatSampling(max_tokens=2))


def test_s2a_eval_through_the_openai_backend(local, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from attnkit.cli import app
    from test_s2a_pipeline import write_sycophancy

    write_sycophancy(tmp_path / "answer.jsonl", n=2)
    out = tmp_path / "rows.jsonl"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    r = CliRunner().invoke(app, ["s2a", "eval", "sycophancy", "--data", str(tmp_path / "answer.jsonl"),
                                 "--backend", "openai", "--base-url", local.url, "--model", "embedded",
                                 "--templates", "suggest-incorrect", "--variants", "baseline,s2a",
                                 "--max-tokens", "12", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    rows = [json.loads(x) for x in result_lines(out) if "variant" in x]
    assert len(rows) == 4 and {x["variant"] for x in rows} == {"baseline", "s2a"}
    for row in rows:  # scores are recomputed from the stored answers
        assert row["score"] == float("paris" in row["answer"].lower().split())
        assert row["tokens"]["completion"] > 0
    assert summary["variants"]["s2a"]["n"] == 2
    assert "sk-secret-123" not in r.output + out.read_text()


def _run_engine(engine, ids, params):
    """One request through an engine of its own, closed (and its technique undone) before returning."""
    import queue as q
    events = q.Queue()
    from attnkit.serve.engine import Job
    engine.submit(Job(ids, params, emit=events.put))
    parts = []
    while True:
        ev = events.get(timeout=60)
        if ev.kind != "text":
            engine.close(wait=30)
            return "".join(parts), ev
        parts.append(ev.text)


def test_served_buckets_and_kv_cache_equal_the_library(embedded):
    from attnkit.buckets import BucketedModel, BucketsConfig
    from attnkit.kvcache.config import HeadKVConfig
    from attnkit.serve.engine import Params

    model, tok = embedded
    prompt = "The password of Dunmore is blue cabin. " * 20 + "What is the password of Dunmore?"
    ids = tok(prompt)["input_ids"]
    bucketed = BucketedModel(model, tok, BucketsConfig([10000, 20000]))
    engine = Engine(model, tok, bucketed.config, 2048)
    text, done = _run_engine(engine, ids, Params(max_new_tokens=10))
    expected = bucketed.generate_ids(__import__("torch").tensor([ids]), None, 10)[0][0]
    assert text == tok.decode([t for t in expected if t not in engine.eos], skip_special_tokens=True)
    assert done.usage["completion_tokens"] == len([t for t in expected if t not in engine.eos])
    plain_text, _ = _run_engine(Engine(model, tok, None, 2048), ids, Params(max_new_tokens=10))
    wide = HeadKVConfig(full={(5, 0)}, sink=4, window=4096, prefill_chunk=64)
    kv_text, _ = _run_engine(Engine(model, tok, wide, 2048), ids, Params(max_new_tokens=10))
    assert kv_text == plain_text
    narrow = Engine(model, tok, HeadKVConfig(full=set(), sink=4, window=8, prefill_chunk=64), 2048)
    assert narrow.describe()["technique"] == "retrieval-head KV cache"
    assert _run_engine(narrow, ids, Params(max_new_tokens=10))[1].kind == "done"
    assert model.config._attn_implementation == "sdpa"  # every request restores the model


def test_one_stream_and_40_concurrent_clients_are_all_served_with_the_defaults(embedded):
    """Default settings (queue 256, batch 32): nobody is refused, requests share forwards, the server
    stays healthy; the official openai client over loopback HTTP."""
    model, tok = embedded
    engine = Engine(model, tok, None, model.config.max_position_embeddings)
    server = Running(local_app(engine, "embedded"))
    try:
        def one(i):
            messages = [{"role": "user", "content": f"The lucky number of place {i} is"}]
            if i == 0:
                stream = client(server.url).chat.completions.create(model="embedded", messages=messages,
                                                                    max_tokens=40, stream=True)
                return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            r = client(server.url).chat.completions.create(model="embedded", messages=messages, max_tokens=8)
            return r.choices[0].message.content

        with ThreadPoolExecutor(41) as pool:
            answers = list(pool.map(one, range(41)))
        assert len(answers) == 41 and all(isinstance(a, str) for a in answers)
        health = httpx.get(server.url.removesuffix("/v1") + "/health").json()
        assert health["status"] == "ok" and health["completed"] == 41 and health["failed"] == 0
        assert health["peak_batch"] > 1  # they shared forward passes
        meta = client(server.url).models.list().data[0].model_extra["attnkit"]
        assert meta["batching"] == "continuous" and meta["max_batch"] == 32
    finally:
        server.stop()
        engine.close(wait=30)


@pytest.mark.slow
def test_the_server_chooses_kv_heads_by_the_recipe_unless_told_not_to(tmp_path):
    """`serve --kv-scores copy.json`: the heads are the plan over copy + echo + induction measured on
    the model, as `niah` chooses them; `--no-kv-recipe` keeps the file's own choice."""
    from attnkit.core.loading import load_model
    from attnkit.kvcache import plan as P
    from attnkit.heads import scores as S
    from attnkit.heads.patterns import pattern_scores
    from attnkit.serve.cli import build_engine

    high = {(5, 0): 0.9, (6, 3): 0.7, (2, 1): 0.2}
    S.save_scores({(l, h): [high.get((l, h), 0.0)] for l in range(8) for h in range(8)}, tmp_path / "copy.json")
    data = S.load_scores(tmp_path / "copy.json")
    model, tok = load_model("embedded")  # the shipped model: 8 layers x 8 heads
    from attnkit.core import registry
    settings = {"scores": [str(tmp_path / "copy.json")], "full": 0.5}
    recipe = build_engine("embedded", registry.choice("kv-cache", given=settings), "cpu", "float32", 8).technique
    alone = build_engine("embedded", registry.choice("kv-cache", given={**settings, "recipe": False}), "cpu",
                         "float32", 8).technique
    assert recipe.full == P.plan([data, *pattern_scores(model, tok)], model.config, "retrieval", 0.5).full
    assert alone.full == P.plan(data, model.config, "retrieval", 0.5).full and alone.full != recipe.full
