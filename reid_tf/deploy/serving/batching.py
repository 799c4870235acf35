"""Dynamic batching for reid-serve, as TF Serving does it: concurrent requests share model calls.

A request's images join a bounded queue; one task takes the oldest request and the ones after it
that can share its call (same kind; arrays of the same shape), up to `max_batch_size` images or
until `batch_timeout_ms` has passed since that oldest request could first have run (its arrival,
or the end of the model call it waited behind), runs the model once on a one-thread executor, and
hands each request its rows. Counting the timeout from the end of the previous call matters under
load: the requests answered by one call come back a few milliseconds later, and would otherwise
always miss the next one, so closed-loop clients would settle into two half-full batches.
A request waits for company only when there is concurrency (the last call served several
requests, others queued behind it, or several are queued now): a lone client is never held back
by the timeout, and merging starts with the first request that had to queue. A request whose
caller has given up (its future cancelled, e.g. by a timeout) is dropped before its batch runs,
not computed for nothing.
Over `max_enqueued_batches` x `max_batch_size` queued images, `submit` raises QueueFull (503);
a request larger than that whole capacity could never fit and raises TooLarge (413) instead.
When a merged call fails, its requests are run again one by one, so that only the request at
fault gets the error.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import time

import numpy as np


class QueueFull(Exception):
    """The batching queue is full; try again shortly."""


class TooLarge(Exception):
    """A request with more images than the queue can ever hold (a retry cannot help)."""

    def __init__(self, size, capacity):
        super().__init__(f"{size} images; the batching queue holds at most {capacity} "
                         "(--max_enqueued_batches x --max_batch_size)")


@dataclasses.dataclass
class _Job:
    kind: str  # "encoded" (list of bytes) or "images" (uint8 [N,H,W,3])
    items: object
    future: asyncio.Future
    arrived: float

    @property
    def size(self):
        return len(self.items)

    def key(self):
        return (self.kind, None if self.kind == "encoded" else tuple(self.items.shape[1:]))


class Batcher:
    """Runs `run(kind, items) -> {name: array [N, ...]}` on merged requests.

    `on_batch(size)` is called with each batch's image count (metrics).
    """

    def __init__(self, run, max_batch_size=16, batch_timeout_ms=20.0, max_enqueued_batches=64,
                 on_batch=None):
        self.run = run
        self.max_batch_size = max_batch_size
        self.batch_timeout = batch_timeout_ms / 1000.0
        self.capacity = max_enqueued_batches * max_batch_size
        self.on_batch = on_batch
        self.queue = collections.deque()
        self.queued_images = 0
        self.executor = concurrent.futures.ThreadPoolExecutor(1)  # one model call at a time
        self._wakeup = None
        self._task = None
        self._model_free_since = 0.0  # monotonic time the last model call ended
        self._concurrent = False  # the last call served several requests or had others queued

    def start(self):
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self):
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=False)

    @property
    def depth(self):
        """Images waiting for the model."""
        return self.queued_images

    async def submit(self, kind, items):
        """The model's outputs for `items` (a list of bytes or an array), once its batch ran."""
        if len(items) > self.capacity:
            raise TooLarge(len(items), self.capacity)
        if self.queued_images + len(items) > self.capacity:
            raise QueueFull()
        job = _Job(kind, items, asyncio.get_running_loop().create_future(), time.monotonic())
        self.queue.append(job)
        self.queued_images += job.size
        self._wakeup.set()
        return await job.future

    def _take_batch(self):
        """The oldest live job and the queued jobs that can share its call."""
        while self.queue and self.queue[0].future.done():  # given up before its turn
            self.queued_images -= self.queue.popleft().size
        if not self.queue:
            return []
        first = self.queue.popleft()
        self.queued_images -= first.size
        batch, total, kept = [first], first.size, collections.deque()
        while self.queue:
            job = self.queue.popleft()
            if job.future.done():
                self.queued_images -= job.size
                continue
            if job.key() == first.key() and total + job.size <= self.max_batch_size:
                batch.append(job)
                total += job.size
                self.queued_images -= job.size
            else:
                kept.append(job)
        self.queue.extendleft(reversed(kept))
        return batch

    async def _one_by_one(self, batch):
        """Each request of a failed merged call on its own: its rows or its own error."""
        loop = asyncio.get_running_loop()
        for job in batch:
            if job.future.done():
                continue
            try:
                rows = await loop.run_in_executor(self.executor, self.run, job.kind, job.items)
            except Exception as error:  # noqa: BLE001 - this request's own failure
                if not job.future.done():
                    job.future.set_exception(error)
                continue
            if not job.future.done():
                job.future.set_result(rows)

    def _call_ended(self, batch):
        self._model_free_since = time.monotonic()
        self._concurrent = len(batch) > 1 or bool(self.queue)

    async def _loop(self):
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            oldest = self.queue[0]
            # Under concurrency, wait for company until the batch is full or the time is up.
            while self._concurrent or len(self.queue) > 1:
                waiting = sum(j.size for j in self.queue if j.key() == oldest.key()
                              and not j.future.done())
                ready = max(oldest.arrived, self._model_free_since)
                remaining = ready + self.batch_timeout - time.monotonic()
                if waiting >= self.max_batch_size or remaining <= 0 or oldest.future.done():
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch()
            if not batch:
                continue
            if batch[0].kind == "encoded":
                items = [data for job in batch for data in job.items]
            else:
                items = np.concatenate([job.items for job in batch])
            if self.on_batch is not None:
                self.on_batch(len(items))
            try:
                outputs = await loop.run_in_executor(self.executor, self.run, batch[0].kind, items)
            except Exception as error:  # noqa: BLE001
                if len(batch) == 1:
                    self._call_ended(batch)
                    if not batch[0].future.done():
                        batch[0].future.set_exception(error)
                    continue
                await self._one_by_one(batch)  # only the request at fault fails
                self._call_ended(batch)
                continue
            self._call_ended(batch)
            start = 0
            for job in batch:
                rows = {name: value[start:start + job.size] for name, value in outputs.items()}
                start += job.size
                if not job.future.done():
                    job.future.set_result(rows)
