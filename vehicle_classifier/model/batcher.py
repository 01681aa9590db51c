"""Requests that arrive together share one forward: a batch of every image waiting, up to a cap,
with as many batches at once as the runtime has streams."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future


class Batcher:
    """`batcher(items) -> results`, one result per item, from many threads at once: the items
    of calls that wait together go through one `run(all_items)` (up to `max_items`, and at
    least one call's worth), with up to `concurrency` batches running at once. A waiting
    caller runs each batch; no thread of its own."""

    def __init__(self, run: Callable[[list], list], max_items: int, concurrency: int = 1):
        self.run, self.max_items, self.concurrency = run, max_items, concurrency
        self._waiting: list[tuple[list, Future]] = []
        self._running = 0
        self._changed = threading.Condition()

    def __call__(self, items: list) -> list:
        mine: Future = Future()
        with self._changed:
            self._waiting.append((items, mine))
        while True:
            with self._changed:
                # Wait while the slots are full, or while this caller's items are in a batch
                # that another caller runs (nothing waits).
                while (self._running >= self.concurrency or not self._waiting) and not mine.done():
                    self._changed.wait()
                if mine.done():
                    return mine.result()
                self._running += 1
                batch, count = [], 0
                while self._waiting and (not batch or count + len(self._waiting[0][0]) <= self.max_items):
                    batch.append(self._waiting.pop(0))
                    count += len(batch[-1][0])
            try:
                results = self.run([item for items_, _ in batch for item in items_])
                start = 0
                for items_, future in batch:
                    future.set_result(results[start:start + len(items_)])
                    start += len(items_)
            except BaseException as exc:  # every caller in the batch answers for it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            finally:
                with self._changed:
                    self._running -= 1
                    self._changed.notify_all()
