"""Where a variant's delta comes from: a checkpoint, or (see lora_input) a LoRA file.

A source lists the canonical keys it changes with their shapes, reads what it needs for
one key (in the background reader thread), and turns that into an fp32 delta against
the base tensor on the compute device.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .architectures import FileView


class DeltaSource(Protocol):
    name: str
    shapes: dict[str, tuple[int, ...]]

    def load(self, key: str) -> object: ...

    def delta(self, loaded: object, base: torch.Tensor) -> torch.Tensor: ...


class CheckpointSource:
    """A full model: delta = variant - base, in fp32."""

    def __init__(self, view: FileView):
        self.view = view
        self.name = view.file.path.name
        self.shapes = view.shapes

    def load(self, key: str) -> torch.Tensor:
        return self.view.read(key)

    def delta(self, loaded: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return loaded.to(base.device, non_blocking=True).float() - base
