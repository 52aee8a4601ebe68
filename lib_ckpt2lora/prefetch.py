"""Overlap reading with computing: a background thread reads the next tensors.

The queue is bounded, so at most ``depth`` items wait in memory. Closing the iterator
(an error, Ctrl-C, a cancel) stops the reader promptly.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetched(items: Iterable[T], load: Callable[[T], R], depth: int = 2) -> Iterator[tuple[T, R]]:
    """Yield (item, load(item)) in order, loading ahead in a daemon thread."""
    slots: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                slots.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for item in items:
                if stop.is_set() or not put((item, load(item))):
                    return
            put(_DONE)
        except BaseException as error:  # handed to the consumer, raised there
            put(_Failure(error))

    thread = threading.Thread(target=reader, name="ckpt2lora-reader", daemon=True)
    thread.start()
    try:
        while True:
            value = slots.get()
            if value is _DONE:
                return
            if isinstance(value, _Failure):
                raise value.error
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)
