"""Chat backends for S2A: a local Hugging Face model, or any OpenAI-compatible endpoint.

Both take a list of conversations (lists of {"role", "content"} messages) and return one
`Completion` per conversation, so tasks and the pipeline never know which one they talk to.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol


from ..core.family import architecture
from ..core.decode import left_padded, render_chat
from ..errors import AttnkitError


class UpstreamError(AttnkitError):
    """An OpenAI-compatible endpoint answered with an error (or not at all)."""

    def __init__(self, status: int, message: str, url: str):
        super().__init__(f"{url} refused the request ({status}): {message}")
        self.status, self.detail = status, message


@dataclass
class ChatSampling:
    temperature: float = 0.6  # the paper's setting for every method
    top_p: float = 0.9
    max_tokens: int = 256
    seed: int | None = 0


@dataclass
class Completion:
    text: str
    usage: dict = field(default_factory=lambda: {"prompt": 0, "completion": 0})
    truncated: bool = False  # the token budget ended it before the model did


class Backend(Protocol):
    def chat(self, conversations: list[list[dict]], sampling: ChatSampling) -> list[Completion]: ...

    def identity(self) -> dict: ...


class HFBackend:
    """Batched generation with a local model (chat template applied when the tokenizer has one),
    through `core.generate` with any of its techniques (None: the model as it is)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, technique=None):
        self.model, self.tokenizer, self.batch_size, self.technique = model, tokenizer, batch_size, technique
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.name = getattr(model.config, "_name_or_path", "") or type(model).__name__

    def identity(self) -> dict:
        from ..core.loading import model_identity
        return {"backend": "hf", **model_identity(self.model)}

    def render(self, messages: list[dict]) -> str:
        return render_chat(self.tokenizer, messages)[0]

    def chat(self, conversations: list[list[dict]], sampling: ChatSampling) -> list[Completion]:
        from ..core.generate import Sampling, generate

        tok, model = self.tokenizer, self.model
        limit = architecture(model.config).max_positions
        out = []
        for i in range(0, len(conversations), self.batch_size):
            texts = [self.render(m) for m in conversations[i:i + self.batch_size]]
            batch = left_padded(tok, texts, add_special_tokens=not getattr(tok, "chat_template", None))
            max_new = sampling.max_tokens
            if limit:
                max_new = min(max_new, limit - batch["input_ids"].shape[1])
                if max_new < 1:
                    raise AttnkitError(f"a prompt of {batch['input_ids'].shape[1]} tokens leaves no room to answer "
                                       f"within the model's {limit} positions")
            draw = Sampling(sampling.temperature, sampling.top_p, None if sampling.seed is None else sampling.seed + i)
            gen = generate(model, tok, batch["input_ids"], batch["attention_mask"], self.technique, max_new,
                           stop_rule="eos", sampling=draw)
            for row, mask, finish in zip(gen.ids, batch["attention_mask"], gen.finish):
                text = tok.decode(row, skip_special_tokens=True).strip()
                out.append(Completion(text, {"prompt": int(mask.sum()), "completion": len(row)}, finish == "length"))
        return out


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, Ollama, OpenAI).

    The API key is read from the environment variable named by `api_key_env` and never printed;
    local servers that need no key get a placeholder. Requests run `concurrency` at a time and are
    retried with exponential backoff and jitter on 429, 5xx, timeouts and dropped connections.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 max_retries: int = 5, timeout: float = 120.0, backoff: float = 1.0, api_key: str | None = None):
        from openai import OpenAI

        self.base_url, self.name = base_url, model
        self.concurrency, self.max_retries, self.backoff = max(1, concurrency), max_retries, backoff
        key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.client = OpenAI(base_url=base_url, api_key=key or "not-needed", max_retries=0, timeout=timeout)

    def identity(self) -> dict:
        return {"backend": "openai", "url": self.base_url, "model": self.name}

    def _one(self, messages: list[dict], sampling: ChatSampling) -> Completion:
        import openai

        retryable = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                     openai.APIConnectionError)
        for attempt in range(self.max_retries + 1):
            try:
                r = self.client.chat.completions.create(
                    model=self.name, messages=messages, temperature=sampling.temperature, top_p=sampling.top_p,
                    max_tokens=sampling.max_tokens, seed=sampling.seed)
            except retryable as e:
                if attempt == self.max_retries:
                    status = getattr(e, "status_code", None) or (504 if isinstance(e, openai.APITimeoutError) else 502)
                    raise UpstreamError(status, f"{type(e).__name__} after {attempt + 1} tries", self.base_url) from None
                time.sleep(self.backoff * 2 ** attempt * (0.5 + random.random() / 2))
                continue
            except openai.APIStatusError as e:
                raise UpstreamError(e.status_code, _message(e), self.base_url) from None
            usage = r.usage
            return Completion(r.choices[0].message.content or "",
                              {"prompt": getattr(usage, "prompt_tokens", 0) or 0,
                               "completion": getattr(usage, "completion_tokens", 0) or 0},
                              r.choices[0].finish_reason == "length")
        raise AssertionError("unreachable")

    def chat(self, conversations: list[list[dict]], sampling: ChatSampling) -> list[Completion]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda m: self._one(m, sampling), conversations))


def _message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return str(getattr(e, "message", e)).splitlines()[0]


def make_backend(kind: str, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, device: str = "cpu", dtype: str = "float32", batch_size: int = 8,
                 device_map: str | None = None) -> Backend:
    if kind == "hf":
        from ..core.loading import load_model
        mdl, tok = load_model(model, device=device, dtype=dtype, device_map=device_map)
        return HFBackend(mdl, tok, batch_size)
    if kind == "openai":
        if not base_url:
            raise AttnkitError("the openai backend needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        return OpenAIBackend(base_url, model, api_key_env, concurrency)
    raise AttnkitError(f"unknown backend {kind!r}: use hf or openai")
