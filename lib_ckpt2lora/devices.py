"""Where the arithmetic runs: the CPU or a CUDA GPU."""

from __future__ import annotations

import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was asked for, but this torch sees no CUDA GPU; use --device cpu.")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices.")
        if device.type == "cuda":
            # TF32 matmuls are ample for an SVD whose result is stored in 16 bits.
            torch.backends.cuda.matmul.allow_tf32 = True
        return device
    raise UserError(f"--device must be auto, cpu, cuda or cuda:N, not {name!r}.")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()
