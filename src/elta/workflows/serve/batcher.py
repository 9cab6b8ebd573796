"""Dynamic batching: images of concurrent requests are scored together, in one call of the model.

Requests put their decoded model inputs on an asyncio queue and wait. One collector task takes the first waiting
image, then keeps taking more until it holds ``max_batch`` images or ``max_wait_ms`` have passed since the first,
and hands the batch to a single scoring thread (the model runs off the event loop, one batch at a time). While a
batch is being scored the next one fills up, so under load batches grow by themselves; with one client at a time
an image waits at most ``max_wait_ms``. ``max_batch=1`` switches batching off.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from elta.engine.predictor import Predictions

__all__ = ["Batcher", "ImageResult"]


@dataclass(frozen=True)
class ImageResult:
    """One image's predictions (see :class:`~elta.engine.predictor.Predictions`, row ``0``)."""

    predictions: Predictions  # a single row
    batch_size: int  # how many images were scored in the same forward pass


@dataclass
class _Waiting:
    inputs: object  # an image as the score function takes it
    future: asyncio.Future


class Batcher:
    """Collects model inputs from concurrent callers and scores them in batches with ``score``.

    ``score(images)`` gets a list of images (decoded PIL images, or [3, H, W] model inputs, …) and returns their
    :class:`Predictions` in order (e.g. ``predictor.predict_images``); it runs in one thread. ``on_batch(n, seconds)`` is
    told the size and the scoring time of every batch. Use between :meth:`start` and :meth:`stop`, on one event
    loop.
    """

    def __init__(
        self,
        score: Callable[[list], Predictions],
        max_batch: int = 32,
        max_wait_ms: float = 10.0,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1; got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be ≥ 0; got {max_wait_ms}")
        self.score = score
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Waiting | None] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the collector on the running event loop."""
        if self.running:
            return
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="elta-score")
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        """Score everything already submitted, then stop (callers waiting get their results)."""
        if not self.running:
            return
        await self._queue.put(None)  # after every waiting image: the queue is first in, first out
        await self._task
        self._executor.shutdown(wait=True)
        self._task = None

    async def submit(self, inputs: Sequence) -> list[ImageResult]:
        """Score images together with whatever else is waiting; results in order."""
        if not self.running:
            raise RuntimeError("the batcher is not running: start() it (the app's lifespan does)")
        loop = asyncio.get_running_loop()
        waiting = [_Waiting(x, loop.create_future()) for x in inputs]
        for item in waiting:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(item.future for item in waiting)))

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                try:
                    item = (
                        self._queue.get_nowait()
                        if remaining <= 0
                        else await asyncio.wait_for(self._queue.get(), remaining)
                    )
                except (asyncio.QueueEmpty, TimeoutError, asyncio.TimeoutError):
                    break
                if item is None:  # stop after this batch
                    stopping = True
                    break
                batch.append(item)
            await self._run(batch)

    async def _run(self, batch: list[_Waiting]) -> None:
        started = time.perf_counter()
        try:
            preds = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.score, [item.inputs for item in batch]
            )
        except Exception as exc:  # a failed batch fails its callers, not the collector
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - started)
        for row, item in enumerate(batch):
            if not item.future.done():  # a caller that went away (cancelled) is skipped
                item.future.set_result(ImageResult(preds.select([row]), len(batch)))
