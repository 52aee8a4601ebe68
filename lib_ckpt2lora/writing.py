"""Writing safetensors files: streamed, atomic, never over an existing file unasked.

The writer lays out the header from known names, dtypes and shapes, then streams each
tensor's bytes in order, so a checkpoint is never held in memory whole. Output goes to
a hidden temporary file in the target folder and is renamed into place only when
complete: an error or an interrupt leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .errors import UserError
from .reading import DTYPE_NAMES

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ALIGNMENT = 8


def check_output_path(path: Path, overwrite: bool) -> None:
    """Fail early, before any work, if the output cannot or must not be written."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; choose another name or pass --overwrite.")
    if path.is_dir():
        raise UserError(f"The output {path} is a folder; give a file name ending in .safetensors.")
    if not folder.is_dir():
        raise UserError(f"The output folder {folder} does not exist; create it first.")
    if not os.access(folder, os.W_OK):
        raise UserError(f"The output folder {folder} is not writable; choose another folder.")


@contextlib.contextmanager
def atomic_file(path: Path, overwrite: bool) -> Iterator[tuple[Path, object]]:
    """Yield (temporary path, binary handle); rename to ``path`` only on success."""
    check_output_path(path, overwrite)
    handle = None
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as exc:
        raise UserError(f"Cannot create a file in {path.parent} ({exc.strerror}); choose another folder.") from None
    temp = Path(temp_name)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~_umask())
    try:
        handle = os.fdopen(fd, "wb")
        yield temp, handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        handle = None
        if path.exists() and not overwrite:
            raise UserError(f"{path} appeared while writing; it was left untouched. Choose another name.")
        os.replace(temp, path)
    except OSError as exc:
        raise _disk_error(exc, path) from None
    finally:
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_error(exc: OSError, path: Path) -> UserError:
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return UserError(f"Ran out of disk space writing {path}; free some space and run again (nothing was written).")
    return UserError(f"Could not write {path} ({exc.strerror or exc}); nothing was written.")


def build_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """The header bytes (length prefix included) and each tensor's byte size."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, sizes = 0, []
    for name, dtype, shape in entries:
        size = torch.empty((), dtype=dtype).element_size()
        for dim in shape:
            size *= dim
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
        sizes.append(size)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % ALIGNMENT)
    return len(raw).to_bytes(8, "little") + raw, sizes


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def write_streamed(
    path: Path,
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[int, str], torch.Tensor],
    metadata: dict[str, str],
    overwrite: bool,
    before_rename: Callable[[], None] | None = None,
) -> None:
    """Write tensors one at a time: ``produce(i, name)`` returns entry i, already cast.

    ``before_rename`` may raise to abandon a complete file (e.g. it holds no change)."""
    header, sizes = build_header(entries, metadata)
    with atomic_file(path, overwrite) as (_, handle):
        handle.write(header)
        for index, (name, dtype, shape) in enumerate(entries):
            tensor = produce(index, name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"internal: {name} produced {tensor.dtype} {tuple(tensor.shape)}")
            data = tensor_bytes(tensor)
            if data.nbytes != sizes[index]:
                raise RuntimeError(f"internal: {name} has {data.nbytes} bytes, expected {sizes[index]}")
            handle.write(data)
        if before_rename is not None:
            before_rename()


def write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], overwrite: bool, with_hash: bool = True
) -> None:
    """Write small tensors held in memory (a LoRA); add ``sshs_model_hash`` when asked.

    The hash is the SHA-256 of the data section after the header, which is what A1111
    computes and trusts for a LoRA's identity.
    """
    names = sorted(tensors)
    entries = [(name, tensors[name].dtype, tuple(tensors[name].shape)) for name in names]
    metadata = dict(metadata)
    if with_hash:
        digest = hashlib.sha256()
        for name in names:
            digest.update(tensor_bytes(tensors[name]))
        metadata["sshs_model_hash"] = digest.hexdigest()
    write_streamed(path, entries, lambda index, name: tensors[name], metadata, overwrite)
