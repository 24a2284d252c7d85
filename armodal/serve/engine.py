"""Engine: continuous batching over one model, owned by one thread.

Requests wait in a bounded FIFO queue. At each step boundary the engine admits the waiting
requests that fit in the batch (prefilling their prompts, left-padded together, and copying
each one's K/V into the shared batch cache, see slots.BatchCache), then runs one forward for
every running row and gives each row its token under its own request's settings
(choose.choose_tokens). Rows that finish, and requests that are cancelled or time out, leave
at the next boundary.

A row's tokens equal offline `generate()` of its request alone (same prompt, DecodingConfig and
seed): the same processors, RowSampler streams and StopChecker, fed the same logits up to
float rounding across batch shapes.

Events go to each request's `on_event` callback, called on the engine thread; it must return
quickly (the server hands them to its event loop).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from armodal.generation.checks import check_single_stream
from armodal.generation.sampling import RowSampler
from armodal.generation.stopping import StopChecker
from armodal.serve.choose import RowDecoding, choose_tokens
from armodal.serve.requests import (
    EngineClosed,
    EngineStats,
    Event,
    Finished,
    GenerationRequest,
    QueueFull,
    TokenOut,
    check_request,
)
from armodal.serve.slots import BatchCache

# The request and event types are re-exported: callers import everything from here.
__all__ = ["Engine", "Ticket", "GenerationRequest", "TokenOut", "Finished", "QueueFull",
           "EngineClosed"]


# Prompts that arrive at the same step are prefilled together, up to this many (padded)
# tokens per forward: one forward instead of several is what small models gain most from.
PREFILL_TOKENS = 4096


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    on_event: Callable[[Event], None]
    deadline: float | None
    stops: StopChecker
    running: int  # rows still decoding
    stop_reason: str | None = None  # set by cancel / deadline / shutdown, acted on at a step
    ended: bool = False


@dataclass(eq=False)
class _Row:
    job: _Job
    index: int  # which of the job's samples
    decoding: RowDecoding
    done: bool = False


class Ticket:
    """A submitted request: cancel() frees its rows at the next step boundary."""

    def __init__(self, engine: Engine, job: _Job):
        self._engine, self._job = engine, job

    def cancel(self, reason: str = "cancelled") -> None:
        self._engine._stop_job(self._job, reason)


class Engine:
    """Continuous batching: at most `max_batch` rows decode together, at most `max_queue`
    requests wait. Drive it with start() (a background thread) or, in tests, step()."""

    def __init__(self, model: nn.Module, max_batch: int = 32, max_queue: int = 64):
        check_single_stream(model)
        self.model = model.eval()
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(model.parameters()).device
        self.stats = EngineStats()
        self._cache = BatchCache(model, max_batch)
        self._rows: list[_Row] = []
        self._active: list[_Job] = []
        self._waiting: deque[_Job] = deque()
        self._lock = threading.Condition()
        self._stop_lock = threading.Lock()
        self._open = 0  # submitted jobs not yet ended
        self._closing = False
        self._stopped = False
        self._thread: threading.Thread | None = None

    # ---- called from any thread -------------------------------------------------------
    def check(self, request: GenerationRequest) -> None:
        """ValueError, naming the value, if the engine cannot serve `request`."""
        check_request(request, self.model.config.vocab_size, self.max_batch,
                      self._cache.max_len)

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> Ticket:
        """Queue `request`; raises ValueError (bad request), QueueFull or EngineClosed."""
        self.check(request)
        timeout = request.timeout_s
        job = _Job(request, on_event, None if timeout is None else time.monotonic() + timeout,
                   StopChecker(request.config, request.decode),
                   request.config.num_return_sequences)
        with self._lock:
            if self._closing:
                raise EngineClosed("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                # A rough wait: a batch's worth of requests typically clears per few seconds.
                raise QueueFull(len(self._waiting), retry_after_s=1)
            self._waiting.append(job)
            self._open += 1
            self.stats.requests += 1
            self.stats.waiting = len(self._waiting)
            self._lock.notify_all()
        return Ticket(self, job)

    def start(self) -> None:
        """Run the step loop on a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="armodal-engine", daemon=True)
            self._thread.start()

    def stop(self, grace_s: float = 0.0) -> None:
        """Take no new requests; let running and waiting ones finish for up to grace_s
        seconds, then end the rest with Finished("shutdown") and stop the thread.
        Safe to call again, from any thread."""
        with self._stop_lock:
            with self._lock:
                self._closing = True
                if self._thread is not None:  # without the thread nothing would finish them
                    self._lock.wait_for(lambda: self._open == 0, timeout=grace_s)
                self._stopped = True
                self._lock.notify_all()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            else:
                self._shutdown_jobs()

    def _stop_job(self, job: _Job, reason: str) -> None:
        with self._lock:
            if job.stop_reason is None and not job.ended:
                job.stop_reason = reason
            self._lock.notify_all()

    # ---- the engine thread ------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stopped or self._waiting or self._rows)
                if self._stopped:
                    break
            try:
                self.step()
            except Exception as err:  # a failed forward must not take the server down
                self._fail_all(f"{type(err).__name__}: {err}")
        self._shutdown_jobs()

    def step(self) -> bool:
        """One step boundary and one decode step; False when there was nothing to do."""
        now = time.monotonic()
        for job in self._active:
            if job.stop_reason is None and job.deadline is not None and now > job.deadline:
                job.stop_reason = "timeout"
            if job.stop_reason is not None:
                self._end(job, job.stop_reason)
        self._drop_finished()  # before admitting: the freed rows take new requests now
        admitted = self._take_waiting(now)
        if admitted:
            self._admit(admitted)
        if self._rows:
            self._decode()
        self._drop_finished()
        return bool(admitted or self._rows)

    def _take_waiting(self, now: float) -> list[_Job]:
        """End the waiting jobs that were cancelled or timed out; pop those that fit, FIFO
        (a request wanting more rows than are free blocks the ones behind it: none starves)."""
        with self._lock:
            for job in list(self._waiting):
                if job.stop_reason is None and job.deadline is not None and now > job.deadline:
                    job.stop_reason = "timeout"
                if job.stop_reason is not None:
                    self._waiting.remove(job)
                    self._end(job, job.stop_reason)
            admitted, free = [], self.max_batch - len(self._rows)
            while self._waiting and self._waiting[0].running <= free:
                job = self._waiting.popleft()
                free -= job.running
                admitted.append(job)
            self.stats.waiting = len(self._waiting)
        return admitted

    def _admit(self, jobs: list[_Job]) -> None:
        """Prefill the new prompts, a few per forward, then let each job's rows join."""
        self._active += jobs
        chunk: list[_Job] = []
        for job in jobs:
            width = max(len(j.request.prompt) for j in [*chunk, job])
            if chunk and (len(chunk) + 1) * width > PREFILL_TOKENS:
                self._prefill(chunk)
                chunk = []
            chunk.append(job)
        if chunk:
            self._prefill(chunk)

    def _prefill(self, jobs: list[_Job]) -> None:
        """One left-padded forward over the jobs' prompts (pads at position -1, so each row is
        computed as if alone); choose every row's first token; running rows join the batch."""
        prompts = [job.request.prompt for job in jobs]
        width = max(len(p) for p in prompts)
        try:
            idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts],
                               device=self.device)  # (J, T)
            positions = None if all(len(p) == width for p in prompts) else torch.tensor(
                [[-1] * (width - len(p)) + list(range(len(p))) for p in prompts],
                device=self.device)  # (J, T)
            with torch.inference_mode():
                prefill = self.model.new_cache(len(jobs), width)
                logits = self.model(idx, prefill, positions=positions)[:, -1]  # (J, V)
        except Exception as err:
            for job in jobs:
                self._end(job, "error", f"{type(err).__name__}: {err}")
            return
        for j, job in enumerate(jobs):
            request, n = job.request, job.request.config.num_return_sequences
            seed = request.config.seed
            rows = [_Row(job, k, RowDecoding(
                request.config,
                None if request.config.is_greedy else RowSampler([seed], [k], self.device),
                list(request.prompt), len(request.prompt))) for k in range(n)]
            # Counted as running before their first token goes out: a client that has read
            # it and asks /health must see its rows.
            self.stats.running_rows = len(self._rows) + n
            self._record(rows, logits[j:j + 1].expand(n, -1))
            running = [row for row in rows if not row.done and not job.ended]
            if running:
                self._cache.add(prefill, j, len(request.prompt), len(running))
                self._rows += running
            self.stats.running_rows = len(self._rows)

    def _decode(self) -> None:
        rows = self._rows
        tokens = torch.tensor([r.decoding.history[-1] for r in rows], device=self.device)  # (B,)
        positions = torch.tensor([len(r.decoding.history) - 1 for r in rows],
                                 device=self.device)  # (B,)
        with torch.inference_mode():
            logits = self._cache.step(self.model, tokens, positions)  # (B, V)
        self.stats.steps += 1
        self._record(rows, logits)

    def _record(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Choose each row's token from logits (R, V), send it, and mark finished rows."""
        with torch.inference_mode():
            choices = choose_tokens(logits, [r.decoding for r in rows])
        for row, choice in zip(rows, choices):
            job, d = row.job, row.decoding
            if job.ended:
                continue
            if choice is None:
                self._end(job, "error", f"no token is allowed at step {d.step}: bans and the "
                          f"stop ids blocked by min_new_tokens remove the whole vocabulary")
                continue
            step = d.step
            d.history.append(choice.token)
            reason = job.stops.update(row.index, choice.token)
            if reason is None and step == d.config.max_new_tokens - 1:
                reason = "length"
                job.stops.finish(row.index, reason)
            text = job.stops.stream_text(row.index, final=reason is not None) \
                if job.request.decode is not None else ""
            self.stats.tokens += 1
            self._emit(job, TokenOut(row.index, choice.token, choice.logprob, text, reason,
                                     choice.top))
            if reason is not None:
                row.done = True
                job.running -= 1
                if job.running == 0:
                    self._end(job, "done")

    def _drop_finished(self) -> None:
        leaving = [i for i, r in enumerate(self._rows) if r.done or r.job.ended]
        if leaving:
            order = self._cache.remove(leaving)
            self._rows = [self._rows[i] for i in order]
        self._active = [job for job in self._active if not job.ended]
        self.stats.running_rows = len(self._rows)

    def _end(self, job: _Job, reason: str, message: str = "") -> None:
        if job.ended:
            return
        job.ended = True
        n = job.request.config.num_return_sequences
        texts = [job.stops.text(k) for k in range(n)] if job.request.decode is not None else None
        self._emit(job, Finished(reason, message, texts))
        with self._lock:
            self._open -= 1
            self._lock.notify_all()

    def _emit(self, job: _Job, event: Event) -> None:
        try:
            job.on_event(event)
        except Exception:  # a broken consumer cancels its own request, nobody else's
            job.stop_reason = job.stop_reason or "cancelled"

    def _fail_all(self, message: str) -> None:
        for job in list(self._active):
            self._end(job, "error", message)
        self._drop_finished()

    def _shutdown_jobs(self) -> None:
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        for job in [*waiting, *self._active]:
            self._end(job, "shutdown", "the server shut down before the request finished")
        self._drop_finished()
