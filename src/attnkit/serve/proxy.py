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


class Upstream:
    """The OpenAI-compatible server behind the proxy: one pooled async client, bounded by `timeout`."""

    def __init__(self, url: str, timeout: float):
        import httpx

        self.base, self.timeout = url.rstrip("/"), timeout
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    async def send(self, method: str, path: str, key: str, body: dict | None = None, stream: bool = False):
        import httpx

        req = self.client.build_request(method, self.base + path, json=body, headers={"Authorization": f"Bearer {key}"})
        try:
            return await self.client.send(req, stream=stream)
        except httpx.TimeoutException:
            raise ApiError(504, f"upstream {self.base} did not answer within {self.timeout:g} s",
                           code="upstream_timeout") from None
        except httpx.HTTPError as e:
            raise ApiError(502, f"upstream {self.base} is unreachable ({type(e).__name__})",
                           code="upstream_unreachable") from None

    async def rewrite(self, variant: str, model: str, text: str, fields: dict, key: str):
        """S2A step 1 through the upstream, with the request's sampling settings."""
        from starlette.concurrency import run_in_threadpool

        from attnkit.s2a.backends import OpenAIBackend, ChatSampling, UpstreamError
        from attnkit.s2a.pipeline import S2A

        backend = OpenAIBackend(self.base, model, api_key=key, max_retries=0, timeout=self.timeout)
        sampling = ChatSampling(temperature=_number(fields, "temperature", 0.6), top_p=_number(fields, "top_p", 0.9),
                            max_tokens=int(_number(fields, "max_tokens", 1024)),
                            seed=fields["seed"] if isinstance(fields.get("seed"), int) else None)
        try:
            return (await run_in_threadpool(S2A(backend, variant, sampling).prepare, [text]))[0]
        except UpstreamError as e:
            status = e.status if e.status < 500 or e.status == 504 else 502
            raise ApiError(status, f"upstream (S2A rewrite): {e.detail}", kind="upstream_error",
                           code="upstream_timeout" if status == 504 else None) from None


def _last_user_text(messages: list[dict]) -> tuple[int, str]:
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ApiError(400, "S2A needs a user message", param="messages")
    try:
        return users[-1], Message.model_validate(messages[users[-1]]).text()
    except ValueError:
        raise ApiError(400, "the last user message must have text content", param=f"messages.{users[-1]}") from None


def proxy_app(upstream: str, variant: str = "s2a", upstream_key: str | None = None, api_key: str | None = None,
              timeout: float = 120.0, max_body: int = 4 << 20):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    up = Upstream(upstream, timeout)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await up.client.aclose()

    app = FastAPI(title="attnkit S2A proxy", version="1", lifespan=lifespan)
    install_error_handlers(app)
    install_auth(app, api_key)

    def key_for(request) -> str:
        return upstream_key or bearer(request) or "none"

    @app.get("/v1/models")
    async def models(request: Request):
        r = await up.send("GET", "/models", key_for(request))
        if r.status_code >= 400:
            raise _upstream_error(r.status_code, r.content)
        try:
            return r.json()
        except ValueError:
            raise ApiError(502, "upstream answered /models with something that is not JSON") from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_request(await read_body(request, max_body), ProxyRequest)
        last, text = _last_user_text(req.messages)
        fields, key = dict(req.model_extra or {}), key_for(request)
        prepared = await up.rewrite(variant, req.model, text, fields, key)
        info = {"s2a": {"variant": variant, "rewrite": prepared.rewrite, "final_prompt": prepared.final_prompt,
                        "parse_ok": prepared.parse_ok, "fell_back": prepared.fell_back}}
        messages = req.messages[:last] + [{"role": "user", "content": prepared.final_prompt}] + req.messages[last + 1:]
        r = await up.send("POST", "/chat/completions", key,
                          {**fields, "model": req.model, "stream": req.stream, "messages": messages}, stream=req.stream)
        if r.status_code >= 400:
            raw = await r.aread()
            await r.aclose()
            raise _upstream_error(r.status_code, raw)
        if req.stream:
            return StreamingResponse(_relay(r, info), media_type="text/event-stream")
        try:
            reply = r.json()
        except ValueError:
            raise ApiError(502, "upstream answered with something that is not JSON") from None
        if not isinstance(reply, dict):
            raise ApiError(502, "upstream answered with JSON that is not a completion")
        return {**reply, **info}

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
