"""Check fp8 (comfy_quant) Flux.2 Klein files against REAL ComfyUI, outside CI (it needs a ComfyUI checkout).

    .venv/bin/python tests/measure_comfy_quant_in_comfyui.py make DIR
    COMFY_PYTHON tests/measure_comfy_quant_in_comfyui.py check DIR COMFYUI_DIR

``make`` (this project's venv: diffusers builds the model) writes a Flux.2 Klein-shaped model
(256 wide: ComfyUI's Flux.2 detection takes heads of 128) as bf16 base and fine-tune, the base
quantized as in tests/test_comfy_quant.py in three layouts (bare with markers; all-in-one with
header metadata only, e5m2; all-in-one with both), and extracts a LoRA from each fp8 base.
``check`` (ComfyUI's own Python, with comfy_kitchen) loads each fp8 base with ComfyUI's UNET
loader (``comfy.sd.load_diffusion_model``: convert_old_quants + MixedPrecisionOps), compares
each layer ComfyUI dequantizes with ckpt2lora's reading of it, maps the LoRA with
``comfy.lora.model_lora_keys_unet`` / ``load_lora`` and applies every patch with
``comfy.lora.calculate_weight`` onto ComfyUI's weight: that must be the fine-tune's weight.
Result (2026-12-07, ComfyUI 0.33.0 with comfy_kitchen 0.2.31, CPU, where ComfyUI computes in
float32): 20 quantized layers per file, ComfyUI's dequantized weights equal ours exactly (max
difference 0), 31 of 31 LoRA modules mapped, every patched weight within 1.9e-3 of the
fine-tune's (relative to its delta; unquantized layers show the same order, 1.2e-3: it is the
default rank rule's, not the fp8 reading's). On a GPU ComfyUI rounds the dequantized weight to
its bf16/fp16 compute dtype.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("bfl-markers", "all-in-one-metadata-e5m2", "all-in-one-both-full-names")


def make(folder: Path) -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import test_comfy_quant as cq
    import test_flux2 as f2
    import tiny_models as tm
    import torch

    torch.set_num_threads(1)
    folder.mkdir(parents=True, exist_ok=True)
    model = f2.transformer(seed=0, attention_head_dim=128, num_attention_heads=2, axes_dims_rope=(32, 32, 32, 32))
    base = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    variant = {k: v.to(torch.bfloat16) for k, v in tm.make_variant(base, seed=1).items()}
    variant_path = cq.save(cq.klein_file(variant), folder / "variant.safetensors")
    for case in CASES:
        layout, prefix, fmt, markers, metadata_prefix = cq.KLEIN_CASES[case]
        tensors, header = cq.comfy_quantize(cq.klein_file(base, layout, prefix), cq.in_blocks, fmt, markers, metadata_prefix)
        base_path = cq.save(tensors, folder / f"base-{case}.safetensors", header)
        _, lines = cq.extract_logged(base_path, variant_path, folder / f"lora-{case}.safetensors")
        print(lines[0])


def check(folder: Path, comfyui: Path) -> None:
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path[:0] = [str(comfyui), str(ROOT)]
    import comfy.options
    import torch

    comfy.options.enable_args_parsing()  # --cpu, before comfy.model_management is imported
    import comfy.lora
    import comfy.lora_convert
    import comfy.sd
    from comfy.quant_ops import QuantizedTensor
    from safetensors.torch import load_file

    from lib_ckpt2lora.reading import TensorFile

    torch.set_num_threads(1)
    variant = load_file(str(folder / "variant.safetensors"))
    for case in CASES:
        patcher = comfy.sd.load_diffusion_model(str(folder / f"base-{case}.safetensors"))
        weights, quantized = {}, 0
        for name, module in patcher.model.diffusion_model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                quantized += isinstance(weight, QuantizedTensor)
                real = weight.dequantize() if isinstance(weight, QuantizedTensor) else weight.detach()
                weights[f"diffusion_model.{name}.weight"] = real.float()
        prefix = "model.diffusion_model." if case.startswith("all-in-one") else ""
        differences = []
        with TensorFile(folder / f"base-{case}.safetensors") as file:
            for key in file.infos:
                name = "diffusion_model." + key[len(prefix) :]
                if key.startswith(prefix) and name in weights:
                    ours = file.get(key).float()
                    differences.append(float((ours - weights[name]).abs().max() / ours.abs().max()))
        lora = load_file(str(folder / f"lora-{case}.safetensors"))
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), comfy.lora.model_lora_keys_unet(patcher.model, {}))
        errors = []
        for target, patch in patches.items():
            key = target if isinstance(target, str) else target[0]
            patched = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], weights[key].clone(), key, torch.float32)
            wanted = variant[key[len("diffusion_model.") :]].float()
            errors.append(float((patched - wanted).norm() / (wanted - weights[key]).norm()))
        modules = len({k.split(".")[0] for k in lora})
        print(
            f"{case}: {quantized} layers quantized in ComfyUI; max |ComfyUI's weight - ours| / max |w| = "
            f"{max(differences):.3g} over {len(differences)} weights; {len(patches)} of {modules} LoRA modules mapped; "
            f"max relative error of the patched weights vs the fine-tune = {max(errors):.2e}"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["make"]:
        make(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["check"]:
        check(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(__doc__)
