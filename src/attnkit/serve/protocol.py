"""The OpenAI chat-completions request, validated, and OpenAI-shaped errors.

Unknown request fields are accepted and ignored (clients send many); every field attnkit reads is
checked, and a request it cannot honour is refused rather than silently changed.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

Number = Annotated[float, Field(allow_inf_nan=False)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    n: StrictInt | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: dict | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def chat(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             502: "upstream_error", 504: "upstream_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers
        self.kind = kind or self.TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self):
        from fastapi.responses import JSONResponse
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def event(self) -> str:
        """The error as the last event of a stream."""
        return f"data: {json.dumps(self.body())}\n\n"


def parse_request(raw: bytes, model: type[BaseModel] = ChatRequest):
    """Bytes -> validated request, or ApiError(400) naming the first offending field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"] if _field_part(x)) or None
        raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param) from None


def _field_part(part) -> bool:
    """A location part that names a field or an index, not a union member such as 'str' or 'list[...]'."""
    return isinstance(part, int) or (part.isidentifier() and part not in ("str", "int", "float", "bool"))


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is {int(declared):,} bytes; this server takes at most {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is over {limit:,} bytes, this server's limit")
        chunks.append(chunk)
    return b"".join(chunks)


def install_error_handlers(app) -> None:
    """Every error leaves the server in OpenAI's shape, 404/405 of unknown routes and 500s included."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def _api(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return ApiError(exc.status_code, message).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        return ApiError(400, str(exc.errors()[0].get("msg", "invalid request"))).response()

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        return ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").response()


def bearer(request) -> str | None:
    value = request.headers.get("authorization", "")
    return value[7:].strip() or None if value.lower().startswith("bearer ") else None


class _RequireKey:
    """ASGI middleware: every /v1 route needs `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        import hmac

        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            value = dict(scope["headers"]).get(b"authorization", b"")
            given = value[7:].strip() if value[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                response = ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                    code="invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_auth(app, api_key: str | None) -> None:
    if api_key:
        app.add_middleware(_RequireKey, api_key=api_key)
