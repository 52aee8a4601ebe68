"""Where the arithmetic runs: a CUDA GPU, an Apple GPU (MPS) or the CPU.

``auto`` picks CUDA, then MPS, then the CPU. MPS lacks some linear algebra (QR and SVD in
many torch versions) and float64 altogether: ``on_supporting_device`` runs such a step on
the CPU and moves its results back, so a run on MPS never fails for want of an op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from .errors import UserError

# Devices known to lack the decompositions (torch 2.1-2.5 on MPS: QR, SVD not implemented
# or falling back with a warning); a step there goes to the CPU without trying.
NO_DECOMPOSITIONS = {"mps"}


def mps_available() -> bool:
    """An Apple GPU usable by this torch (False on torch builds without the MPS backend)."""
    backend = getattr(torch.backends, "mps", None)
    is_available = getattr(backend, "is_available", None)
    if is_available is None:
        return False
    try:
        return bool(is_available())
    except Exception:  # a broken MPS runtime must not stop a CPU run
        return False


def resolve_device(name: str) -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not mps_available():
            raise UserError("--device mps was asked for, but this torch sees no Apple GPU (MPS); use --device cpu.")
        return torch.device("mps")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was asked for, but this torch sees no CUDA GPU; use --device cpu.")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device must be auto, cpu, mps, cuda or cuda:N, not {name!r}.") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices.")
        return device
    raise UserError(f"--device must be auto, cpu, mps, cuda or cuda:N, not {name!r}.")


@contextlib.contextmanager
def fast_matmuls(device: torch.device) -> Iterator[None]:
    """TF32 matmuls on CUDA for the run (ample for an SVD whose result is stored in 16
    bits), then the setting as it was: the WebUI's own generation must not change."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def on_supporting_device(op: Callable, tensor: torch.Tensor, *args, **kwargs):
    """``op(tensor, ...)``, on the CPU when ``tensor``'s device lacks the op; results are
    moved back to ``tensor``'s device (tuples element by element)."""
    if tensor.device.type in NO_DECOMPOSITIONS:
        return _via_cpu(op, tensor, *args, **kwargs)
    try:
        return op(tensor, *args, **kwargs)
    except NotImplementedError:
        if tensor.device.type == "cpu":
            raise
        return _via_cpu(op, tensor, *args, **kwargs)


def _via_cpu(op: Callable, tensor: torch.Tensor, *args, **kwargs):
    result = op(tensor.cpu(), *args, **kwargs)
    if torch.is_tensor(result):
        return result.to(tensor.device)
    return tuple(item.to(tensor.device) for item in result)  # callers unpack (q, r), (u, s, vh)


def to_float64(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float64, on the CPU when its device has no float64 (MPS)."""
    if tensor.device.type == "mps":
        tensor = tensor.cpu()
    return tensor.double()


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()
