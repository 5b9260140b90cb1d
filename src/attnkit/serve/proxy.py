"""`attnkit serve --upstream URL --s2a VARIANT`: System 2 Attention in front of any OpenAI-compatible server.

Each request's last user message is rewritten with the S2A variant (step 1, sent to the upstream),
then the request, with the rewrite in place of that message, is forwarded (step 2) and the answer
comes back with an `s2a` field holding the rewrite. Every request parameter the proxy does not read is
forwarded unchanged. The upstream key is `--upstream-key-env`'s, or else the client's own bearer key:
an unauthenticated client never spends the operator's key. A stream the upstream cuts short, or
fills with something that is not JSON, ends with an error event, never with a made-up `[DONE]`.
"""

# no `from __future__ import annotations`: FastAPI must see the real Request class in the endpoints
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from .protocol import ApiError, Message, bearer, install_auth, install_error_handlers, parse_request, read_body


class ProxyRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: StrictBool = False


def _upstream_error(status: int, raw: bytes) -> ApiError:
    try:
        err = json.loads(raw).get("error")
        message = err.get("message") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        message = raw[:200].decode(errors="replace") or "no message"
    return ApiError(status, f"upstream: {message}", kind="upstream_error")


def proxy_app(upstream: str, variant: str = "s2a", upstream_key: str | None = None, api_key: str | None = None,
              timeout: float = 120.0, max_body: int = 4 << 20):
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse
    from starlette.concurrency import run_in_threadpool

    from attnkit.s2a.backends import OpenAIBackend, Sampling, UpstreamError
    from attnkit.s2a.pipeline import S2A

    from contextlib import asynccontextmanager

    client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    @asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    app = FastAPI(title="attnkit S2A proxy", version="1", lifespan=lifespan)
    install_error_handlers(app)
    install_auth(app, api_key)
    base = upstream.rstrip("/")

    def key_for(request) -> str:
        return upstream_key or bearer(request) or "none"

    async def send(method: str, path: str, key: str, body: dict | None = None, stream: bool = False):
        req = client.build_request(method, base + path, json=body, headers={"Authorization": f"Bearer {key}"})
        try:
            return await client.send(req, stream=stream)
        except httpx.TimeoutException:
            raise ApiError(504, f"upstream {base} did not answer within {timeout:g} s", code="upstream_timeout") from None
        except httpx.HTTPError as e:
            raise ApiError(502, f"upstream {base} is unreachable ({type(e).__name__})", code="upstream_unreachable") from None

    @app.get("/v1/models")
    async def models(request: Request):
        r = await send("GET", "/models", key_for(request))
        if r.status_code >= 400:
            raise _upstream_error(r.status_code, r.content)
        try:
            return r.json()
        except ValueError:
            raise ApiError(502, "upstream answered /models with something that is not JSON") from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_request(await read_body(request, max_body), ProxyRequest)
        messages = req.messages
        users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
        if not users:
            raise ApiError(400, "S2A needs a user message", param="messages")
        last = users[-1]
        try:
            text = Message.model_validate(messages[last]).text()
        except ValueError:
            raise ApiError(400, "the last user message must have text content", param=f"messages.{last}") from None
        extra = dict(req.model_extra or {})
        key = key_for(request)
        rewriter = OpenAIBackend(base, req.model, api_key=key, max_retries=0, timeout=timeout)
        step1 = S2A(rewriter, variant, Sampling(temperature=_number(extra, "temperature", 0.6),
                                                top_p=_number(extra, "top_p", 0.9),
                                                max_tokens=int(_number(extra, "max_tokens", 1024)),
                                                seed=extra["seed"] if isinstance(extra.get("seed"), int) else None))
        try:
            prepared = (await run_in_threadpool(step1.prepare, [text]))[0]
        except UpstreamError as e:
            status = e.status if e.status < 500 or e.status == 504 else 502
            raise ApiError(status, f"upstream (S2A rewrite): {e.detail}", kind="upstream_error",
                           code="upstream_timeout" if status == 504 else None) from None
        info = {"s2a": {"variant": variant, "rewrite": prepared.rewrite, "final_prompt": prepared.final_prompt,
                        "parse_ok": prepared.parse_ok, "fell_back": prepared.fell_back}}
        body = {**extra, "model": req.model, "stream": req.stream,
                "messages": messages[:last] + [{"role": "user", "content": prepared.final_prompt}] + messages[last + 1:]}
        r = await send("POST", "/chat/completions", key, body, stream=req.stream)
        if r.status_code >= 400:
            raw = await r.aread()
            await r.aclose()
            raise _upstream_error(r.status_code, raw)
        if not req.stream:
            try:
                reply = r.json()
            except ValueError:
                raise ApiError(502, "upstream answered with something that is not JSON") from None
            if not isinstance(reply, dict):
                raise ApiError(502, "upstream answered with JSON that is not a completion")
            return {**reply, **info}
        return StreamingResponse(_relay(r, info), media_type="text/event-stream")

    return app


def _number(fields: dict, name: str, default: float) -> float:
    """A sampling setting for the rewrite call; the upstream itself judges the forwarded value."""
    value = fields.get(name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")
    return float(value) if ok else default


async def _relay(response, info: dict):
    """Pass the upstream's events on, the first with the S2A info; end with an error event if the
    stream is cut short or broken."""
    import httpx

    first, finished = True, False
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                finished = True
                yield "data: [DONE]\n\n"
                break
            try:
                event = json.loads(data)
            except ValueError:
                yield ApiError(502, "upstream sent an event that is not JSON; the answer is incomplete").event()
                return
            if first and isinstance(event, dict) and "error" not in event:
                event, first = {**event, **info}, False
            yield f"data: {json.dumps(event)}\n\n"
        if not finished:
            yield ApiError(502, "upstream ended the stream before [DONE]; the answer is incomplete").event()
    except httpx.HTTPError as e:
        yield ApiError(502, f"upstream stream broke ({type(e).__name__}); the answer is incomplete").event()
    finally:
        await response.aclose()
