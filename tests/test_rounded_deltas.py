"""The reader hands a LoRA run's delta over in bf16 where the SVD multiplies bf16 anyway
(extract.Runner.rounds, sources.read_deltas(rounded=True)): the same LoRA as from the fp32
delta, tensor for tensor; an exactly low-rank delta still comes out exact (its fp32 delta is
read again for the refinement); where rounding does not apply, the delta stays fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import realistic as rl
import torch
from safetensors.torch import load_file, save_file

from lib_ckpt2lora import extract, svd
from lib_ckpt2lora.options import ExtractOptions

Runner = extract.__globals__["Runner"]  # the package exports the function, the module holds the class

# two on the bf16 route, one small enough for the exact (Gram) route, which takes fp32
SHAPES = {"blocks.0.attn.weight": (1024, 1536), "blocks.0.mlp.weight": (1536, 1024), "blocks.0.small.weight": (256, 1024)}
ROUNDED = {"blocks.0.attn.weight", "blocks.0.mlp.weight"}


@pytest.fixture(autouse=True)
def bf16_products(monkeypatch):
    monkeypatch.setattr(svd, "BF16_ON_CPU", True)
    if not svd.bf16_is_faster_on_cpu():
        pytest.skip("this CPU has no fast bf16: deltas are never rounded")


def write_pair(folder: Path, deltas: dict[str, torch.Tensor], dtype=torch.bfloat16) -> tuple[Path, Path]:
    base = {key: (rl.WEIGHT_STD * torch.randn(shape, generator=rl.generator(7))).to(dtype) for key, shape in SHAPES.items()}
    variant = {key: (value.float() + deltas.get(key, 0)).to(dtype) for key, value in base.items()}
    save_file(base, str(folder / "base.safetensors"))
    save_file(variant, str(folder / "variant.safetensors"))
    return folder / "base.safetensors", folder / "variant.safetensors"


def run(folder: Path, name: str, base: Path, variant: Path, **options) -> dict[str, torch.Tensor]:
    out = folder / f"{name}.safetensors"
    extract(ExtractOptions(base=base, variant=variant, out=out, device="cpu", **options), log=lambda _: None)
    return load_file(str(out))


def watch_rounding(monkeypatch) -> list[tuple[str, torch.dtype]]:
    """(unit key, dtype) of every delta the reader handed over."""
    seen = []
    real = Runner.read_deltas

    def read(self, unit, bases):
        loaded = real(self, unit, bases)
        seen.extend((unit.key, item.tensor.dtype) for item in loaded[1][0])
        return loaded

    monkeypatch.setattr(Runner, "read_deltas", read)
    return seen


def test_the_lora_is_the_one_from_the_fp32_delta(tmp_path, monkeypatch):
    deltas = {key: rl.noisy_delta(*shape, seed=i) for i, (key, shape) in enumerate(SHAPES.items())}
    base, variant = write_pair(tmp_path, deltas)
    seen = watch_rounding(monkeypatch)
    rounded = run(tmp_path, "rounded", base, variant)
    assert sorted(seen) == sorted((key, torch.bfloat16 if key in ROUNDED else torch.float32) for key in deltas)
    monkeypatch.setattr(Runner, "rounds", lambda self, unit: False)
    seen.clear()
    plain = run(tmp_path, "plain", base, variant)
    assert {dtype for _, dtype in seen} == {torch.float32}
    assert rounded.keys() == plain.keys() and any(key.endswith("lora_down.weight") for key in plain)
    for key in plain:
        assert torch.equal(rounded[key], plain[key]), key


def test_an_exactly_low_rank_delta_is_refined_from_the_fp32_delta_read_again(tmp_path, monkeypatch):
    """A LoRA merged in fp32 (the variant as a LoRA would make it): bf16 products find its
    space only to bf16 precision; the refinement reads the fp32 delta again and the LoRA
    reproduces the delta to fp32 precision."""
    gen = rl.generator(3)
    key, shape = "blocks.0.attn.weight", SHAPES["blocks.0.attn.weight"]
    low = (rl.signal_from(rl.orthonormal(shape[0], 12, gen), rl.orthonormal(shape[1], 12, gen), rl.decaying_spectrum(12, 0.7))
           .float() * 0.01)  # fmt: skip
    base, variant = write_pair(tmp_path, {key: low}, dtype=torch.float32)
    seen = watch_rounding(monkeypatch)
    reread = []
    real = Runner._exact_delta
    monkeypatch.setattr(Runner, "_exact_delta", lambda self, *a: reread.append(a[0]) or real(self, *a))
    lora = run(tmp_path, "lora", base, variant, rank_thresh=0.999999)
    assert (key, torch.bfloat16) in seen
    assert reread == [key]
    module = next(name.removesuffix(".lora_up.weight") for name in lora if name.endswith(".lora_up.weight") and "attn" in name)
    up, down = lora[module + ".lora_up.weight"].float(), lora[module + ".lora_down.weight"].float()
    scale = float(lora[module + ".alpha"]) / down.shape[0] if module + ".alpha" in lora else 1.0
    delta = load_file(str(variant))[key] - load_file(str(base))[key]
    error = float((scale * up @ down - delta).norm() / delta.norm())
    assert error < 1e-3, error  # fp16 factors (the default save dtype): ~1e-4


@pytest.mark.parametrize("options", [{"detail": True}, {"svd": "exact"}], ids=["detail", "exact"])
def test_runs_that_need_the_fp32_delta_get_it(tmp_path, monkeypatch, options):
    deltas = {key: rl.noisy_delta(*shape, seed=i) for i, (key, shape) in enumerate(SHAPES.items())}
    base, variant = write_pair(tmp_path, deltas)
    seen = watch_rounding(monkeypatch)
    run(tmp_path, "lora", base, variant, **options)
    assert seen and {dtype for _, dtype in seen} == {torch.float32}
