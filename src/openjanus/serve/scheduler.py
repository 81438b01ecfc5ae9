"""The model worker: one thread owns the pipeline, batches queued requests and streams results back.

Requests become jobs in a bounded wait queue. The worker takes the oldest job, adds every
waiting job that can share its forward passes (same task and sampling settings, up to the
batch limit), runs the batch, and sends each job's events to its coroutine through a
`Channel` (`loop.call_soon_threadsafe`). Between decoding steps it drops jobs whose client
went away or whose deadline passed, and stops the batch once no job in it is left.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ServeError, bad_request, internal_error, shutting_down, timeout_error
from .metrics import Metrics
from .settings import ServeSettings

log = logging.getLogger("openjanus.serve")


class QueueFull(Exception):
    """The wait queue is at its limit."""


class Channel:
    """Events from the worker thread to one request's coroutine: thread-safe put, async get."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, event: tuple[str, Any]) -> None:
        """Queue an event from any thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def get(self, timeout: float | None) -> tuple[str, Any]:
        """The next event; raises TimeoutError after `timeout` seconds."""
        return await asyncio.wait_for(self._queue.get(), timeout)


@dataclass(frozen=True)
class ChatResult:
    """How one answer ended."""

    completion_tokens: int
    finish_reason: str  # "stop" (end of answer or stop string) or "length"


@dataclass(eq=False, kw_only=True)
class Job:
    """One request's work; events go to `channel`, `cancelled` is set from the event loop."""

    channel: Channel
    deadline: float  # time.monotonic() after which the job is cancelled
    timeout: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False

    rows = 1

    def batch_key(self) -> tuple:
        raise NotImplementedError

    def emit(self, kind: str, value: Any = None) -> None:
        self.channel.put((kind, value))

    def finish(self, kind: str, value: Any = None) -> None:
        """Send the final event (once)."""
        if not self.finished:
            self.finished = True
            self.emit(kind, value)

    def fail(self, error: ServeError) -> None:
        self.finish("error", error)

    def _sampling_key(self, temperature: float, *knobs: Any) -> tuple:
        if temperature == 0:
            return ("greedy",)
        if getattr(self, "seed", None) is not None:
            return ("seeded", id(self))  # a seeded sample runs alone so that it reproduces
        return (temperature, *knobs)


@dataclass(eq=False, kw_only=True)
class ChatJob(Job):
    """One chat completion: a pipeline conversation (images already decoded) and its sampling settings."""

    conversation: list[dict[str, Any]]
    prompt_tokens: int
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def batch_key(self) -> tuple:
        # Rows with stop strings hold back text until the batch ends, so they also share max_tokens.
        return ("chat", self._sampling_key(self.temperature, self.top_p, self.top_k), self.stop,
                self.max_tokens if self.stop else None)


@dataclass(eq=False, kw_only=True)
class ImageJob(Job):
    """`n` images for one prompt."""

    prompt: str
    n: int = 1
    guidance_scale: float = 5.0
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    @property
    def rows(self) -> int:
        return self.n

    def batch_key(self) -> tuple:
        return ("image", self.guidance_scale, self._sampling_key(self.temperature, self.top_p, self.top_k))


class _Abort(Exception):
    """Raised from the image step hook when no job of the batch is left."""


class Scheduler:
    """The single worker thread that runs every model call, with its bounded wait queue."""

    def __init__(self, pipe, settings: ServeSettings, metrics: Metrics):
        self.pipe = pipe
        self.settings = settings
        self.metrics = metrics
        self.running_rows = 0
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._image_hook = "on_step" in inspect.signature(pipe.generate_image_tokens).parameters

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="openjanus-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Fail waiting jobs, stop the running batch at its next step and join the worker."""
        with self._cond:
            self._stopping = True
            drained = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for job in drained:
            job.fail(shutting_down())
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        """Jobs waiting for the model."""
        return len(self._waiting)

    # ------------------------------------------------------------------ event-loop side

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull when the queue is at its limit."""
        if self._thread is None:
            self.start()  # an app run without its lifespan (a bare ASGI test client) still works
        with self._cond:
            if self._stopping:
                raise shutting_down()
            if len(self._waiting) >= self.settings.max_queue:
                raise QueueFull
            self._waiting.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job, reason: str) -> None:
        """Stop a job's work (client gone, time limit): it leaves the queue or its batch at the next step."""
        if job.finished or job.cancelled.is_set():
            return
        job.cancelled.set()
        self.metrics.cancelled(reason)
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass

    # ------------------------------------------------------------------ worker side

    def _run(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            if not jobs:
                continue
            kind = "chat" if isinstance(jobs[0], ChatJob) else "image"
            self.running_rows = sum(job.rows for job in jobs)
            self.metrics.batch(kind, self.running_rows)
            try:
                if kind == "chat":
                    self._run_chat(jobs)
                else:
                    self._run_images(jobs)
            except Exception:  # never let one batch kill the worker
                log.exception("model batch failed")
                for job in jobs:
                    job.fail(internal_error())
            finally:
                self.running_rows = 0

    def _next_batch(self) -> list[Job] | None:
        """The next batch (possibly empty when its jobs went stale), or None once stopping."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                self._drop_stale()
                if self._waiting:
                    break
                self._cond.wait()
            head = self._waiting.popleft()
            if not self._waiting and self.settings.batch_wait:
                self._cond.wait(self.settings.batch_wait)  # requests sent together arrive a moment apart
            key = head.batch_key()
            limit = self.settings.max_batch_size if isinstance(head, ChatJob) else self.settings.max_image_rows
            batch, rows = [head], head.rows
            for job in list(self._waiting):
                if rows + job.rows > limit:
                    continue
                if job.batch_key() == key and not job.cancelled.is_set():
                    self._waiting.remove(job)
                    batch.append(job)
                    rows += job.rows
        return [job for job in batch if self._still_wanted(job)]

    def _drop_stale(self) -> None:
        for job in list(self._waiting):
            if not self._still_wanted(job):
                self._waiting.remove(job)

    def _still_wanted(self, job: Job) -> bool:
        """False (and the job closed) when it was cancelled, timed out or the server is stopping."""
        if job.finished:
            return False
        if job.cancelled.is_set():
            job.finished = True
            return False
        if time.monotonic() > job.deadline:
            self.metrics.cancelled("timeout")
            job.fail(timeout_error(job.timeout))
            return False
        if self._stopping:
            job.fail(shutting_down())
            return False
        return True

    def _sweep(self, jobs: Sequence[Job]) -> bool:
        """Close jobs that are no longer wanted; True while any job is left."""
        return sum(self._still_wanted(job) for job in jobs) > 0

    def _retry_or_fail(self, jobs: Sequence[Job], exc: Exception, started: bool, run) -> None:
        """After a batch error: rerun each job alone when nothing was sent yet, else fail the open ones."""
        if len(jobs) > 1 and not started:
            for job in jobs:
                if self._still_wanted(job):
                    run([job])
            return
        if isinstance(exc, ValueError):
            error = bad_request(str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid request")
        else:
            log.error("model call failed", exc_info=exc)
            error = internal_error()
        for job in jobs:
            job.fail(error)

    # ------------------------------------------------------------------ chat

    def _run_chat(self, jobs: Sequence[ChatJob]) -> None:
        rows = [_AnswerRow(job) for job in jobs]
        try:
            self._decode(rows)
        except Exception as exc:
            self._retry_or_fail(jobs, exc, any(row.started for row in rows), self._run_chat)
        for row in rows:
            self.metrics.add_tokens(row.tokens)

    def _decode(self, rows: list[_AnswerRow]) -> None:
        jobs = [row.job for row in rows]
        first = jobs[0]
        budget = max(job.max_tokens for job in jobs)
        # stream_answers yields one list per decoding step (at most `steps`), then maybe one tail list.
        steps = min(budget, self.pipe.config.llm.context_length - max(job.prompt_tokens for job in jobs))
        stream = self.pipe.stream_answers([job.conversation for job in jobs], max_new_tokens=budget,
                                          temperature=first.temperature, top_p=first.top_p, top_k=first.top_k,
                                          seed=first.seed, stop=list(first.stop) or None)
        try:
            for index, pieces in enumerate(stream):
                for row, piece in zip(rows, pieces):
                    row.push(index, piece, steps)
                if not self._sweep(jobs):
                    break
        finally:
            stream.close()
        for row in rows:
            row.close(steps)

    # ------------------------------------------------------------------ images

    def _run_images(self, jobs: Sequence[ImageJob]) -> None:
        try:
            self._generate(jobs)
        except _Abort:
            pass
        except Exception as exc:
            self._retry_or_fail(jobs, exc, False, self._run_images)  # finished jobs are not rerun

    def _generate(self, jobs: Sequence[ImageJob]) -> None:
        first = jobs[0]
        kwargs: dict[str, Any] = {}
        if self._image_hook:
            def on_step(*_):
                if not self._sweep(jobs):
                    raise _Abort
            kwargs["on_step"] = on_step
        codes = self.pipe.generate_image_tokens([job.prompt for job in jobs for _ in range(job.n)],
                                                num_images_per_prompt=1, guidance_scale=first.guidance_scale,
                                                temperature=first.temperature, top_k=first.top_k, top_p=first.top_p,
                                                seed=first.seed, progress=False, **kwargs)
        start = 0
        for job in jobs:
            part, start = codes[start:start + job.n], start + job.n
            if self._still_wanted(job):
                images = self.pipe.decode_images(part)
                self.metrics.add_images(len(images))
                job.finish("images", images)


class _AnswerRow:
    """One conversation's place in a decoding batch: forwards its text and counts its tokens."""

    def __init__(self, job: ChatJob):
        self.job = job
        self.tokens = 0  # decoding steps up to this row's last piece of text
        self.started = False

    def push(self, index: int, piece: str, steps: int) -> None:
        if self.job.finished:
            return
        if piece:
            self.started = True
            self.job.emit("delta", piece)
            if index < steps:
                self.tokens = index + 1
        if index + 1 == self.job.max_tokens < steps:
            self.close(steps)  # this row's budget is spent; the batch goes on for the others

    def close(self, steps: int) -> None:
        if self.job.finished:
            return
        limit = min(self.job.max_tokens, steps)
        self.job.finish("done", ChatResult(self.tokens, "length" if self.tokens >= limit else "stop"))
