"""Overlap reading with computing: a background thread reads the next tensors.

At most ``depth`` items are alive at once, counting the one being computed: the
reader takes a permit before it reads an item and the consumer returns it when it
moves on, so memory stays bounded by ``depth`` items whatever the model's size.
Closing the iterator (an error, Ctrl-C, a cancel) stops the reader promptly.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
_DONE = object()
_POLL_SECONDS = 0.1


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetched(items: Iterable[T], load: Callable[[T], R], depth: int = 2) -> Iterator[tuple[T, R]]:
    """Yield (item, load(item)) in order, loading ahead in a daemon thread."""
    permits = threading.Semaphore(max(1, depth))
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()

    def reader() -> None:
        try:
            for item in items:
                while not permits.acquire(timeout=_POLL_SECONDS):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                ready.put((item, load(item)))
            ready.put(_DONE)
        except BaseException as error:  # handed to the consumer, raised there
            ready.put(_Failure(error))

    thread = threading.Thread(target=reader, name="ckpt2lora-reader", daemon=True)
    thread.start()
    try:
        while True:
            value = ready.get()
            if value is _DONE:
                return
            if isinstance(value, _Failure):
                raise value.error
            yield value
            del value
            permits.release()
    finally:
        stop.set()
        thread.join(timeout=5)
