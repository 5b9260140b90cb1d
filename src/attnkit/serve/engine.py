"""One generation worker behind a bounded queue.

The model runs on a single worker thread, one request at a time; requests wait in a queue of
`max_queue` places (a full queue is answered 429 by the app). The worker hands text to the request's
event loop as it is produced, checks the request's cancel flag before every decode step (a client
that disconnects frees the model within one step), and turns any error of one generation into an
error event for that request alone. No lock is ever held while the app yields to a client.

Tokens come from `core.generate.decode_steps` with the engine's technique (None: the model as it
is; a `HeadKVConfig`, a `BucketsConfig`, ... : any technique of `core.generate`), one at a time and
without end; the worker stops them on EOS, a stop string, the token budget or cancellation.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from attnkit.core.decode import eos_ids
from attnkit.core.generate import PLAIN, Sampling, decode_steps


@dataclass
class Params:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Event:
    kind: str  # "text", "done" or "error"
    text: str = ""
    finish: str | None = None  # done: "stop" or "length"
    usage: dict | None = None


@dataclass
class Job:
    ids: list[int]
    params: Params
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Owns the model: one worker thread, a bounded queue of jobs."""

    def __init__(self, model, tokenizer, technique=None, max_positions: int | None = None, max_queue: int = 16):
        self.model, self.tokenizer, self.max_positions = model, tokenizer, max_positions
        self.technique = technique if technique is not None else PLAIN
        self.eos = eos_ids(model, tokenizer)
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0}
        self.busy = False
        self._worker = threading.Thread(target=self._run, name="attnkit-generate", daemon=True)
        self._worker.start()

    def describe(self) -> dict:
        return self.technique.describe()

    def tokens(self, ids: list[int], p: Params) -> Iterator[int]:
        """The generated token ids of one prompt, without end (closing the iterator ends the generation)."""
        with self.technique.prepare(self.model) as session:
            steps = decode_steps(self.model, session, torch.tensor([ids]), None, Sampling(p.temperature, p.top_p, p.seed))
            try:
                for step in steps:
                    yield int(step.tokens[0])
            finally:
                steps.close()

    def submit(self, job: Job) -> None:
        """Raises queue.Full when every place is taken."""
        self.jobs.put_nowait(job)

    def close(self) -> None:
        try:
            self.jobs.put_nowait(None)
        except queue.Full:
            pass

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                continue
            self.busy = True
            try:
                self._generate(job)
            except Exception as e:  # one request's failure ends that request only
                self.stats["failed"] += 1
                _safe_emit(job, Event("error", text=f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self.busy = False

    def _generate(self, job: Job) -> None:
        p, tok = job.params, self.tokenizer
        generated: list[int] = []
        sent = 0  # characters of text already handed to the client
        hold = max((len(s) for s in p.stop), default=1) - 1  # a stop string may still be forming
        finish, cut_at_stop = "length", False
        tokens = self.tokens(job.ids, p)
        try:
            for token in tokens:
                if job.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    return
                if token in self.eos:
                    finish = "stop"
                    break
                generated.append(token)
                text = tok.decode(generated, skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
                if cut >= 0:
                    _safe_emit(job, Event("text", text=text[sent:cut]))
                    sent, finish, cut_at_stop = cut, "stop", True
                    break
                safe = len(text) - hold
                while safe > sent and text[safe - 1] == "\ufffd":  # an unfinished multi-byte character
                    safe -= 1
                if safe > sent:
                    _safe_emit(job, Event("text", text=text[sent:safe]))
                    sent = safe
                if len(generated) >= p.max_new_tokens:
                    break
        finally:
            tokens.close()
        if not cut_at_stop:  # hand over what was held back for a stop string that never came
            rest = tok.decode(generated, skip_special_tokens=True)[sent:]
            if rest:
                _safe_emit(job, Event("text", text=rest))
        self.stats["completed"] += 1
        _safe_emit(job, Event("done", finish=finish,
                              usage={"prompt_tokens": len(job.ids), "completion_tokens": len(generated),
                                     "total_tokens": len(job.ids) + len(generated)}))


def _safe_emit(job: Job, event: Event) -> None:
    try:
        job.emit(event)
    except RuntimeError:  # the client's event loop is gone (server shutting down)
        job.cancelled.set()
