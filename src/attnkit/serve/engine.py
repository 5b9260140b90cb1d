"""Continuous batching behind a bounded queue.

One worker thread owns the model. Requests wait in a queue (`max_queue` places; beyond it the app
answers 429 with Retry-After). At every step boundary the worker admits waiting requests while the
batch has room (`max_batch` rows) and the KV budget allows (`max_kv_bytes`: every row counted at the
batch's longest prompt + token budget, since a left-padded batch holds that many positions per row).
Admitted prompts are prefilled together, their caches joined to the running batch's (core/batching.py),
and from then on every running request advances one token per batched forward. Each row keeps its own
positions, sampling parameters and seed, stop strings, token budget and cancel flag; a finished or
cancelled row leaves the batch at once, and an error in one row's handling ends that row only (an
error in the batched forward itself ends the rows of that forward).

The model runs with the engine's technique (None: the model as it is; a `HeadKVConfig`, a
`BucketsConfig`, ...: any technique of `core.generate`), prepared while the batch is non-empty, so
the model is restored between bursts. Text is detokenised incrementally (`TextStream`). No lock is
ever held while the app yields to a client.
"""

from __future__ import annotations

import queue
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

import torch

from attnkit.core import batching
from attnkit.core.decode import eos_ids, sample_token
from attnkit.core.family import architecture
from attnkit.core.generate import PLAIN, first_stop, prefill, step_logits


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


class TextStream:
    """Incremental detokenisation: each token's new text from decoding a short tail of the ids (the
    ids since the last emitted character boundary), not the whole answer, so a long answer costs linear
    time. Text ending in an unfinished multi-byte character waits for the next token."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def rest(self) -> str:
        """Whatever is still held back (an unfinished character at the end)."""
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class Row:
    """One request in the running batch."""

    def __init__(self, job: Job, tokenizer, device):
        self.job, self.p = job, job.params
        self.gen = torch.Generator(device=device).manual_seed(self.p.seed) if self.p.seed is not None else None
        self.count = 0  # tokens generated
        self.stream = TextStream(tokenizer)
        self.text, self.sent = "", 0  # text so far; characters of it handed to the client
        self.hold = max((len(x) for x in self.p.stop), default=1) - 1  # a stop string may still be forming
        self.position = len(job.ids) - 1  # position id of the last token fed
        self.last = None  # the token to feed next
        self.cut = False  # the text was cut at a stop string


def available_memory(device) -> int:
    """Free memory where the KV cache lives: the GPU's free memory, else the machine's MemAvailable."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


class Engine:
    """Owns the model: one worker thread, a bounded queue, a continuously batched set of rows."""

    def __init__(self, model, tokenizer, technique=None, max_positions: int | None = None, max_queue: int = 256,
                 max_batch: int = 32, max_kv_bytes: int | None = None):
        self.model, self.tokenizer, self.max_positions = model, tokenizer, max_positions
        self.technique = technique if technique is not None else PLAIN
        self.eos = eos_ids(model, tokenizer)
        self.max_batch = max(1, max_batch)
        self.device = next(model.parameters()).device
        self.max_kv_bytes = max_kv_bytes if max_kv_bytes is not None else available_memory(self.device) // 2
        self._arch = architecture(model.config)
        if getattr(self.technique, "memory", 0):
            # a memory target plans each prompt at its own length, but running requests share their caches'
            # layout when they join one batch: the server keeps the plan that meets the target at its longest
            # context (a shorter prompt keeps the same heads and budgets, a larger share of its own length)
            self.technique = self.technique.resolve(self._arch, max_positions or 4096)
        self._value_bytes = next(model.parameters()).element_size()
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "steps": 0, "peak_batch": 0}
        self.rows: list[Row] = []
        self._waiting: list[Job] = []
        self._closing = False
        self._session = None
        self._prepared = ExitStack()
        self._cache = None
        self._mask = None  # [model rows, positions] the batch's 2D attention mask
        self._worker = threading.Thread(target=self._run, name="attnkit-generate", daemon=True)
        self._worker.start()

    # --- the app's side ------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.rows)

    @property
    def queued(self) -> int:
        """Requests not yet in the batch (in the queue, or taken from it and waiting for room)."""
        return self.jobs.qsize() + len(self._waiting)

    def describe(self) -> dict:
        batching_note = {"max_batch": self.max_batch, "max_kv_bytes": self.max_kv_bytes,
                         "batching": "continuous" if self.max_batch > 1 else "one request at a time"}
        return {**self.technique.describe(), **batching_note}

    def submit(self, job: Job) -> None:
        """Raises queue.Full when every place is taken."""
        self.jobs.put_nowait(job)

    def close(self, wait: float | None = None) -> None:
        """Stop taking jobs; the worker ends once the running batch is done (`wait`: seconds to wait for it)."""
        try:
            self.jobs.put_nowait(None)
        except queue.Full:
            self._closing = True
        if wait is not None:
            self._worker.join(wait)

    def kv_bytes_for(self, tokens: int) -> int:
        """Bytes of KV cache one request of `tokens` positions holds with this technique (a technique
        that runs several model rows per request, as Attention Buckets do, holds that many caches)."""
        from attnkit.kvcache.config import native_kv_bytes

        rows = getattr(self.technique, "rows_per_request", 1)
        own = getattr(self.technique, "kv_bytes", None)
        if own is not None:
            return own(self._arch, tokens, rows, self._value_bytes)
        return native_kv_bytes(self._arch, tokens, rows, self._value_bytes)

    # --- the worker -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if not self.rows and not self._waiting:
                job = self.jobs.get()
                if job is None:
                    return
                self._waiting.append(job)
            self._drain()
            if self._closing and not self.rows and not self._waiting:
                return
            try:
                self._admit()
                if self.rows:
                    self.step()
            except Exception as e:  # the batched forward failed: it ends the rows it carried
                for row in self.rows:
                    self._fail(row, e)
                self.rows = []
            if not self.rows:
                self._release()

    def _drain(self) -> None:
        """Take jobs from the queue while the batch could take them (the rest keep their queue places,
        so a full queue still means 429)."""
        while len(self._waiting) < self.max_batch - len(self.rows):
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is None:
                self._closing = True
            else:
                self._waiting.append(job)

    def _reserve(self, rows: list[list[int]], budgets: list[int]) -> int:
        longest = max(len(ids) + b for ids, b in zip(rows, budgets))
        return len(rows) * self.kv_bytes_for(longest)

    def _admit(self) -> None:
        """Prefill waiting requests that fit, and join them to the running batch."""
        if not self._waiting:
            return
        shapes = [(r.job.ids, r.p.max_new_tokens - r.count) for r in self.rows]
        taken, left = [], []
        for job in self._waiting:
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                continue
            trial = shapes + [(job.ids, job.params.max_new_tokens)]
            room = len(trial) <= self.max_batch
            fits = self._reserve([s[0] for s in trial], [s[1] for s in trial]) <= self.max_kv_bytes
            if room and (fits or not shapes):  # a request alone is admitted even above the budget
                taken.append(job)
                shapes = trial
            else:
                left.append(job)
        self._waiting = left
        if taken:
            self._prefill(taken)

    def _prepare(self):
        if self._session is None:
            self._session = self._prepared.enter_context(self.technique.prepare(self.model))
        return self._session

    def _release(self) -> None:
        self._prepared.close()
        self._prepared, self._session, self._cache, self._mask = ExitStack(), None, None, None

    @torch.no_grad()
    def _prefill(self, jobs: list[Job]) -> None:
        new_rows = [Row(j, self.tokenizer, self.device) for j in jobs]
        joining = False
        try:
            session = self._prepare()
            n = max(len(j.ids) for j in jobs)
            ids = torch.zeros(len(jobs), n, dtype=torch.long)
            mask = torch.zeros(len(jobs), n, dtype=torch.long)
            for i, j in enumerate(jobs):
                ids[i, n - len(j.ids):] = torch.tensor(j.ids)
                mask[i, n - len(j.ids):] = 1
            ids, mask = session.expand(ids).to(self.device), session.expand(mask).to(self.device)
            cache = session.new_cache()
            out = prefill(self.model, ids, mask, cache, session.prefill_chunk)
            scores, _ = session.scores(out.logits[:, -1])
            if self._cache is None:
                self._cache, self._mask = cache, mask
            else:
                width = max(self._mask.shape[1], mask.shape[1])
                pad = lambda m: torch.cat([m.new_zeros(m.shape[0], width - m.shape[1]), m], 1)  # noqa: E731
                joining = True
                self._cache = batching.join(self._cache, cache)
                self._mask = torch.cat([pad(self._mask), pad(mask)])
        except Exception as e:  # these prompts fail; the running batch goes on, unless the join broke it
            for row in new_rows:
                self._fail(row, e)
            if joining:
                raise
            return
        self.rows += new_rows
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(self.rows))
        self._advance(new_rows, scores)

    @torch.no_grad()
    def step(self) -> None:
        """One batched forward: every running row's last token in, its next token out."""
        self._drop([r for r in self.rows if r.job.cancelled.is_set()], "cancelled")
        if not self.rows:
            return
        session = self._session
        tokens = torch.tensor([r.last for r in self.rows], device=self.device)
        positions = torch.tensor([r.position + 1 for r in self.rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], 1)
        logits = step_logits(self.model, session, self._cache, tokens, self._mask, session.expand(positions))
        for r in self.rows:
            r.position += 1
        self.stats["steps"] += 1
        scores, _ = session.scores(logits)
        self._advance(list(self.rows), scores)

    def choose(self, row: Row, scores: torch.Tensor) -> int:
        """The next token of one row from its scores [vocab], with the row's own sampling settings."""
        return int(sample_token(scores[None], row.p.temperature, row.p.top_p, row.gen)[0])

    def _advance(self, rows: list[Row], scores: torch.Tensor) -> None:
        """Give each of `rows` its next token from its row of `scores` [len(rows), vocab]; rows that
        finish, fail or are cancelled leave the batch."""
        finished, failed = [], []
        for i, row in enumerate(rows):
            try:
                if row.job.cancelled.is_set():
                    finished.append((row, "cancelled"))
                    continue
                token = self.choose(row, scores[i])
                done = self._take(row, token)
                if done:
                    finished.append((row, done))
            except Exception as e:  # this row's failure ends this row only
                failed.append((row, e))
        for row, e in failed:
            self._fail(row, e)
        self._drop([r for r, _ in failed], None)
        for row, how in finished:
            if how == "cancelled":
                self.stats["cancelled"] += 1
            else:
                self._finish(row, how)
        self._drop([r for r, _ in finished], None)

    def _take(self, row: Row, token: int) -> str | None:
        """Handle one generated token; returns "stop"/"length" when the row is done, else None."""
        if token in self.eos:
            return "stop"
        row.count += 1
        row.last = token
        before = len(row.text)
        row.text += row.stream.push(token)
        if row.p.stop:
            cut = first_stop(row.text, row.p.stop, max(0, before - row.hold))
            if cut >= 0:
                row.text = row.text[:cut]
                self._send(row, len(row.text))
                row.cut = True
                return "stop"
        self._send(row, len(row.text) - row.hold)
        if row.count >= row.p.max_new_tokens:
            return "length"
        if self.max_positions and row.position + 2 > self.max_positions:
            return "length"
        return None

    def _send(self, row: Row, upto: int) -> None:
        if upto > row.sent:
            _safe_emit(row.job, Event("text", text=row.text[row.sent:upto]))
            row.sent = upto

    def _finish(self, row: Row, finish: str) -> None:
        if not row.cut:  # hand over what was held back for a stop string that never came
            row.text += row.stream.rest()
            self._send(row, len(row.text))
        self.stats["completed"] += 1
        n = len(row.job.ids)
        _safe_emit(row.job, Event("done", finish=finish, usage={"prompt_tokens": n, "completion_tokens": row.count,
                                                                "total_tokens": n + row.count}))

    def _fail(self, row: Row, e: Exception) -> None:
        self.stats["failed"] += 1
        _safe_emit(row.job, Event("error", text=f"generation failed: {type(e).__name__}: {e}"))

    def _drop(self, gone: list[Row], reason: str | None) -> None:
        """Take rows out of the batch (and their cache rows), then the padding no row needs any more."""
        if not gone:
            return
        if reason == "cancelled":
            self.stats["cancelled"] += len(gone)
        ids = {id(r) for r in gone}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in ids]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self._cache, self._mask = None, None
            return
        n = self._session.rows
        model_rows = torch.tensor([i * n + b for i in keep for b in range(n)], device=self.device)
        batching.select_rows(self._cache, model_rows)
        self._mask = self._mask[model_rows]
        pad = int((self._mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns empty in every row
        if pad:
            batching.trim_left(self._cache, pad)
            self._mask = self._mask[:, pad:]


def _safe_emit(job: Job, event: Event) -> None:
    try:
        job.emit(event)
    except RuntimeError:  # the client's event loop is gone (server shutting down)
        job.cancelled.set()
