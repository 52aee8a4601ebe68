"""LoRA files given as a variant: detection (full support follows in its own issue)."""

from __future__ import annotations

from .errors import UserError

LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_", ".lokr_w")
LORA_ENDINGS = (".diff", ".diff_b")


def is_lora_file(infos) -> bool:
    return any(key.endswith(LORA_ENDINGS) or any(m in key for m in LORA_MARKERS) for key in infos)


def lora_source(file, arch, base):
    raise UserError(f"{file.path.name} is a LoRA; LoRA files as variants are not supported yet.")
