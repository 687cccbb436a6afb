"""One generation thread for one model: requests queue, the event loop stays free.

MLX runs one model's computations safely from one thread at a time, so every request becomes a
``Job`` on a FIFO queue served by a single worker thread; tokenization happens there too (a Hugging
Face fast tokenizer shared between threads can fail with "Already borrowed"). The web server's
event loop only parses requests and forwards events: ``/health`` answers while a generation runs.

A job's events reach its request handler through an ``asyncio.Queue`` fed with
``call_soon_threadsafe``. ``Job.cancel()`` (a client that went away) is checked by the worker
between tokens; a job cancelled while still queued is skipped. Errors become events: a
``MlxeffError`` (a bad request) is reported as a 400, anything else as a 500, and the worker
carries on with the next job.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from ..errors import MlxeffError

log = logging.getLogger("mlxeff.server")


@dataclass
class Failure:
    status: int
    message: str


@dataclass
class Job:
    """``work()`` runs on the worker thread and yields events; they arrive in ``events``."""

    work: Callable[["Job"], Iterator]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    started: Optional[float] = None
    next_check: float = 0.0  # when the request handler next asks whether the client is still there
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server shutting down)
            self.cancel()


DONE = object()  # the last event of every job


class Worker:
    """The generation thread. ``submit`` queues a job; ``stop`` finishes the running one and ends."""

    def __init__(self):
        self._jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mlxeff-generation", daemon=True)
        self.running: Optional[Job] = None
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self._stopping = False
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> Job:
        self._jobs.put(job)
        return job

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the running job and every queued one, then end the thread (idempotent)."""
        self._stopping = True
        running = self.running
        if running is not None:
            running.cancel()
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._stopping:
                job.cancel()
            if job.cancelled:
                self.cancelled += 1
                job.emit(DONE)
                continue
            self.running, job.started = job, time.perf_counter()
            try:
                for event in job.work(job):
                    job.emit(event)
                self.completed += 1
            except MlxeffError as e:
                self.failed += 1
                job.emit(Failure(400, str(e)))
            except Exception as e:  # keep serving: report the failure to this client only
                self.failed += 1
                log.exception("generation failed")
                job.emit(Failure(500, f"generation failed ({e.__class__.__name__}: {e})"))
            finally:
                if job.cancelled:
                    self.cancelled += 1
                self.running = None
                job.emit(DONE)
