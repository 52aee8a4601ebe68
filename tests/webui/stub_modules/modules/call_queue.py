"""Stub of modules/call_queue.py: one lock serialises GPU work (txt2img, img2img, ...).

``wrap_gradio_gpu_call`` behaves like the WebUI's: a first argument "task(...)" is the
job id; the call holds ``queue_lock`` with ``shared.state.begin/end`` around it; an
exception becomes ``extra_outputs`` plus an error div in the last output (HTML); the
last output gets a "Time taken" div appended.
"""

import html
import threading
import time
from functools import wraps

from modules import progress, shared

queue_lock = threading.Lock()


def wrap_gradio_gpu_call(func, extra_outputs=None):
    @wraps(func)
    def f(*args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith("task(") and args[0].endswith(")"):
            id_task = args[0]
            progress.add_task_to_queue(id_task)
        else:
            id_task = None
        with queue_lock:
            shared.state.begin(job=id_task)
            progress.start_task(id_task)
            try:
                res = func(*args, **kwargs)
                progress.record_results(id_task, res)
            finally:
                progress.finish_task(id_task)
            shared.state.end()
        return res

    return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True)


def wrap_gradio_call(func, extra_outputs=None, add_stats=False):
    @wraps(func)
    def f(*args, extra_outputs_array=extra_outputs, **kwargs):
        started = time.perf_counter()
        try:
            res = list(func(*args, **kwargs))
        except Exception as e:
            if extra_outputs_array is None:
                extra_outputs_array = [None, ""]
            res = list(extra_outputs_array) + [f"<div class='error'>{html.escape(f'{type(e).__name__}: {e}')}</div>"]
        finally:
            shared.state.skipped = False
            shared.state.interrupted = False
            shared.state.stopping_generation = False
            shared.state.job_count = 0
            shared.state.job = ""
        if add_stats:
            elapsed = time.perf_counter() - started
            res[-1] += f"<div class='performance'><p class='time'>Time taken: {elapsed:.1f} sec.</p></div>"
        return tuple(res)

    return f
