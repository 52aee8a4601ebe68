"""Overlap reading with computing: a background thread reads the next tensors.

At most ``depth`` items are alive at once, counting the one being computed: the
reader takes a permit before it reads an item and the consumer returns it when it
moves on, so memory stays bounded by ``depth`` items whatever the model's size.
Closing the iterator (an error, Ctrl-C, a cancel) stops the reader and waits for it:
a reader thread still inside torch when the interpreter exits can abort the process
("terminate called without an active exception"), and in a long-lived process (the
WebUI) it would hold tensors and file reads after the run.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
# torch intra-op threads for the reader's own operations (widening, subtracting, norms of
# chunks that fit in cache), or None to leave torch's setting. The CLI, which owns its
# process, sets 1 (cli._leave_a_core_for_the_reader): a reader with a thread team of its
# own beside the computing one oversubscribed the cores (SD1.5 with OMP_NUM_THREADS=2 on 2
# cores: 13.4 CPU s, 1 reader thread 9.2). torch.set_num_threads also changes the default
# for threads started later, which a host process (WebUI, ComfyUI) must not see.
READER_THREADS: int | None = None
_DONE = object()
_POLL_SECONDS = 0.1
# How long closing waits for the reader to finish the item it is reading: one tensor, so
# seconds at worst on a slow disk; bounded so that a hung read cannot hang the caller.
_JOIN_SECONDS = 120.0


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetched(items: Iterable[T], load: Callable[[T], R], depth: int = 2) -> Iterator[tuple[T, R]]:
    """Yield (item, load(item)) in order, loading ahead in a daemon thread."""
    permits = threading.Semaphore(max(1, depth))
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()

    reader_threads = READER_THREADS
    if reader_threads is not None:
        import torch

        torch.get_num_threads()  # fixes this thread's own count before the reader changes the default

    def reader() -> None:
        try:
            if reader_threads is not None:
                torch.set_num_threads(reader_threads)
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
        _join(thread)


def _join(thread: threading.Thread) -> None:
    """Wait for the reader even through Ctrl-C: a KeyboardInterrupt that lands in the
    wait (a second press) is raised again only once the thread has ended."""
    interrupted = None
    deadline = time.monotonic() + _JOIN_SECONDS
    while thread.is_alive() and time.monotonic() < deadline:
        try:
            thread.join(timeout=_POLL_SECONDS)
        except KeyboardInterrupt as error:
            interrupted = error
    if interrupted is not None:
        raise interrupted
