"""The tab's host inside AUTOMATIC1111 / Forge / Forge Classic / Forge Neo.

Every WebUI name used here exists in A1111 1.10, lllyasviel's Forge and Forge Neo
(tests/webui/stub_modules mirrors exactly these names):

- ``modules.sd_models``: ``checkpoint_tiles()``, ``list_models()``,
  ``get_closet_checkpoint_match(text)``, ``checkpoints_list``, ``unload_model_weights()``,
  ``model_path``;
- ``modules.shared``: ``cmd_opts.lora_dir`` (``cmd_opts.ckpt_dir`` in A1111/Forge only),
  ``state`` (``job_count``, ``job_no``, ``textinfo``, ``interrupted``, ``stopping_generation``,
  ``interrupt()``);
- ``modules.processing`` (Compare): ``StableDiffusionProcessingTxt2Img`` with
  ``override_settings={"sd_model_checkpoint": title}``, ``process_images`` -> ``.images``;
- ``modules.call_queue.wrap_gradio_gpu_call``: the queue lock shared with txt2img, and
  ``shared.state.begin/end`` around the job;
- ``modules.ui_components.ToolButton``;
- the built-in Lora extension's modules ``networks`` (``available_networks``,
  ``list_available_networks()``) and ``network`` (``SdVersion`` or, in Neo, ``SD_VERSION``),
  looked up in ``sys.modules``; without them the Lora folder is scanned.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path

from modules import call_queue, sd_models, shared, ui_components

from .services import Reporter, Services
from .sidecar import sd_version_for
from .standalone_services import scan


def runs_zimage() -> bool:
    """Whether this WebUI is Forge Neo, the one that runs Z-Image: its model loader imports
    ``backend.diffusion_engine.zimage`` at start-up (A1111, Forge and Forge Classic have no
    such module). Neo builds keep one LoRA patch per weight in some eras, so the tab then
    writes ``--format neo`` (see architectures/zimage.py)."""
    if "backend.diffusion_engine.zimage" in sys.modules:
        return True
    try:
        import importlib.util

        return importlib.util.find_spec("backend.diffusion_engine.zimage") is not None
    except (ImportError, ValueError):
        return False


class StateReporter(Reporter):
    """Progress into ``shared.state``, which the WebUI's progress bar polls."""

    def __init__(self, stop_event, state):
        super().__init__(stop_event)
        self._state = state

    def begin(self, text: str) -> None:
        self._state.textinfo = text

    def progress(self, done: int, total: int, layer: str) -> None:
        self._state.job_count = total
        self._state.job_no = done
        self._state.textinfo = f"ckpt2lora: {layer} ({done}/{total})"

    def should_stop(self) -> bool:
        # The WebUI's Interrupt sets ``interrupted``, or, with "Don't Interrupt in the middle"
        # (A1111's default) while job_count > 1, only ``stopping_generation`` ("stop after this
        # image"). Our job_count counts layers, so that second flag must stop us too, or the
        # first press is ignored.
        state = self._state
        return super().should_stop() or bool(state.interrupted) or bool(getattr(state, "stopping_generation", False))


class WebUIServices(Services):
    can_send_to_txt2img = True
    can_select_checkpoint = True
    can_free_model = True
    can_compare = True

    def __init__(self, extract_fn: Callable | None = None):
        super().__init__(extract_fn)
        self._generating = False  # a Compare image is being sampled (under the queue lock)
        self._generating_lock = threading.Lock()

    @property
    def default_format(self) -> str:
        return "neo" if runs_zimage() else "auto"

    # -- checkpoints -------------------------------------------------------------------
    def list_checkpoints(self) -> list[str]:
        return list(sd_models.checkpoint_tiles())

    def refresh_checkpoints(self) -> None:
        sd_models.list_models()

    def resolve_checkpoint(self, choice: str) -> Path | None:
        info = sd_models.get_closet_checkpoint_match(choice)
        return Path(info.filename) if info is not None else None

    def checkpoint_title(self, path: Path) -> str | None:
        path = Path(path).resolve()
        for title, info in list(sd_models.checkpoints_list.items()):
            if Path(info.filename).resolve() == path:
                return title
        return None

    def checkpoint_dir(self) -> Path:
        return Path(getattr(shared.cmd_opts, "ckpt_dir", None) or sd_models.model_path)

    # -- LoRAs -------------------------------------------------------------------------
    def lora_dir(self) -> Path:
        return Path(shared.cmd_opts.lora_dir)

    def list_loras(self) -> list[str]:
        networks = sys.modules.get("networks")
        if networks is not None and hasattr(networks, "available_networks"):
            return sorted(networks.available_networks, key=str.lower)
        return sorted({Path(name).stem for name in scan(self.lora_dir())}, key=str.lower)

    def refresh_loras(self) -> None:
        networks = sys.modules.get("networks")
        if networks is not None and hasattr(networks, "list_available_networks"):
            networks.list_available_networks()

    def resolve_lora(self, name: str) -> Path | None:
        networks = sys.modules.get("networks")
        if networks is not None and hasattr(networks, "available_networks"):
            entry = networks.available_networks.get(name)
            if entry is not None:
                return Path(entry.filename)
        for relative, path in scan(self.lora_dir()).items():
            if Path(relative).stem == name:
                return path
        return None

    def sd_version_name(self, architecture: str) -> str:
        return sd_version_for(architecture, sys.modules.get("network"))

    def free_model(self) -> None:
        sd_models.unload_model_weights()

    def generate(self, checkpoint: str, prompt: str, settings, seed: int):
        """One txt2img image through the WebUI's own processing (called inside wrap_job, so
        under the queue lock), on ``checkpoint`` for this image only; None when interrupted."""
        from modules import processing

        from ..errors import UserError

        info = sd_models.get_closet_checkpoint_match(checkpoint)
        if info is None:  # process_images would silently keep the loaded model instead
            raise UserError(f"The checkpoint {checkpoint} is not in the checkpoint list any more: press refresh.")
        kwargs = dict(
            prompt=prompt,
            negative_prompt=settings.negative_prompt,
            seed=seed,
            steps=settings.steps,
            width=settings.width,
            height=settings.height,
            cfg_scale=settings.cfg_scale,
            n_iter=1,
            batch_size=1,
            do_not_save_samples=True,
            do_not_save_grid=True,
            override_settings={"sd_model_checkpoint": info.title},
            override_settings_restore_afterwards=True,
        )
        if settings.sampler_name:
            kwargs["sampler_name"] = settings.sampler_name
        if settings.scheduler:
            kwargs["scheduler"] = settings.scheduler
        p = processing.StableDiffusionProcessingTxt2Img(**kwargs)
        with self._generating_lock:
            self._generating = True
        try:
            processed = processing.process_images(p)
        finally:
            with self._generating_lock:
                self._generating = False
            p.close()
        return processed.images[0] if processed is not None and processed.images else None

    # -- jobs --------------------------------------------------------------------------
    @property
    def uses_task_id(self) -> bool:
        return True

    def wrap_job(self, job: Callable, n_outputs: int) -> Callable:
        from .compat import gr_update

        services = self

        def run(id_task, *values):
            reporter = StateReporter(services._stop_event, shared.state)
            return job(reporter, *values)

        queued = call_queue.wrap_gradio_gpu_call(run, extra_outputs=[gr_update() for _ in range(n_outputs - 1)])

        def handler(*args):
            services.job_started()  # counts while waiting for the queue too, so Stop works there
            try:
                return queued(*args)
            finally:
                services.job_finished()

        return handler

    def request_stop(self) -> None:
        """Our Stop: the job's own stop flag, and while a Compare image samples, the WebUI's
        ``shared.state.interrupt()``, which its sampler checks at every step (A1111's and
        Neo's CFG denoiser raise InterruptedException on ``state.interrupted``): the image
        stops now, not when it is finished. Only while our own image samples, under the
        queue lock, so a txt2img of the user's that our job is waiting for is never hit."""
        super().request_stop()
        with self._generating_lock:
            if self._generating and self._stop_event.is_set():
                shared.state.interrupt()

    def tool_button(self, symbol: str, elem_id: str):
        return ui_components.ToolButton(value=symbol, elem_id=elem_id, elem_classes=["ckpt2lora-tool"])
