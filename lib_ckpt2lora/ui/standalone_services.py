"""The tab's host outside the WebUI: two folders and gradio's own progress."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .services import Reporter, Services

MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt")


def scan(folder: Path, suffixes=MODEL_SUFFIXES) -> dict[str, Path]:
    """Relative name (posix, with extension) -> path, for the model files under ``folder``."""
    found = {}
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith("."):
                found[path.relative_to(folder).as_posix()] = path
    return found


class GradioReporter(Reporter):
    def __init__(self, stop_event, progress, layer_delay: float = 0.0):
        super().__init__(stop_event)
        self._progress = progress
        self._layer_delay = layer_delay

    def begin(self, text: str) -> None:
        self._progress(0.0, desc=text)

    def progress(self, done: int, total: int, layer: str) -> None:
        self._progress((done, total), desc=f"Extracting {layer}", unit="layers")
        if self._layer_delay:
            time.sleep(self._layer_delay)


class StandaloneServices(Services):
    def __init__(self, models_dir, lora_dir, extract_fn: Callable | None = None, layer_delay: float = 0.0):
        super().__init__(extract_fn)
        self.models_dir = Path(models_dir)
        self._lora_dir = Path(lora_dir)
        self.layer_delay = layer_delay
        self._checkpoints: dict[str, Path] = {}
        self._loras: dict[str, Path] = {}
        self.refresh_checkpoints()
        self.refresh_loras()

    def list_checkpoints(self) -> list[str]:
        return list(self._checkpoints)

    def refresh_checkpoints(self) -> None:
        self._checkpoints = scan(self.models_dir)

    def resolve_checkpoint(self, choice: str) -> Path | None:
        path = self._checkpoints.get(choice)
        if path is None:
            self.refresh_checkpoints()
            path = self._checkpoints.get(choice)
        return path

    def checkpoint_title(self, path: Path) -> str | None:
        path = Path(path).resolve()
        for name, candidate in self._checkpoints.items():
            if candidate.resolve() == path:
                return name
        return None

    def list_loras(self) -> list[str]:
        return list(self._loras)

    def refresh_loras(self) -> None:
        self._loras = {name.rsplit(".", 1)[0]: path for name, path in scan(self._lora_dir).items()}

    def resolve_lora(self, name: str) -> Path | None:
        path = self._loras.get(name)
        if path is None:
            self.refresh_loras()
            path = self._loras.get(name)
        return path

    def lora_dir(self) -> Path:
        return self._lora_dir

    def checkpoint_dir(self) -> Path:
        return self.models_dir

    def wrap_job(self, job: Callable, n_outputs: int) -> Callable:
        import gradio as gr

        services = self

        # gradio finds gr.Progress by a positional parameter's default, so it comes first.
        def run(progress=gr.Progress(), *values):  # noqa: B008 (gradio's own idiom)
            services.job_started()
            try:
                reporter = GradioReporter(services._stop_event, progress, services.layer_delay)
                return job(reporter, *values)
            finally:
                services.job_finished()

        return run
