"""Reading model and LoRA files lazily, one tensor at a time.

safetensors files are read a tensor at a time with plain positioned reads, so a 12 GB
model costs only the tensor being read; their header is parsed and checked here first so that a damaged file ends
in one clear sentence rather than a panic from deep inside a library. ``.ckpt``/``.pt``
files are read with ``torch.load(weights_only=True)`` only: a pickle can run code, and a
weights-only load refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from . import scaled_fp8
from .errors import UserError

# Header sizes of real checkpoints are a few MB at most; more means a damaged file.
MAX_HEADER_BYTES = 100 * 1024 * 1024

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)

DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
FLOAT_DTYPES = {dtype for dtype in SAFETENSORS_DTYPES.values() if dtype.is_floating_point}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
ANSI_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


class TensorFile:
    """A model or LoRA file whose tensors are read one at a time.

    ``infos`` maps every key to its shape and dtype without reading any data.
    """

    def __init__(self, path: Path | str, role: str = "model"):
        self.path = Path(path)
        self.role = role
        self.metadata: dict[str, str] = {}
        self._handle = None
        self._lock = threading.Lock()
        self._offsets: dict[str, tuple[int, int]] = {}
        self._data_start = 0
        self._state_dict: dict[str, torch.Tensor] | None = None
        _check_is_readable_file(self.path, role)
        if self.path.suffix.lower() in PICKLE_SUFFIXES and not _looks_like_safetensors(self.path):
            self.infos = self._open_pickle()
        else:
            self.infos = self._open_safetensors()
        # ComfyUI fp8 (old scaled_fp8, new comfy_quant): the scales and markers leave infos (not
        # layers); get() reads each scaled weight as its real value
        self.fp8_scales: dict[str, str] = {}
        try:
            self.fp8_scales, self.scale_infos = scaled_fp8.take_scales(self.infos, self.metadata, self.get, self.path, role)
        except UserError:  # a quantized format it cannot read: refused before any work
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------
    def _open_safetensors(self) -> dict[str, TensorInfo]:
        # Plain reads into fresh tensors, not a memory map: a map keeps every page it
        # touched resident (and Windows counts those pages to the process), so a whole
        # pass would grow RSS to the model's size (benchmarks/bench_reading.py).
        header, self.metadata, self._offsets = read_safetensors_header(self.path, self.role)
        try:
            # Unbuffered: large reads go straight into the tensor, with no copy.
            self._handle = open(self.path, "rb", buffering=0)
            self._data_start = 8 + struct.unpack("<Q", self._handle.read(8))[0]
        except (OSError, struct.error) as exc:
            reason = getattr(exc, "strerror", None) or "it changed while being opened"
            raise UserError(f"The {self.role} file {self.path} cannot be read ({reason}).") from None
        return header

    def _open_pickle(self) -> dict[str, TensorInfo]:
        try:
            loaded = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            if isinstance(exc, RuntimeError) and "mmap" in str(exc):
                loaded = _weights_only_load_without_mmap(self.path, self.role)
            else:
                raise UserError(
                    f"The {self.role} file {self.path} was refused: it is not a plain-tensor "
                    f"checkpoint that loads safely with weights_only=True ({_short(exc)}); "
                    "convert it to .safetensors with a tool you trust."
                ) from None
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
        if not isinstance(state, dict):
            raise UserError(f"The {self.role} file {self.path} holds no state dict of tensors.")
        self._state_dict = {k: v for k, v in state.items() if isinstance(k, str) and torch.is_tensor(v)}
        return {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in self._state_dict.items()}

    # -- reading ---------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, key: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (or a row range of it) as the model means it: as stored, except a
        ComfyUI fp8 weight, which comes dequantized (float32: stored value x its scale).
        ``out``: see get_stored (not used for a dequantized weight)."""
        if key in self.fp8_scales:
            return scaled_fp8.dequantize(self.get_stored(key, rows), self.get_stored(self.fp8_scales[key]), key, self.path)
        return self.get_stored(key, rows, out)

    def get_stored(self, key: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (or a row range of it) as stored.

        ``out``: a flat buffer of the stored dtype with room for the values, reused by the
        caller (no fresh allocation, so no page faults); the result is then a view of it."""
        if self._state_dict is not None:
            tensor = self._state_dict[key]
            return tensor[rows[0] : rows[1]] if rows else tensor
        info = self.infos.get(key) or self.scale_infos[key]
        shape = list(info.shape)
        begin, end = self._offsets[key]
        if rows is not None:
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape[0] = rows[1] - rows[0]
        return self._read(key, info.dtype, shape, self._data_start + begin, end - begin, out)

    @property
    def streamed(self) -> bool:
        """Whether tensors are read from the file range by range (safetensors), not held
        in memory (a pickled checkpoint, loaded whole)."""
        return self._state_dict is None

    def read_values(self, key: str, begin: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Values ``begin:end`` of stored tensor ``key`` (row-major, flat), as stored, from a
        streamed file; ``out`` as in get_stored. The reader's chunks are then cache-sized
        whatever the row width.

        Plain reads, not mapped windows of the file: in a whole run the windows saved 0.05-0.1
        of the reader's 1.3-2 CPU s on 1-block Z-Image, nothing on SD1.5, and added 10-20 MB
        of peak RSS (benchmarks/bench_mapped_reads.py, benchmarks/README.md)."""
        info = self.infos.get(key) or self.scale_infos[key]
        size = torch.empty((), dtype=info.dtype).element_size()
        first = self._data_start + self._offsets[key][0] + begin * size
        return self._read(key, info.dtype, [end - begin], first, (end - begin) * size, out)

    def _read(self, key: str, dtype: torch.dtype, shape: list[int], first: int, count: int, out) -> torch.Tensor:
        """``count`` bytes from file offset ``first`` as a tensor of ``shape``: a view of
        ``out`` when it has room, else a fresh tensor."""
        if out is not None and out.dtype == dtype and out.is_contiguous() and out.numel() >= math.prod(shape):
            tensor = out.reshape(-1)[: math.prod(shape)].view(shape)
        else:
            tensor = torch.empty(shape, dtype=dtype)
        if not count:
            return tensor
        buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
        try:
            got = self._read_into(buffer, first)
        except OSError as exc:
            raise UserError(f"Could not read tensor {key} from {self.path} ({exc.strerror or exc}).") from None
        if got != count:
            raise UserError(f"The {self.role} file {self.path} is truncated at tensor {key}; download it again.")
        return tensor

    def _read_into(self, buffer: memoryview, offset: int) -> int:
        """Fill ``buffer`` from ``offset``; the byte count read (less only at the end of the file).

        seek + readinto (portable: Windows has no pread) under a per-file lock, since the
        prefetch thread and the main thread share the handle (read_into loops until full)."""
        with self._lock:
            self._handle.seek(offset)
            return read_into(self._handle, buffer)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = None
        self._state_dict = None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_into(handle, buffer: memoryview) -> int:
    """Fill ``buffer`` from ``handle``'s position; the byte count read (less only at the end
    of the file): one read returns at most 0x7ffff000 bytes on Linux (INT_MAX on Windows)
    and network drives return less, so loop until full."""
    done = 0
    while done < len(buffer):
        got = handle.readinto(buffer[done:])
        if not got:  # 0 at the end of the file (None only for non-blocking files)
            break
        done += got
    return done


def read_safetensors_header(
    path: Path, role: str = "model"
) -> tuple[dict[str, TensorInfo], dict[str, str], dict[str, tuple[int, int]]]:
    """Parse and check a safetensors header: sizes, dtypes and offsets against the file."""
    size = path.stat().st_size
    if size < 8:
        raise UserError(f"The {role} file {path} is empty or truncated ({size} bytes); download it again.")
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise UserError(
                f"The {role} file {path} is not a valid safetensors file (its header claims "
                f"{header_len} bytes, the file has {size}); download it again."
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UserError(
            f"The {role} file {path} is not a valid safetensors file (its header is not JSON); download it again."
        ) from None
    if not isinstance(header, dict):
        raise UserError(f"The {role} file {path} is not a valid safetensors file (bad header); download it again.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        metadata = {}
    data_size = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, tuple[int, int]] = {}
    for key, entry in header.items():
        try:
            dtype_name = entry["dtype"]
            if not isinstance(dtype_name, str):
                raise TypeError(dtype_name)
            shape = tuple(_json_int(dim) for dim in entry["shape"])
            begin, end = (_json_int(offset) for offset in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise UserError(f"The {role} file {path} has a malformed header entry for {key!r}; download it again.") from None
        if dtype_name not in SAFETENSORS_DTYPES:
            raise UserError(
                f"The {role} file {path} stores {key} as {dtype_name}, a type this tool cannot read; "
                "convert the file to fp16, bf16 or fp32."
            )
        if any(dim < 0 for dim in shape) or not 0 <= begin <= end <= data_size:
            raise UserError(
                f"The {role} file {path} is truncated or damaged: tensor {key} lies past the end of the file; download it again."
            )
        info = TensorInfo(shape, SAFETENSORS_DTYPES[dtype_name])
        if info.numel * torch.empty((), dtype=info.dtype).element_size() != end - begin:
            raise UserError(
                f"The {role} file {path} is damaged: tensor {key} has {end - begin} bytes for shape "
                f"{list(shape)} {dtype_name}; download it again."
            )
        infos[key] = info
        offsets[key] = (begin, end)
    if not infos:
        raise UserError(f"The {role} file {path} holds no tensors; check that it is the model you meant.")
    return infos, {str(k): str(v) for k, v in metadata.items()}, offsets


def _json_int(value) -> int:
    """A header integer: JSON ints only (no floats, bools, strings, Infinity)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(value)
    return value


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file saved under a .ckpt/.pt name: a small length, then a JSON object."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    return len(head) == 9 and int.from_bytes(head[:8], "little") <= MAX_HEADER_BYTES and head[8:9] == b"{"


def _check_is_readable_file(path: Path, role: str) -> None:
    if not path.exists():
        raise UserError(f"The {role} file {path} does not exist; check the path.")
    if path.is_dir():
        raise UserError(f"The {role} path {path} is a folder; give the model file inside it.")
    if not os.access(path, os.R_OK):
        raise UserError(f"The {role} file {path} cannot be read (permission denied).")


def _weights_only_load_without_mmap(path: Path, role: str):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"The {role} file {path} was refused: it is not a plain-tensor checkpoint that "
            f"loads safely with weights_only=True ({_short(exc)}); convert it to .safetensors "
            "with a tool you trust."
        ) from None


def _short(exc: BaseException) -> str:
    """One clause of a library's error: no colour codes, no advice on loading it unsafely."""
    text = ANSI_ESCAPES.sub("", str(exc)).strip()
    lines = text.splitlines() or [type(exc).__name__]
    # torch's weights-only refusal names the offending global on a later line
    line = next((ln for ln in lines if "Unsupported global" in ln), lines[0])
    return re.split(r"[.!?]\s+(?=[A-Z])", line.strip())[0].rstrip(".")[:160]  # its first sentence
