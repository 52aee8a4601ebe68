"""The reader's CPU savings (issue 18) change no value and hold nothing they should not.

* SpareDeltas reuses fp32 buffers by capacity: a delta is a view of a buffer at least as
  large; a buffer still in use is never handed out again, a buffer handed back twice is
  refused, 1-D and small deltas are plain tensors (a kept .diff never pins a big buffer);
* TensorFile.read_values (the reader's flat chunks) gives every tensor's values for every
  chunk (every dtype, offsets not aligned, a header of odd length), one sentence for a
  file cut short; after a run the inputs can be replaced and deleted (Windows refuses
  both for a file still open or mapped).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import realistic as rl
import torch

from lib_ckpt2lora import reading, sources
from lib_ckpt2lora.errors import UserError
from lib_ckpt2lora.options import ExtractOptions
from lib_ckpt2lora.reading import TensorFile

BIG = sources.POOLED_VALUES


def storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_a_spare_buffer_serves_any_delta_that_fits_and_never_one_in_use():
    spare = sources.SpareDeltas(keep=2, capacity=3 * BIG)
    first = spare.take((2, BIG))
    second = spare.take((BIG, 3))
    assert first.untyped_storage().nbytes() == 3 * BIG * 4, "a fresh buffer has the run's largest capacity"
    assert storage_of(first) != storage_of(second)
    spare.give(first)
    third = spare.take((BIG, 1))  # another shape, fewer values: first's buffer, not second's
    assert storage_of(third) == storage_of(first) and third.shape == (BIG, 1) and third.is_contiguous()
    fourth = spare.take((BIG, 2))  # no spare left: a new buffer, not one in use
    assert storage_of(fourth) not in (storage_of(second), storage_of(third))
    spare.give(third)
    with pytest.raises(ValueError, match="twice"):
        spare.give(third)


def test_a_spare_too_small_is_let_go_and_the_largest_are_kept():
    spare = sources.SpareDeltas(keep=1)
    small, large = spare.take((BIG, 1)), spare.take((BIG, 2))
    spare.give(large)
    spare.give(small)  # keep=1: the larger buffer stays, it fits more requests
    assert storage_of(spare.take((BIG, 2))) == storage_of(large)
    spare.give(small)
    bigger = spare.take((BIG, 4))  # nothing fits: the spare goes before a new buffer comes
    assert spare._spare == [] and storage_of(bigger) != storage_of(small)


def test_a_buffer_above_the_capacity_is_not_kept():
    """A one-off tensor larger than every repeated one: its buffer goes once it is done."""
    spare = sources.SpareDeltas(capacity=2 * BIG)
    outlier, block = spare.take((BIG, 5)), spare.take((BIG, 2))
    spare.give(outlier)
    spare.give(block)
    assert [buffer.numel() for buffer in spare._spare] == [2 * BIG]


def test_bf16_and_fp32_deltas_share_the_buffers():
    """A bf16 delta (rounded by the reader) is a view of an fp32 buffer's first half; handed
    back, that fp32 buffer serves the next delta of either dtype."""
    spare = sources.SpareDeltas(capacity=2 * BIG)
    rounded = spare.take((BIG, 4), torch.bfloat16)
    assert rounded.dtype == torch.bfloat16 and rounded.untyped_storage().nbytes() == 2 * BIG * 4
    spare.give(rounded)
    assert [(buffer.dtype, buffer.numel()) for buffer in spare._spare] == [(torch.float32, 2 * BIG)]
    widened = spare.take((BIG, 2))
    assert storage_of(widened) == storage_of(rounded) and widened.dtype == torch.float32
    spare.give(widened)
    assert storage_of(spare.take((BIG, 3), torch.bfloat16)) == storage_of(rounded)


def test_small_and_one_dimensional_deltas_are_plain_tensors():
    spare = sources.SpareDeltas(capacity=4 * BIG)
    for shape in ((BIG - 1, 1), (2 * BIG,)):  # a 1-D delta is kept whole (.diff)
        delta = spare.take(shape)
        assert delta._base is None and delta.untyped_storage().nbytes() == delta.numel() * 4
        spare.give(delta)
        assert spare._spare == []


def write_odd_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of every readable dtype, at offsets that are not multiples of 4 or 64."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, generator=gen).to(torch.bfloat16),  # shifts the rest by 6 bytes
        "b": torch.randn(700, 1000, generator=gen).to(torch.bfloat16),
        "c": torch.randn(5, generator=gen).to(torch.float16),
        "d": torch.randn(300, 1024, generator=gen),
        "e": torch.randn(1000, 333, generator=gen).to(torch.float16),
    }
    rl.save(tensors, path)
    return tensors


def write_unpadded(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file whose header has an odd length (other writers do not pad it):
    every value lies at an odd address."""
    header, data, offset = {}, b"", 0
    for key, tensor in tensors.items():
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        name = reading.DTYPE_NAMES[tensor.dtype]
        header[key] = {"dtype": name, "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    text = json.dumps(header).encode()
    text += b" " * (1 - len(text) % 2)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "odd-header"])
def test_read_values_gives_every_chunk_of_every_tensor(tmp_path, padded):
    tensors = write_odd_file(tmp_path / "m.safetensors")
    if not padded:
        write_unpadded(tensors, tmp_path / "m.safetensors")
    with TensorFile(tmp_path / "m.safetensors") as file:
        for key, expected in tensors.items():
            flat = expected.reshape(-1)
            for step in (flat.numel(), 10_000, 4_099):
                buffer = torch.empty(step, dtype=expected.dtype)
                for begin in range(0, flat.numel(), step):
                    end = min(begin + step, flat.numel())
                    got = file.read_values(key, begin, end, buffer)
                    assert got.dtype == expected.dtype and torch.equal(got, flat[begin:end]), (key, begin)
                    assert got.data_ptr() == buffer.data_ptr(), "read into the caller's buffer"


def test_a_file_cut_short_after_opening_is_one_sentence(tmp_path):
    path = tmp_path / "m.safetensors"
    write_odd_file(path)
    with TensorFile(path) as file:
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size - 1000)
        with pytest.raises(UserError, match=r"^The model file .* is truncated at tensor e; download it again\.$"):
            file.read_values("e", 0, 333_000)


def test_inputs_can_be_replaced_and_deleted_after_a_run(tmp_path):
    """Windows refuses to replace or delete a file while it is open or mapped: nothing of
    either input may outlive the run."""
    from lib_ckpt2lora import extract

    shapes = {"blocks.0.attn.weight": (1024, 1024), "blocks.0.mlp.weight": (2048, 1024)}
    base = rl.base_weights(shapes, seed=0, dtype=torch.float32)
    deltas = {key: 0.01 * torch.randn(shape, generator=rl.generator(1)) for key, shape in shapes.items()}
    base_path = rl.save({k: v.to(torch.bfloat16) for k, v in base.items()}, tmp_path / "base.safetensors")
    variant_path = rl.save(rl.apply_delta(base, deltas, torch.bfloat16), tmp_path / "variant.safetensors")
    opts = ExtractOptions(base=base_path, variant=variant_path, out=tmp_path / "lora.safetensors", min_dim=1)
    extract(opts, log=lambda line: None)
    os.replace(tmp_path / "lora.safetensors", variant_path)
    base_path.unlink()
    if Path("/proc/self/maps").exists():  # Linux: no map of either file is left
        maps = Path("/proc/self/maps").read_text()
        assert "base.safetensors" not in maps and "variant.safetensors" not in maps
