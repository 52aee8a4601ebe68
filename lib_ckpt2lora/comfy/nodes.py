"""``Ckpt2LoraExtract``: the extractor as a ComfyUI node.

The node streams the two files itself through ``lib_ckpt2lora.extract`` (never through
ComfyUI's model loader, which would hold two whole models in memory), computes on
ComfyUI's device and writes ``<first loras folder>/<output_name>.safetensors``.

What it relies on in ComfyUI (read in yzkee/ComfyUI @783545f6):
- ``folder_paths.get_filename_list`` / ``get_full_path`` / ``get_folder_paths`` (folder_paths.py);
  COMBO values are checked against their lists before a node runs (execution.py validate_inputs).
- ``comfy.model_management.get_torch_device()``; ``processing_interrupted()`` reads the
  Cancel flag without clearing it; ``throw_exception_if_processing_interrupted()`` clears it
  and raises ``InterruptProcessingException`` (a BaseException), which execution.py reports
  as "interrupted", not as an error.
- ``comfy.utils.ProgressBar(total).update_absolute(value, total)``; the server's progress
  hook (main.py hijack_progress) itself calls ``throw_exception_if_processing_interrupted``,
  so the interrupt may come out of our progress callback: the library lets a BaseException
  through with nothing written.
- A node's exception is shown as ``str(exception)`` (execution.py execute): we raise the
  library's one sentence, with the CLI's flag names turned into this node's input names.

ComfyUI's modules and the engine are imported inside the methods only: importing this
module needs no ComfyUI (pytest imports it too) and adds only ``errors`` and ``options``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import Cancelled, UserError
from ..options import FORMATS, SAVE_DTYPES

MODEL_FOLDERS = ("checkpoints", "diffusion_models")  # where base and variant are listed
LORA_FOLDER = "loras"
LORA_PREFIX = "loras/"  # a variant choice that is a LoRA from the loras folder
NONE_CHOICE = "None"  # variant2's "no second variant"
READABLE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")  # what the library opens

# The library's messages name CLI flags; the node shows its own input names instead.
FLAG_INPUTS = {"--out": "output_name", "--target-size": "target_size_mb"}
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")


def node_text(message: str) -> str:
    """'pass --overwrite' -> "turn on 'overwrite'": the library's sentence in this node's words."""

    message = (message or "").replace("pass --overwrite", "turn on --overwrite")  # a toggle here

    def name(match: re.Match) -> str:
        flag = match.group(0)
        return "'" + FLAG_INPUTS.get(flag, match.group(1).replace("-", "_")) + "'"

    return _FLAG.sub(name, message)


def model_choices() -> list[str]:
    """Files in ComfyUI's checkpoints and diffusion_models folders (names as ComfyUI lists them)."""
    import folder_paths

    names: list[str] = []
    for folder in MODEL_FOLDERS:
        names += [n for n in folder_paths.get_filename_list(folder) if n.lower().endswith(READABLE_SUFFIXES)]
    return sorted(set(names), key=str.lower)


def lora_choices() -> list[str]:
    import folder_paths

    names = folder_paths.get_filename_list(LORA_FOLDER)
    return [LORA_PREFIX + n for n in sorted(names, key=str.lower) if n.lower().endswith(READABLE_SUFFIXES)]


def resolve_choice(choice: str, role: str) -> Path:
    """A COMBO value -> the file's path, or one sentence when it has gone since the list was made."""
    import folder_paths

    if choice.startswith(LORA_PREFIX):
        path = folder_paths.get_full_path(LORA_FOLDER, choice[len(LORA_PREFIX) :])
    else:
        path = next((p for p in (folder_paths.get_full_path(f, choice) for f in MODEL_FOLDERS) if p), None)
    if path is None or not os.path.isfile(path):
        raise UserError(f"The {role} {choice} is no longer in ComfyUI's model folders; refresh the page and choose again.")
    return Path(path)


def compute_device() -> str:
    """ComfyUI's device when the library computes there (CUDA, MPS), else the CPU."""
    import comfy.model_management

    try:
        device = comfy.model_management.get_torch_device()
    except Exception:  # a device ComfyUI cannot name (broken driver): compute on the CPU
        return "cpu"
    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        return f"cuda:{device.index}" if getattr(device, "index", None) is not None else "cuda"
    return "mps" if kind == "mps" else "cpu"  # xpu, npu, DirectML...: the CPU path


class Ckpt2LoraExtract:
    """Extract a LoRA from the difference between a base model and a variant."""

    CATEGORY = "ckpt2lora"
    DESCRIPTION = (
        "Turns the difference between a base model and a fine-tuned or merged variant into a LoRA, "
        "written to the first loras folder. Streams both files layer by layer (no model is loaded)."
    )
    FUNCTION = "extract"
    OUTPUT_NODE = True
    # "*" (ComfyUI's any type): lora_name links into a LoRA loader's lora_name list, which a
    # STRING output cannot (comfy_execution/validation.py validate_node_input), and into
    # STRING inputs alike.
    RETURN_TYPES = ("*", "STRING", "IMAGE")
    RETURN_NAMES = ("lora_name", "summary", "chart")
    OUTPUT_TOOLTIPS = (
        "The LoRA's name in the loras folder: link it to a LoRA loader's lora_name.",
        "The summary table: rank and captured energy per group.",
        "The rank/energy chart.",
    )

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        models = model_choices()
        return {
            "required": {
                "base": (models, {"tooltip": "The model the variant was made from (checkpoints, diffusion_models)."}),
                "variant": (models + lora_choices(), {"tooltip": "The fine-tuned or merged model, or a LoRA to re-extract."}),
                "output_name": ("STRING", {"default": "ckpt2lora", "tooltip": "File name in the loras folder (no extension)."}),
                "rank": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "LoRA rank; 0 = automatic per layer."}),
                "rank_thresh": (
                    "FLOAT",
                    {"default": 0.95, "min": 0.01, "max": 1.0, "step": 0.005, "tooltip": "Energy the automatic rank keeps."},
                ),
                "rank_max": ("INT", {"default": 64, "min": 1, "max": 4096, "tooltip": "Cap of the automatic rank."}),
            },
            "optional": {
                "variant2": ([NONE_CHOICE] + models + lora_choices(), {"tooltip": "A second variant: common part, or union."}),
                "union": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Weighted union of the two variants instead of their common part."},
                ),
                "alpha": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "Union balance."}),
                "target_size_mb": (
                    "FLOAT",
                    {"default": 0.0, "min": 0.0, "max": 100000.0, "step": 1.0, "tooltip": "File size to aim at (MB); 0 = off."},
                ),
                "format": (list(FORMATS), {"default": "auto", "tooltip": "LoRA key format; auto applies whole in ComfyUI."}),
                "min_dim": ("INT", {"default": 32, "min": 0, "max": 65536, "tooltip": "Skip layers smaller than this."}),
                "include": ("STRING", {"default": "", "tooltip": "Comma-separated key segments to keep only."}),
                "exclude": ("STRING", {"default": "", "tooltip": "Comma-separated key segments to skip."}),
                "save_dtype": (list(SAVE_DTYPES), {"default": "auto"}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
            },
        }

    def extract(self, base, variant, output_name, rank, rank_thresh, rank_max, **optional):
        try:
            return run_node(base, variant, output_name, rank, rank_thresh, rank_max, **optional)
        except UserError as error:
            raise UserError(node_text(error.message)) from None


def run_node(
    base: str,
    variant: str,
    output_name: str,
    rank: int,
    rank_thresh: float,
    rank_max: int,
    variant2: str = NONE_CHOICE,
    union: bool = False,
    alpha: float = 0.5,
    target_size_mb: float = 0.0,
    format: str = "auto",  # noqa: A002 (the node's input name)
    min_dim: int = 32,
    include: str = "",
    exclude: str = "",
    save_dtype: str = "auto",
    overwrite: bool = False,
):
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths

    from ..extract import extract
    from ..options import ExtractOptions
    from ..ui.job import output_path
    from .chart_image import chart_image

    if base.startswith(LORA_PREFIX):
        raise UserError("The base must be a model, not a LoRA.")
    base_path = resolve_choice(base, "base")
    variant_path = resolve_choice(variant, "variant")
    second = variant2 if variant2 and variant2 != NONE_CHOICE else None
    variant2_path = resolve_choice(second, "variant2") if second else None
    seen: dict[Path, str] = {}
    for role, path in (("base", base_path), ("variant", variant_path), ("variant2", variant2_path)):
        if path is None:
            continue
        if path.resolve() in seen:
            raise UserError(f"The {role} {path.name} is the same file as the {seen[path.resolve()]}; choose a different {role}.")
        seen[path.resolve()] = role
    if union and variant2_path is None:
        raise UserError("'union' needs a second variant: choose one in 'variant2'.")
    lora_root = Path(folder_paths.get_folder_paths(LORA_FOLDER)[0])
    lora_root.mkdir(parents=True, exist_ok=True)
    out = output_path(lora_root, output_name)  # one sentence for a name that leaves the folder
    out.parent.mkdir(parents=True, exist_ok=True)
    opts = ExtractOptions(
        base=base_path,
        variant=variant_path,
        variant2=variant2_path,
        out=out,
        rank=int(rank),
        rank_thresh=float(rank_thresh),
        rank_max=int(rank_max),
        union=bool(union),
        alpha=float(alpha),
        target_size=f"{float(target_size_mb):g}MB" if target_size_mb and float(target_size_mb) > 0 else "",
        format=format or "auto",
        min_dim=int(min_dim),
        include=include or "",
        exclude=exclude or "",
        save_dtype=save_dtype or "auto",
        device=compute_device(),
        overwrite=bool(overwrite),
    )
    bar = None

    def progress(done: int, total: int, _layer: str) -> None:
        nonlocal bar
        if bar is None:
            bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)  # the hook may raise InterruptProcessingException here

    try:
        result = extract(opts, progress=progress, should_stop=mm.processing_interrupted, log=_log)
    except Cancelled:
        mm.throw_exception_if_processing_interrupted()  # clears ComfyUI's flag and raises its interrupt
        raise mm.InterruptProcessingException() from None
    report = result.report
    summary = report.summary_text()
    if report.warnings:
        summary += "\n" + "\n".join("Warning: " + node_text(w) for w in report.warnings)
    lora_name = os.path.relpath(out, lora_root)  # as folder_paths.get_filename_list("loras") names it
    return {"ui": {"text": [summary]}, "result": (lora_name, summary, chart_image(report.to_dict()))}


def _log(message: str) -> None:
    import logging

    logging.getLogger("ckpt2lora").info(node_text(message))


NODE_CLASS_MAPPINGS = {"Ckpt2LoraExtract": Ckpt2LoraExtract}
NODE_DISPLAY_NAME_MAPPINGS = {"Ckpt2LoraExtract": "Extract LoRA (ckpt2lora)"}
