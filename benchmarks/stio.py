"""Minimal safetensors reading and writing for the benchmarks, independent of the engine.

Format: 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the
header; optional ``"__metadata__"`` of strings), then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}


@dataclass
class _Slot:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


class StreamingSafetensorsWriter:
    """Write a .safetensors file one tensor at a time, in the order declared up front.

    Format: 8-byte little-endian header length, a JSON header (padded with spaces to a
    multiple of 8) mapping each name to dtype/shape/data_offsets, then the raw
    little-endian bytes. The file is written under a temporary name and renamed on
    ``close()``; nothing is left behind on error.
    """

    def __init__(self, path: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.order = [name for name, _, _ in layout]
        self.slots: dict[str, _Slot] = {}
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, shape, dtype in layout:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            self.slots[name] = _Slot(dtype, tuple(shape), offset, offset + nbytes)
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.total = self.data_start + offset
        self.next = 0
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.order) or self.order[self.next] != name:
            expected = self.order[self.next] if self.next < len(self.order) else "nothing"
            raise ValueError(f"tensor {name!r} written out of order (expected {expected})")
        slot = self.slots[name]
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, declared {slot.dtype} {slot.shape}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self.file.write(memoryview(flat.numpy()))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            self.abort()
            raise ValueError(f"{self.path.name}: {len(self.order) - self.next} tensors were never written")
        self.file.close()
        size = self.tmp.stat().st_size
        if size != self.total:
            self.tmp.unlink()
            raise ValueError(f"{self.path.name}: wrote {size} bytes, expected {self.total}")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


@dataclass
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor index (sorted by file offset) and metadata of a .safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    infos = {}
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        begin, end = entry["data_offsets"]
        dtype = _TORCH_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: {name} has dtype {entry['dtype']}, not handled by the benchmark")
        infos[name] = TensorInfo(name, dtype, tuple(entry["shape"]), start + begin, start + end)
    return infos, metadata


class PlainReader:
    """Read tensors with plain positioned reads into one reused buffer (no mmap).

    ``get(name)`` returns a tensor that views the internal buffer: it is valid only until
    the next ``get`` on this reader, so convert or copy it first.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.infos, self.metadata = read_header(self.path)
        self.fd = os.open(self.path, os.O_RDONLY)
        biggest = max((i.end - i.begin for i in self.infos.values()), default=0)
        self.buffer = bytearray(max(biggest, 1))

    def get(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        size = info.end - info.begin
        view = memoryview(self.buffer)[:size]
        done = 0
        while done < size:
            got = os.preadv(self.fd, [view[done:]], info.begin + done)
            if got <= 0:
                raise OSError(f"{self.path}: short read at {name}")
            done += got
        if size == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(self.buffer, dtype=torch.uint8, count=size).view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> PlainReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
