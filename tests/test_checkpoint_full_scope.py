"""What ``--checkpoint-full`` changes, as the CLI help and README say: the selected layers
get base + full delta; 1-D weights (norms, biases) stay at the base unless
``--full-layer``, and with it the output is the variant on every float weight."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from lib_ckpt2lora.demo import zimage_shapes
from lib_ckpt2lora.extract import extract
from lib_ckpt2lora.options import ExtractOptions


def _pair(folder):
    generator = torch.Generator().manual_seed(3)
    base, variant = {}, {}
    for key, shape in zimage_shapes(dim=64, blocks=1, refiners=1).items():
        weight = torch.randn(shape, generator=generator) * 0.02 + (1.0 if len(shape) == 1 else 0.0)
        base[key] = weight.to(torch.bfloat16)
        variant[key] = (weight + 0.01 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
    save_file(base, str(folder / "base.safetensors"))
    save_file(variant, str(folder / "variant.safetensors"))
    return base, variant


def test_checkpoint_full_leaves_1d_weights_at_base_unless_full_layer(tmp_path):
    base, variant = _pair(tmp_path)
    one_d = [k for k, v in base.items() if v.dim() == 1]
    assert one_d and all(not torch.equal(base[k], variant[k]) for k in one_d)
    for full_layer in (False, True):
        out = tmp_path / f"full_{full_layer}.safetensors"
        extract(
            ExtractOptions(
                base=tmp_path / "base.safetensors",
                variant=tmp_path / "variant.safetensors",
                out=out,
                checkpoint_full=True,
                full_layer=full_layer,
                min_dim=1,
            ),
            log=lambda line: None,
        )
        written = load_file(str(out))
        assert set(written) == set(base)
        for key, value in written.items():
            expected = variant[key] if (full_layer or base[key].dim() >= 2) else base[key]
            assert value.dtype == base[key].dtype
            assert torch.equal(value, expected), (full_layer, key)
