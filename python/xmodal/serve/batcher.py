"""Micro-batching: concurrent searches against one collection answered by one index search.

A search over N rows costs about one pass over the rows whether it carries 1 query or 64 (the GEMM reads the
database once), so under load the service gathers the queries that arrive while the previous search runs --
and, while requests keep arriving less than ``max_wait`` apart, those too (for at most ``max_gather``) -- and
searches them at once. A lone request is searched at once: batching adds no latency when there is nothing to
batch with.

The queue is bounded (``max_queue`` queries); past it a request is refused with :class:`Overloaded` (the
service answers 503 with Retry-After) instead of growing an unbounded backlog. Searches with an allow-list or
payload filter have a mask of their own and run alone, in the same order.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Optional

import numpy as np


class Overloaded(RuntimeError):
    """The search queue is full."""


class Closed(RuntimeError):
    """The batcher was closed (its collection deleted, or the service stopping) before the search ran."""


@dataclass
class _Request:
    queries: np.ndarray
    k: int
    masked: bool
    run_alone: Optional[Callable] = None  # a masked search, run as is
    future: asyncio.Future = field(default=None)


class MicroBatcher:
    """Runs ``search(queries [Q, D] float32, k) -> (scores [Q, k], ids [Q, k])`` for one collection, one call at
    a time on its own thread, batching unmasked requests.

    ``max_batch``: most queries in one call (1 turns batching off); ``max_wait``: the longest gap between
    arrivals that still counts as requests arriving together; ``max_gather``: the longest a batch gathers;
    ``on_batch(queries)``: called with each call's query count (metrics)."""

    def __init__(self, search: Callable, *, max_batch: int = 256, max_wait: float = 0.002,
                 max_gather: float = 0.02, max_queue: int = 4096, on_batch: Optional[Callable[[int], None]] = None):
        self.search = search
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_gather = max_gather
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: Deque[_Request] = collections.deque()
        self._queued_rows = 0
        self._wakeup: Optional[asyncio.Event] = None
        self._worker: Optional[asyncio.Task] = None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")
        self._last_batch = 0
        self._closed = False
        self._running: list = []  # the batch being searched

    async def submit(self, queries: np.ndarray, k: int, run_alone: Optional[Callable] = None):
        """Queue a search; ``run_alone`` (a no-argument callable) replaces the batched search for a masked one."""
        if self._closed:
            raise Closed("the search was cancelled: its collection is closing")
        n = queries.shape[0]
        if self._queued_rows + n > self.max_queue and self._queued_rows:
            raise Overloaded(f"search queue full ({self._queued_rows} queries waiting)")
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._run())
        request = _Request(queries, k, run_alone is not None, run_alone, loop.create_future())
        self._queue.append(request)
        self._queued_rows += n
        self._wakeup.set()
        return await request.future

    def _take(self) -> _Request:
        request = self._queue.popleft()
        self._queued_rows -= request.queries.shape[0]
        return request

    async def _gather(self) -> list:
        """The next call's requests: a masked request alone, else unmasked ones up to ``max_batch`` queries.
        While requests keep arriving less than ``max_wait`` apart (a burst: e.g. the clients the last batch just
        answered, sending their next queries) the batch keeps gathering, for at most ``max_gather`` seconds."""
        first = self._take()
        if first.masked or self.max_batch <= 1:
            return [first]
        batch, rows = [first], first.queries.shape[0]
        busy = self._last_batch > 1 or bool(self._queue)
        stop_at = time.monotonic() + self.max_gather
        while rows < self.max_batch:
            if self._queue and not self._queue[0].masked:
                request = self._take()
                batch.append(request)
                rows += request.queries.shape[0]
                continue
            remaining = min(self.max_wait, stop_at - time.monotonic())
            if self._queue or not busy or remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        try:
            await self._serve()
        finally:  # cancelled by close(): nobody waits forever for an answer that will not come
            for request in [*self._running, *self._queue]:
                if not request.future.done():
                    request.future.set_exception(Closed("the search was cancelled: its collection is closing"))
            self._queue.clear()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = await self._gather()
            self._last_batch = len(batch)
            self._running = batch
            try:
                if batch[0].masked:
                    results = [await loop.run_in_executor(self._thread, batch[0].run_alone)]
                else:
                    results = await loop.run_in_executor(self._thread, self._search_batch, batch)
            except Exception as e:  # the callers get the error; the worker goes on
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(e)
                continue
            for request, result in zip(batch, results):
                if not request.future.done():  # (a caller that went away cancelled its future)
                    request.future.set_result(result)
            self._running = []

    def _search_batch(self, batch: list) -> list:
        queries = batch[0].queries if len(batch) == 1 else np.concatenate([r.queries for r in batch])
        k = max(r.k for r in batch)
        if self.on_batch is not None:
            self.on_batch(queries.shape[0])
        scores, ids = self.search(queries, k)
        results, at = [], 0
        for r in batch:
            n = r.queries.shape[0]
            results.append((scores[at: at + n, : r.k], ids[at: at + n, : r.k]))
            at += n
        return results

    def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)
