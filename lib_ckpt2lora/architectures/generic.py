"""Any other model: every tensor keeps its own key, LoRA names in ComfyUI's form.

This is how a user adapts the tool to a model we do not know: ComfyUI maps
``diffusion_model.<key without .weight>`` onto any diffusion model's weights.
"""

from __future__ import annotations

from .base import Architecture, Group, RawRef, strip_weight_suffix

STRIP = ("model.diffusion_model.", "diffusion_model.")


class Generic(Architecture):
    name = "generic"
    title = "unknown architecture (generic mode)"

    @classmethod
    def detect(cls, infos):
        return cls()

    def describe(self, infos):
        return f"an unrecognised architecture ({len(infos)} tensors), processed generically"

    def canonical(self, raw_key, info):
        key = raw_key
        for prefix in STRIP:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        return [(key, RawRef(raw_key), info.shape)]

    def module_path(self, canonical_key):
        module, param = strip_weight_suffix(canonical_key)
        return module if param else None

    def format_prefix(self, fmt):
        return "diffusion_model."

    def group(self, canonical_key):
        top = canonical_key.split(".")[0]
        kind = "Attn" if "attn" in canonical_key or "attention" in canonical_key else "Other"
        return Group(top, kind, auxiliary=True, order=100)
