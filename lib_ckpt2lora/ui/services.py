"""What the tab needs from its host (the WebUI, or the standalone app), as one object.

``build_tab(services)`` only talks to this interface; ``webui_services.WebUIServices``
and ``standalone_services.StandaloneServices`` implement it. No gradio at import time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path


class Reporter:
    """Progress and stop requests for one running job (handed to ``extract``)."""

    def __init__(self, stop_event: threading.Event):
        self._stop_event = stop_event

    def begin(self, text: str) -> None:
        """Before the first layer (reading the models)."""

    def progress(self, done: int, total: int, layer: str) -> None:
        """After each layer."""

    def should_stop(self) -> bool:
        return self._stop_event.is_set()


class Services:
    """The host interface; subclasses fill in the model lists and the job wrapping."""

    can_send_to_txt2img = False  # the page has a txt2img prompt to send a LoRA tag to
    can_select_checkpoint = False  # the page can switch its loaded checkpoint
    can_free_model = False  # a loaded generation model exists that can be freed
    can_compare = False  # the host can generate txt2img images (Compare)
    # The tab's LoRA key format: "neo" inside Forge Neo (Z-Image's fused q|k|v module, which
    # every Neo era applies whole), else "auto".
    default_format = "auto"

    def __init__(self, extract_fn: Callable | None = None):
        self._extract_fn = extract_fn
        self._stop_event = threading.Event()
        self._active = 0
        self._active_lock = threading.Lock()

    # -- models ------------------------------------------------------------------------
    def list_checkpoints(self) -> list[str]:
        raise NotImplementedError

    def refresh_checkpoints(self) -> None:
        raise NotImplementedError

    def resolve_checkpoint(self, choice: str) -> Path | None:
        raise NotImplementedError

    def checkpoint_title(self, path: Path) -> str | None:
        """The checkpoint list's entry for a file just written (after refresh_checkpoints)."""
        return None

    def list_loras(self) -> list[str]:
        raise NotImplementedError

    def refresh_loras(self) -> None:
        raise NotImplementedError

    def resolve_lora(self, name: str) -> Path | None:
        raise NotImplementedError

    def lora_dir(self) -> Path:
        raise NotImplementedError

    def checkpoint_dir(self) -> Path:
        raise NotImplementedError

    def sd_version_name(self, architecture: str) -> str:
        from .sidecar import sd_version_for

        return sd_version_for(architecture)

    def free_model(self) -> None:
        """Unload the host's generation model (only when the user asks)."""

    def generate(self, checkpoint: str, prompt: str, settings, seed: int):
        """One txt2img image (PIL) of ``prompt`` on ``checkpoint`` (Compare), or None if
        interrupted; ``settings`` is a compare.Txt2imgSettings."""
        raise NotImplementedError

    # -- the engine --------------------------------------------------------------------
    def extract(self, opts, progress=None, should_stop=None, log=None):
        fn = self._extract_fn
        if fn is None:
            from ..extract import extract as fn
        return fn(opts, progress=progress, should_stop=should_stop, log=log)

    # -- jobs --------------------------------------------------------------------------
    def wrap_job(self, job: Callable, n_outputs: int) -> Callable:
        """Turn ``job(reporter, *form_values) -> outputs`` into the Extract event's handler."""
        raise NotImplementedError

    @property
    def uses_task_id(self) -> bool:
        """True when the handler's first input is the WebUI's task id (for its progress bar)."""
        return False

    def job_started(self) -> None:
        with self._active_lock:
            self._active += 1

    def job_finished(self) -> None:
        with self._active_lock:
            self._active -= 1
            if self._active <= 0:
                self._active = 0
                self._stop_event.clear()

    def request_stop(self) -> None:
        """Our Stop button: stops our running (or queued) job, never someone else's."""
        with self._active_lock:
            if self._active > 0:
                self._stop_event.set()

    # -- widgets that differ between hosts ---------------------------------------------
    def tool_button(self, symbol: str, elem_id: str):
        import gradio as gr

        return gr.Button(value=symbol, elem_id=elem_id, elem_classes=["tool", "ckpt2lora-tool"])
