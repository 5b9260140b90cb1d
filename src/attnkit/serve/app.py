"""`attnkit serve --model`: OpenAI chat completions from a local model (plain, Attention Buckets, or the
retrieval-head KV cache), streaming or not, in front of one `Engine`."""

# no `from __future__ import annotations`: FastAPI must see the real Request class in the endpoints
import asyncio
import json
import queue
import time
import uuid

from attnkit.core.decode import render_chat

from .engine import Engine, Event, Job, Params
from .protocol import ApiError, ChatRequest, install_auth, install_error_handlers, parse_request, read_body

DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 1.0, 1.0  # OpenAI's defaults


def local_app(engine: Engine, name: str, api_key: str | None = None, max_body: int = 4 << 20,
              default_max_tokens: int = 512):
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="attnkit", version="1")
    install_error_handlers(app)
    install_auth(app, api_key)
    meta = {"id": name, "object": "model", "created": 0, "owned_by": "attnkit",
            "attnkit": {**engine.describe(), "max_positions": engine.max_positions}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [meta]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "busy": engine.busy, "running": len(engine.rows),
                "queued": engine.queued, **engine.stats}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_request(await read_body(request, max_body), ChatRequest)
        if req.model not in (None, name):
            raise ApiError(404, f"model {req.model!r} is not served here; this server has {name!r}",
                           param="model", code="model_not_found")
        ids = await run_in_threadpool(_tokenize, engine.tokenizer, req.chat())
        room = (engine.max_positions - len(ids)) if engine.max_positions else None
        if room is not None and room < 1:
            raise ApiError(400, f"the prompt is {len(ids):,} tokens; the model's context is {engine.max_positions:,}",
                           param="messages", code="context_length_exceeded")
        wanted = req.new_tokens() or default_max_tokens
        params = Params(min(wanted, room) if room is not None else wanted,
                        req.temperature if req.temperature is not None else DEFAULT_TEMPERATURE,
                        req.top_p if req.top_p is not None else DEFAULT_TOP_P, req.seed,
                        list(req.stop or []) + turn_stops(engine.tokenizer))
        events = _submit(engine, ids, params)
        first = await anext(events)  # a generation that fails at once is answered as an error, not a stream
        if first.kind == "error":
            raise ApiError(500, first.text, kind="server_error")
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(_stream(cid, name, first, events, req.include_usage()),
                                     media_type="text/event-stream")
        return await _collect(cid, name, first, events, request)

    return app


def turn_stops(tokenizer) -> list[str]:
    """A base model without a chat template is prompted with `render_plain` ("User: ...\n\nAssistant:");
    its answer ends where it starts writing the user's next turn."""
    return [] if getattr(tokenizer, "chat_template", None) else ["\n\nUser:"]


def _tokenize(tokenizer, messages: list[dict]) -> list[int]:
    text, special = render_chat(tokenizer, messages)
    return tokenizer(text, add_special_tokens=special)["input_ids"]


async def _submit(engine: Engine, ids: list[int], params: Params):
    """Queue a job; yield its events until done or error. Closing the generator cancels the job."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    job = Job(ids, params, emit=lambda ev: loop.call_soon_threadsafe(inbox.put_nowait, ev))
    try:
        engine.submit(job)
    except queue.Full:
        raise ApiError(429, "the server is busy: every queue place is taken; retry later",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    try:
        while True:
            event = await inbox.get()
            yield event
            if event.kind != "text":
                return
    finally:
        job.cancelled.set()  # no effect once done; stops the worker within one step otherwise


async def _collect(cid: str, name: str, first: Event, events, request) -> dict:
    parts, event = [], first
    while event.kind == "text":
        parts.append(event.text)
        event = await _next_or_disconnect(events, request)
    if event.kind == "error":
        raise ApiError(500, event.text, kind="server_error")
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                         "finish_reason": event.finish, "logprobs": None}],
            "usage": event.usage}


async def _next_or_disconnect(events, request) -> Event:
    """The next event; if the client has gone meanwhile, cancel the generation (closing `events`)."""
    pending = asyncio.ensure_future(anext(events))
    while True:
        done, _ = await asyncio.wait({pending}, timeout=0.25)
        if done:
            return pending.result()
        if await request.is_disconnected():
            pending.cancel()
            await events.aclose()
            raise asyncio.CancelledError


async def _stream(cid: str, name: str, first: Event, events, include_usage: bool):
    def chunk(delta: dict, finish=None, usage=None) -> str:
        data = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if usage is not None:
            data = {**data, "choices": [], "usage": usage}
        return f"data: {json.dumps(data)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        event = first
        while event.kind == "text":
            if event.text:
                yield chunk({"content": event.text})
            event = await anext(events)
        if event.kind == "error":
            yield ApiError(500, event.text, kind="server_error").event()
            return
        yield chunk({}, event.finish)
        if include_usage:
            yield chunk({}, usage=event.usage)
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()  # a client that left cancels its generation
