"""A self-contained demonstration: build a small Z-Image-layout pair, extract, compare.

The pair has Z-Image's real key names and structure (fused qkv, refiners, embedders,
pad tokens) at a reduced width; the variant adds to every weight a delta with a
decaying singular spectrum plus faint dense noise, as fine-tunes do. Run with
``python -m lib_ckpt2lora.demo [--dir DIR] [--overwrite]``; the pair and the LoRA stay in
``./demo/`` (or DIR) for the user to open, and a second run refuses to replace them
unless asked.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .budget import format_size
from .options import ExtractOptions


def zimage_shapes(dim: int = 384, blocks: int = 6, refiners: int = 2) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an original-layout Z-Image transformer scaled to width ``dim``."""
    hidden, head = dim * 8 // 3, 128 if dim >= 1024 else 32
    cap, t_dim, ada = dim * 2 // 3, 256, min(dim, 256)
    shapes: dict[str, tuple[int, ...]] = {
        "x_pad_token": (1, dim),
        "cap_pad_token": (1, dim),
        "x_embedder.weight": (dim, 64),
        "x_embedder.bias": (dim,),
        "t_embedder.mlp.0.weight": (1024, t_dim),
        "t_embedder.mlp.0.bias": (1024,),
        "t_embedder.mlp.2.weight": (ada, 1024),
        "t_embedder.mlp.2.bias": (ada,),
        "cap_embedder.0.weight": (cap,),
        "cap_embedder.1.weight": (dim, cap),
        "cap_embedder.1.bias": (dim,),
        "final_layer.linear.weight": (64, dim),
        "final_layer.linear.bias": (64,),
        "final_layer.adaLN_modulation.1.weight": (dim, ada),
        "final_layer.adaLN_modulation.1.bias": (dim,),
    }
    names = [f"layers.{i}" for i in range(blocks)]
    names += [f"noise_refiner.{i}" for i in range(refiners)] + [f"context_refiner.{i}" for i in range(refiners)]
    for block in names:
        shapes.update(
            {
                f"{block}.attention.qkv.weight": (3 * dim, dim),
                f"{block}.attention.out.weight": (dim, dim),
                f"{block}.attention.q_norm.weight": (head,),
                f"{block}.attention.k_norm.weight": (head,),
                f"{block}.feed_forward.w1.weight": (hidden, dim),
                f"{block}.feed_forward.w3.weight": (hidden, dim),
                f"{block}.feed_forward.w2.weight": (dim, hidden),
                f"{block}.attention_norm1.weight": (dim,),
                f"{block}.attention_norm2.weight": (dim,),
                f"{block}.ffn_norm1.weight": (dim,),
                f"{block}.ffn_norm2.weight": (dim,),
            }
        )
        if not block.startswith("context_refiner"):
            shapes[f"{block}.adaLN_modulation.0.weight"] = (4 * dim, ada)
            shapes[f"{block}.adaLN_modulation.0.bias"] = (4 * dim,)
    return shapes


def fine_tune_delta(shape: tuple[int, int], relative: float, generator: torch.Generator) -> torch.Tensor:
    """A delta with a decaying spectrum (s_i ~ 1/i over up to 128 directions) plus noise."""
    rows, cols = shape
    k = min(rows, cols, 128)
    u = torch.linalg.qr(torch.randn(rows, k, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(cols, k, generator=generator))[0]
    spectrum = 1.0 / torch.arange(1, k + 1, dtype=torch.float32) ** 1.2
    delta = (u * spectrum) @ v.T
    delta += 0.01 * delta.norm() / (rows * cols) ** 0.5 * torch.randn(rows, cols, generator=generator)
    return delta * (relative * 0.02 * (rows * cols) ** 0.5 / delta.norm())


def make_pair(folder: Path, dim: int = 384, blocks: int = 6, seed: int = 0) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    base, variant = {}, {}
    for key, shape in zimage_shapes(dim, blocks).items():
        weight = torch.randn(shape, generator=generator) * 0.02
        if len(shape) == 1 and key.endswith("norm.weight") or key.endswith(("norm1.weight", "norm2.weight")):
            weight += 1.0
        base[key] = weight.to(torch.bfloat16)
        changed = weight + fine_tune_delta(shape, 0.03, generator) if len(shape) == 2 and min(shape) > 1 else weight
        variant[key] = changed.to(torch.bfloat16)
    paths = folder / "demo_base.safetensors", folder / "demo_variant.safetensors"
    save_file(base, str(paths[0]))
    save_file(variant, str(paths[1]))
    return paths


def fidelity(base_path: Path, variant_path: Path, lora_path: Path, report) -> tuple[float, float]:
    """Relative error of base+LoRA vs the variant, over the extracted layers: weights and outputs."""
    from safetensors import safe_open

    from . import architectures
    from .reading import TensorFile

    errors, output_errors = [], []
    generator = torch.Generator().manual_seed(0)  # the same probe inputs every run: identical runs, identical figures
    with TensorFile(base_path) as base, TensorFile(variant_path) as variant, safe_open(str(lora_path), "pt") as lora:
        arch = architectures.detect(base.infos)
        base_view = architectures.FileView.build(base, arch)
        variant_view = architectures.FileView.build(variant, arch)
        for record in report.layers:
            delta = variant_view.read(record.key).float() - base_view.read(record.key).float()
            up = lora.get_tensor(record.name + ".lora_B.weight").float()
            down = lora.get_tensor(record.name + ".lora_A.weight").float()
            approx = up.flatten(1) @ down.flatten(1)
            errors.append(float((delta - approx).norm() / delta.norm()))
            probe = torch.randn(delta.shape[1], 16, generator=generator)
            weight = base_view.read(record.key).float()
            target = (weight + delta) @ probe
            output_errors.append(float(((weight + approx) @ probe - target).norm() / (target - weight @ probe).norm()))
    return sum(errors) / len(errors), sum(output_errors) / len(output_errors)


DEMO_FILES = ("demo_base.safetensors", "demo_variant.safetensors", "demo_lora.safetensors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lib_ckpt2lora.demo",
        description="Build a small Z-Image-layout pair, extract a LoRA, report fidelity. The files stay in --dir.",
    )
    parser.add_argument("--dir", default="demo", help="folder for the demo's files (default: ./demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace the demo files of an earlier run in --dir")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--blocks", type=int, default=6)
    args = parser.parse_args(argv)
    from .errors import Cancelled, UserError

    try:
        run(Path(args.dir), args.dim, args.blocks, args.overwrite)
    except (UserError, Cancelled) as error:
        print(f"ckpt2lora demo: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ckpt2lora demo: Interrupted.", file=sys.stderr)
        return 130
    return 0


def run(folder: Path, dim: int, blocks: int, overwrite: bool) -> Path:
    """Build the pair in ``folder``, extract, print the report and how to load the LoRA."""
    from .errors import UserError
    from .extract import extract

    # Checked before anything is built: a second run must not silently replace files
    # the user may have moved into a WebUI or compared against.
    existing = [folder / name for name in DEMO_FILES if (folder / name).exists()]
    if existing and not overwrite:
        raise UserError(
            f"{existing[0]} is already there from an earlier demo; pass --overwrite to replace the demo's files, "
            "or --dir NEW_FOLDER to keep them."
        )
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base, variant = make_pair(folder, dim, blocks)
    print(f"Built a Z-Image-layout pair (width {dim}, {blocks} blocks) in {folder}.")
    out = folder / "demo_lora.safetensors"
    result = extract(ExtractOptions(base=base, variant=variant, out=out, overwrite=True))
    elapsed = time.perf_counter() - started
    print(result.report.summary_text())
    weight_error, output_error = fidelity(base, variant, out, result.report)
    total = result.report.total()
    print(f"LoRA: {out} ({format_size(out.stat().st_size)}), {total['n']} layers, mean rank {total['rank']:.1f}.")
    print(f"Captured energy (mean over layers): {100 * total['energy']:.1f}% (threshold 95%).")
    print(f"Relative error of base+LoRA vs variant: delta weights {weight_error:.3f}, layer outputs {output_error:.3f}.")
    print(f"Done in {elapsed:.1f} s. The files stay in {folder}; delete the folder when done.")
    print(how_to_load(out, dim))
    return out


def how_to_load(lora: Path, dim: int) -> str:
    """How a LoRA from this tool is loaded, with this one's caveat: it fits the demo's
    reduced-width model, not a real Z-Image."""
    name = lora.stem
    return "\n".join(
        (
            f"This LoRA fits the demo's small model (width {dim}), not a real Z-Image (width 3840); a LoRA you "
            "extract from your own models loads like this:",
            f"  WebUI (Forge Neo for Z-Image; A1111/Forge for SD1.5/SDXL): copy it into models/Lora, then put "
            f"<lora:{name}:1> in the prompt, with the base model selected.",
            f'  diffusers: pipe.load_lora_weights("{lora.parent.as_posix()}", weight_name="{lora.name}")',
            f"  ComfyUI: copy it into models/loras and pick {lora.name} in a LoraLoader node.",
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
