"""Where a variant's delta comes from: a checkpoint, or (see lora_input) a LoRA file.

A source lists the canonical keys it changes with their shapes, reads what it needs for
one key (in the background reader thread), and turns that into an fp32 delta against
the base tensor on the compute device.

On the CPU the reader thread forms checkpoint deltas itself (``read_deltas``): row chunks
of the base and of each variant are read into small reused buffers, widened and
subtracted into one fp32 delta per variant, and ||W||^2 is summed on the way. A unit then
costs its fp32 delta alone, where reading both tensors whole and widening each to fp32
cost three fp32 copies (Wan 14B's time_projection.1, [30720, 5120]: 1.9 GB instead of
0.63 GB), and the fresh allocations' page faults are gone.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .architectures import FileView
from .svd import ENERGY_CHUNK, partial_squares, squared_norm, summed_squares


class DeltaSource(Protocol):
    name: str
    shapes: dict[str, tuple[int, ...]]

    def load(self, key: str) -> object: ...

    def delta(self, loaded: object, base: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ReadDelta:
    """A delta the reader thread already formed in fp32 (``read_deltas``), with its
    ||delta||^2 as svd.squared_norm computes it (summed while each chunk was in cache).

    A bf16 ``tensor`` was formed in fp32 but kept only rounded (``read_deltas(rounded=True)``),
    for the SVD's bf16 products; ``exact`` then reads the fp32 delta again, for the rare
    layer that needs it (an exactly low-rank delta, svd._refined)."""

    tensor: torch.Tensor
    energy: float | None = None
    exact: Callable[[], torch.Tensor] | None = None


def known_energy(items: list) -> float | None:
    """||delta||^2 of a unit's delta when the reader computed it already (one part)."""
    if len(items) == 1 and isinstance(items[0], ReadDelta):
        return items[0].energy
    return None


@dataclass
class ReadBase:
    """A base part the reader thread has already subtracted: all the step still needs of
    it is ||W||^2 (the report's relative change, the budget's relative objective)."""

    energy: float
    shape: tuple[int, ...]


class CheckpointSource:
    """A full model: delta = variant - base, in fp32."""

    def __init__(self, view: FileView):
        self.view = view
        self.name = view.file.path.name
        self.shapes = view.shapes

    def load(self, key: str) -> torch.Tensor:
        return self.view.read(key)

    def delta(self, loaded: torch.Tensor | ReadDelta, base: torch.Tensor | ReadBase) -> torch.Tensor:
        if isinstance(loaded, ReadDelta):
            return loaded.tensor
        return loaded.to(base.device, non_blocking=True).float() - base


def on_device(base: torch.Tensor | ReadBase, device: torch.device) -> torch.Tensor | ReadBase:
    """A loaded base part as the step uses it: fp32 on the compute device (a ReadBase stays
    as it is: its delta is formed already)."""
    return base if isinstance(base, ReadBase) else base.to(device, non_blocking=True).float()


def base_energy(base: torch.Tensor | ReadBase) -> float:
    """||W||^2 of a base part, as svd.squared_norm computes it."""
    return base.energy if isinstance(base, ReadBase) else squared_norm(base)


# Row chunks hold about this many values (whole ENERGY_CHUNKs, so that ||W||^2 adds the very
# same partial sums as svd.squared_norm); a width that cannot align below
# MAX_CHUNK_VALUES is done in one piece.
ROW_CHUNK_VALUES = 1 << 20
MAX_CHUNK_VALUES = 1 << 25
# Stored dtypes read into the reader's reused buffers (fp8 weights come dequantized, in
# fresh float32 tensors).
_ROW_READABLE = (torch.float32, torch.float16, torch.bfloat16)
# torch's CPU allocator aligns every tensor to 64 bytes.
ALLOCATOR_ALIGNMENT = 64
# Deltas of at least this many values come from SpareDeltas' reused buffers (256 KB: below
# that, malloc serves them from its heap without fresh pages).
POOLED_VALUES = 1 << 16
# The reader thread's row buffers, reused from unit to unit (per thread: a batch or a
# checkpoint run has its own reader).
_buffers = threading.local()


def row_chunks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Row ranges covering a tensor of ``shape``, each but the last a whole number of
    ENERGY_CHUNKs of values; one range for small or unalignable tensors."""
    rows = shape[0] if shape else 1
    width = math.prod(shape[1:]) if len(shape) > 1 else 1
    if not shape or rows * width <= ROW_CHUNK_VALUES:
        return [(0, rows)]
    step = ENERGY_CHUNK // math.gcd(width, ENERGY_CHUNK)  # rows per aligned piece
    if step * width > MAX_CHUNK_VALUES:
        return [(0, rows)]
    step *= max(1, ROW_CHUNK_VALUES // (step * width))
    return [(begin, min(begin + step, rows)) for begin in range(0, rows, step)]


class SpareDeltas:
    """Flat fp32 buffers of finished units' deltas, handed back to the reader and reused for
    any later delta that fits (a delta is then a view of the buffer's first values): a
    fresh allocation of a large tensor costs its page faults (here 0.07 CPU s per 40 M
    values, twice what forming the delta costs), and real models alternate shapes
    (Z-Image: q|k|v [11520, 3840], out [3840, 3840], w1 [10240, 3840], ...), so reuse by
    exact size missed most of them. Holds at most ``keep``; when none fits a request, the
    spares are let go before the reader allocates, so memory does not grow (the buffers
    stay as large as the largest deltas in flight). Deltas under POOLED_VALUES are plain
    allocations (small blocks come from malloc's heap)."""

    def __init__(self, keep: int = 2, capacity: int = 0):
        self.keep = keep
        # values of a fresh buffer at least, so that the buffers do not grow (each growth,
        # fresh pages) while ever larger shapes come: the run's largest repeated delta. A
        # larger buffer (a one-off tensor: Wan's time_projection, 4x a block's largest) is
        # not kept, or its pages would stay resident for the rest of the run.
        self.capacity = capacity
        self._lock = threading.Lock()
        self._spare: list[torch.Tensor] = []

    def take(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor of ``shape`` for a new delta (its values are whatever the buffer held);
        a bf16 one is a view of an fp32 buffer's first half as many values."""
        numel = math.prod(shape)
        if numel < POOLED_VALUES or len(shape) < 2:  # a 1-D delta is kept whole (.diff): no view of a buffer
            return torch.empty(shape, dtype=dtype)
        values = -(-numel * dtype.itemsize // 4)  # fp32 values that hold it
        with self._lock:
            fitting = [index for index, buffer in enumerate(self._spare) if buffer.numel() >= values]
            if fitting:
                best = min(fitting, key=lambda index: self._spare[index].numel())
                return _typed_view(self._spare.pop(best), dtype, numel, shape)
            self._spare.clear()
        return _typed_view(torch.empty(max(values, self.capacity), dtype=torch.float32), dtype, numel, shape)

    def give(self, tensor: torch.Tensor) -> None:
        """Hand back a delta from ``take`` that nothing else refers to any more."""
        if tensor.numel() < POOLED_VALUES or tensor.dim() < 2:  # not from the pool (take)
            return
        buffer = _flat_buffer(tensor)
        if buffer is None or (self.capacity and buffer.numel() > self.capacity):
            return
        with self._lock:
            if any(spare.data_ptr() == buffer.data_ptr() for spare in self._spare):
                raise ValueError("a delta was handed back twice")
            self._spare.append(buffer)
            self._spare.sort(key=torch.Tensor.numel)
            del self._spare[: -self.keep]  # the largest fit the most requests

    def clear(self) -> None:
        with self._lock:
            self._spare.clear()


def _typed_view(buffer: torch.Tensor, dtype: torch.dtype, numel: int, shape: tuple[int, ...]) -> torch.Tensor:
    typed = buffer if dtype == torch.float32 else buffer.view(dtype)
    return typed[:numel].view(shape)


def _flat_buffer(tensor: torch.Tensor) -> torch.Tensor | None:
    """The whole flat fp32 buffer that ``tensor`` (a view from SpareDeltas.take, of any
    dtype) is a view of; None where it cannot be one (a bf16 tensor of an odd size)."""
    base = tensor._base if tensor._base is not None else tensor
    if base.dim() != 1 or not base.is_contiguous() or base.data_ptr() != tensor.data_ptr():
        base = tensor.reshape(-1)
    if base.dtype == torch.float32:
        return base
    return base.view(torch.float32) if base.numel() * base.dtype.itemsize % 4 == 0 else None


def read_deltas(
    base_view: FileView,
    key: str,
    sources: list[CheckpointSource],
    base: torch.Tensor | None = None,
    spare: SpareDeltas | None = None,
    rounded: bool = False,
) -> tuple[torch.Tensor | ReadBase, list[ReadDelta]]:
    """Each source's fp32 delta of canonical ``key`` against the base, formed row chunk by
    row chunk (in the reader thread, on the CPU), with the same values as
    ``CheckpointSource.delta`` gives.

    ``base``: the base tensor when the caller has read it already (a batch shares one
    across its variants); it is returned as it is. Otherwise the base is read in row
    chunks too and comes back as a ReadBase holding its ||W||^2. ``spare``: where the
    deltas' memory comes from (every value is written here, whatever it held).
    ``rounded``: keep each delta as bf16 only, each chunk formed in fp32 (||delta||^2 from
    those fp32 values) and rounded while in cache: the bf16 copy the SVD's products take,
    at half the memory, without a pass over an fp32 delta (SD1.5: 0.3 CPU s of copying)."""
    shape = tuple(sources[0].shapes[key])
    dtype = torch.bfloat16 if rounded else torch.float32
    deltas = [spare.take(shape, dtype) if spare is not None else torch.empty(shape, dtype=dtype) for _ in sources]
    variants = [_RowReader(source.view, key) for source in sources]
    base_rows = _RowReader(base_view, key, base, "base")
    # Flat value ranges where every tensor can be read by value (cache-sized: a row chunk
    # that aligns with ENERGY_CHUNK can hold 12 M values, and widening it then cost 1.5x);
    # row ranges otherwise (an fp8 weight is dequantized row by row).
    flat = len(shape) > 1 and all(reader.flat for reader in (base_rows, *variants))
    partials, delta_partials = [], [[] for _ in deltas]
    for begin, end in value_chunks(math.prod(shape)) if flat else row_chunks(shape):
        base_chunk = _widened(base_rows.chunk(begin, end, flat), "base")
        for delta, variant, sums in zip(deltas, variants, delta_partials):
            target = delta.view(-1)[begin:end] if flat else delta[begin:end] if shape else delta
            formed = _fp32_buffer_shaped_as(target, "delta") if rounded else target
            formed.copy_(variant.chunk(begin, end, flat).reshape(target.shape))
            formed.sub_(base_chunk.reshape(target.shape))
            # chunks start at whole ENERGY_CHUNKs: squared_norm's very partial sums
            sums.extend(partial_squares(formed.reshape(-1)))
            if rounded:
                target.copy_(formed)
        if base is None:
            partials.extend(partial_squares(base_chunk.reshape(-1)))
    read = [ReadDelta(delta, summed_squares(sums)) for delta, sums in zip(deltas, delta_partials)]
    return (base if base is not None else ReadBase(summed_squares(partials), shape)), read


def value_chunks(numel: int) -> list[tuple[int, int]]:
    """Flat value ranges covering ``numel`` values, each but the last ROW_CHUNK_VALUES long
    rounded to whole ENERGY_CHUNKs (so that ||W||^2 adds the same partial sums as
    svd.squared_norm)."""
    step = ENERGY_CHUNK * max(1, ROW_CHUNK_VALUES // ENERGY_CHUNK)
    return [(begin, min(begin + step, numel)) for begin in range(0, numel, step)] or [(0, 0)]


class _RowReader:
    """Row ranges of one canonical tensor, read as FileView.read gives it (TensorFile.get:
    an fp8 weight comes dequantized, range by range): plain 16/32-bit tensors straight from
    the file into a reused buffer."""

    def __init__(self, view: FileView, key: str, whole: torch.Tensor | None = None, role: str = "variant"):
        ref = view.refs[key]
        info = view.file.infos.get(ref.key)
        self.file, self.key = view.file, ref.key
        self.start = ref.rows[0] if ref.rows else 0
        self.whole = whole
        if whole is None and (info is None or not info.shape):
            self.whole = view.read(key)
        self.role = "read " + role  # the base's chunk must outlive the variants' reads
        self.dtype = None if info is None else info.dtype
        self.buffered = info is not None and info.dtype in _ROW_READABLE and ref.key not in view.scales
        self.width = math.prod(info.shape[1:]) if info is not None else 0

    @property
    def flat(self) -> bool:
        """Whether ``values`` can read this tensor (contiguous and as stored, no dequantizing)."""
        if self.whole is not None:
            return self.whole.dim() > 0 and self.whole.is_contiguous()
        return self.buffered and self.file.streamed

    def rows(self, begin: int, end: int) -> torch.Tensor:
        if self.whole is not None:
            return self.whole[begin:end] if self.whole.dim() else self.whole
        rows = (self.start + begin, self.start + end)
        if not self.buffered:
            return self.file.get(self.key, rows)
        return self.file.get(self.key, rows, out=_buffer(self.dtype, self.role, (end - begin) * self.width))

    def chunk(self, begin: int, end: int, flat: bool) -> torch.Tensor:
        """Flat values ``begin:end`` (see ``flat``) or rows ``begin:end``."""
        if not flat:
            return self.rows(begin, end)
        if self.whole is not None:
            return self.whole.view(-1)[begin:end]
        first = self.start * self.width
        out = _buffer(self.dtype, self.role, end - begin)
        return self.file.read_values(self.key, first + begin, first + end, out)


def _widened(tensor: torch.Tensor, role: str) -> torch.Tensor:
    """``tensor`` in fp32, at an address aligned as torch's allocator aligns: as it is when
    it already is, else widened or copied into a reused buffer (||W||^2 must add the same
    partial sums as svd.squared_norm, and a dot product's rounding depends on alignment)."""
    if tensor.dtype == torch.float32 and tensor.data_ptr() % ALLOCATOR_ALIGNMENT == 0:
        return tensor
    return _fp32_buffer_shaped_as(tensor, role).copy_(tensor)


def _fp32_buffer_shaped_as(tensor: torch.Tensor, role: str) -> torch.Tensor:
    """The reader's reused fp32 buffer for ``role``, as a tensor of ``tensor``'s shape."""
    return _buffer(torch.float32, role, tensor.numel())[: tensor.numel()].view(tensor.shape)


def _buffer(dtype: torch.dtype, role: str, numel: int) -> torch.Tensor:
    """The reader thread's flat buffer for ``role`` and ``dtype``, of at least ``numel``
    values: kept and reused up to MAX_CHUNK_VALUES (a larger one, for a tensor read in one
    piece, is freed with it)."""
    if numel > MAX_CHUNK_VALUES:
        return torch.empty(numel, dtype=dtype)
    store = getattr(_buffers, "store", None)
    if store is None:
        store = _buffers.store = {}
    buffer = store.get((role, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = store[(role, dtype)] = torch.empty(numel, dtype=dtype)
    return buffer
