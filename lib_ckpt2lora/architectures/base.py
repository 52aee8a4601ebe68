"""What an architecture module provides, and the file view built from it.

An architecture turns a file's raw keys into *canonical* keys: one name per weight the
LoRA can address, whatever the file's layout (prefixes stripped, fused q|k|v weights
split into row ranges). Base and variant are matched by canonical key, so an
all-in-one base pairs with a diffusion-model-only variant, and an original-layout
Z-Image pairs with a diffusers-layout one. Each architecture also names the LoRA
module of every canonical weight in each output format, and groups it for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..reading import TensorFile, TensorInfo


@dataclass(frozen=True)
class RawRef:
    """Where a canonical tensor lives in a file: a key, and a row range of it if fused."""

    key: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class LoraStyle:
    """How a LoRA format spells one module, and how it records the scale.

    ``alpha``: "shared" writes one alpha (the rank cap) on every module with rank/alpha
    folded into the factors; "own" writes alpha = the module's rank; "none" writes no
    alpha (loaders then take alpha = rank). ``adapter_config``: also write a peft
    LoraConfig (ranks and alphas per module) in the header, which older diffusers need
    to scale modules of different ranks correctly.
    """

    down: str
    up: str
    alpha: str = "shared"
    adapter_config: bool = False

    @property
    def writes_alpha(self) -> bool:
        return self.alpha != "none"


KOHYA_STYLE = LoraStyle(".lora_down.weight", ".lora_up.weight", alpha="shared")
PEFT_STYLE = LoraStyle(".lora_A.weight", ".lora_B.weight", alpha="none")


@dataclass(frozen=True)
class Group:
    """Where a layer sits in the report: a level (main or auxiliary) and a type."""

    level: str
    type: str
    auxiliary: bool = False
    order: int = 0


def block_level_group(block: int, kind: str, per_level: int) -> Group:
    """The report level of main block ``block``: L1 (blk 0-5), L2 (blk 6-11), ..."""
    level = block // per_level
    first = level * per_level
    return Group(f"L{level + 1} (blk {first}-{first + per_level - 1})", kind, order=level)


class Architecture:
    """Base class; one subclass per model family, each in its own module."""

    name = "generic"
    title = "unknown architecture"
    base_model_version = "unknown"
    modelspec_architecture = "unknown/lora"
    formats: dict[str, LoraStyle] = {"kohya": KOHYA_STYLE}
    default_format = "kohya"

    # -- detection -------------------------------------------------------------------
    @classmethod
    def detect(cls, infos: dict[str, TensorInfo]) -> Architecture | None:
        """Return an instance configured for this file (e.g. its key prefix), or None."""
        raise NotImplementedError

    def describe(self, infos: dict[str, TensorInfo]) -> str:
        """A few words on what the file holds, for the one-line detection report."""
        return self.title

    # -- keys --------------------------------------------------------------------------
    def canonical(self, raw_key: str, info: TensorInfo) -> list[tuple[str, RawRef, tuple[int, ...]]]:
        """Canonical entries of one raw key: (canonical key, where it is, its shape)."""
        raise NotImplementedError

    def module_path(self, canonical_key: str) -> str | None:
        """The LoRA module (before the format's prefix) of a canonical key, or None."""
        raise NotImplementedError

    def lora_module(self, canonical_key: str, fmt: str) -> str | None:
        path = self.module_path(canonical_key)
        return None if path is None else self.format_prefix(fmt) + path

    def fusion(self, canonical_key: str, fmt: str) -> tuple[str, ...] | None:
        """Keys written as one fused LoRA module in this format, when ``canonical_key``
        leads such a group; () when another key leads its group; None when not fused."""
        return None

    def lora_aliases(self, canonical_key: str) -> list[str]:
        """Every module name a LoRA file may use for this weight (any prefix, any style)."""
        names = {self.lora_module(canonical_key, fmt) for fmt in self.formats}
        return sorted(name for name in names if name)

    def fused_aliases(self, canonical_keys) -> dict[str, list[tuple[str, tuple[int, int]]]]:
        """LoRA module names that cover several canonical weights by row ranges of up."""
        return {}

    def format_prefix(self, fmt: str) -> str:
        return ""

    def group(self, canonical_key: str) -> Group:
        raise NotImplementedError

    # The format every Forge Neo era applies fully ("--format neo"); only Z-Image differs.
    neo_format: str | None = None
    # format -> which loaders apply it (the CLI prints it beside the saved file)
    format_loaders: dict[str, str] = {}
    # The "not derived from the base" warning's example of a pair that does not belong together.
    mixup_hint = "e.g. do not mix Z-Image Base and Turbo"
    # Whether the model comes as expert files (Wan 2.2 A14B: high-noise, low-noise), so --expert applies.
    has_experts = False

    def resolve_format(self, fmt: str) -> str:
        if fmt == "neo":
            return self.neo_format or self.default_format
        return self.default_format if fmt in ("auto", "", None) else fmt


@dataclass
class FileView:
    """A file's tensors under canonical keys."""

    file: TensorFile
    arch: Architecture
    refs: dict[str, RawRef]
    shapes: dict[str, tuple[int, ...]]
    # ComfyUI fp8 files: weight raw key -> its scale's raw key (scaled_fp8.py, TensorFile)
    scales: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, file: TensorFile, arch: Architecture) -> FileView:
        refs: dict[str, RawRef] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for raw_key, info in file.infos.items():
            for key, ref, shape in arch.canonical(raw_key, info):
                refs[key] = ref
                shapes[key] = shape
        return cls(file, arch, refs, shapes, getattr(file, "fp8_scales", {}))

    def dtype(self, key: str):
        return self.file.infos[self.refs[key].key].dtype

    def read(self, key: str):
        ref = self.refs[key]
        return self.file.get(ref.key, ref.rows)  # ComfyUI fp8 weights come dequantized


# -- shared by the DiT families (Flux.1/Chroma, Qwen-Image, Lumina-Image-2.0) ---------------
# Where their diffusion weights sit: ComfyUI all-in-one files, ComfyUI diffusion-model files,
# diffusers' transformer, or bare.
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "")
# Top-level parts of an all-in-one file that are not the diffusion model (text encoders, VAE).
NOT_DIFFUSION = ("text_encoders.", "vae.", "cond_stage_model.", "conditioner.", "first_stage_model.", "model.")


def diffusion_key(prefix: str, raw_key: str) -> str | None:
    """``raw_key`` without the file's ``prefix``, or None when it is not a diffusion-model key."""
    if not raw_key.startswith(prefix):
        return None
    key = raw_key[len(prefix) :]
    if prefix in ("", "transformer.") and key.startswith(NOT_DIFFUSION):
        return None
    return key


def count_blocks(infos: dict[str, TensorInfo], head: str) -> int:
    """How many numbered blocks ``head<N>.`` the file holds."""
    return len({k[len(head) :].split(".")[0] for k in infos if k.startswith(head)})


def skipped_parts(arch: Architecture, infos: dict[str, TensorInfo], what: str) -> str:
    """The detection line's note on the top-level parts no LoRA module covers."""
    others = sorted({k.split(".")[0] for k in infos if not arch.canonical(k, infos[k])})
    return f"; {', '.join(others)} skipped ({what}: not extracted)" if others else ""


def strip_weight_suffix(canonical_key: str) -> tuple[str, str]:
    """Split 'a.b.weight' into ('a.b', 'weight'); keys without a suffix keep ''."""
    module, _, param = canonical_key.rpartition(".")
    if param in ("weight", "bias"):
        return module, param
    return canonical_key, ""
