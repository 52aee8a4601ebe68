"""Every setting of one extraction, shared by the CLI, the library and the UI.

Field names and defaults follow the original script's flags (see the README); the
CLI maps ``--rank-thresh`` to ``rank_thresh`` and so on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import UserError

SAVE_DTYPES = ("auto", "fp16", "bf16", "fp32")
# "neo": whatever every Forge Neo era applies fully (comfy for Z-Image, else the default).
FORMATS = ("auto", "neo", "kohya", "diffusers", "diffusion_model", "comfy")
SVD_MODES = ("randomized", "exact")
# What a global rank budget (--target-size / --target-energy) maximises per byte; see budget.py.
BUDGET_OBJECTIVES = ("relative", "energy", "fraction", "balanced")


@dataclass
class ExtractOptions:
    base: Path
    variant: Path
    out: Path | None  # None only for a dry run (list_layers), which writes nothing
    variant2: Path | None = None
    rank: int = 0
    rank_thresh: float = 0.95
    rank_max: int = 64
    min_dim: int = 32
    exclude: str = ""
    include: str = ""
    full_layer: bool = False
    union: bool = False
    alpha: float = 0.5
    checkpoint: bool = False
    checkpoint_full: bool = False
    verbose: bool = False
    summary: bool = False
    detail: bool = False
    detail_scale: float = 1.0
    # Our additions to the original's flags.
    format: str = "auto"
    save_dtype: str = "auto"
    device: str = "auto"
    svd: str = "randomized"
    overwrite: bool = False
    strict: bool = False
    report_json: Path | None = None
    extra_metadata: dict[str, str] = field(default_factory=dict)
    # Where --detail writes; None: <out>_detail.safetensors beside the output. The tab
    # sends a checkpoint's detail LoRA to the Lora folder, where the WebUI lists LoRAs.
    detail_out: Path | None = None
    # A global rank budget instead of the per-layer rule: the file size ("100MB", "1.5GB",
    # bytes) or the model-wide captured fraction; "" / 0 = the per-layer rule.
    target_size: str = ""
    target_energy: float = 0.0
    budget_objective: str = "balanced"
    # Wan 2.2 A14B: which expert file pair this is ("high" / "low" noise; "" = not an expert).
    # Recorded in the LoRA's metadata; see architectures/wan.py and expert_pair below.
    expert: str = ""

    def __post_init__(self) -> None:
        for name in ("base", "variant", "out", "variant2", "report_json", "detail_out"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                setattr(self, name, Path(value))

    @property
    def include_segments(self) -> list[str]:
        return _segments(self.include)

    @property
    def exclude_segments(self) -> list[str]:
        return _segments(self.exclude)

    def validate(self) -> None:
        """Refuse combinations the original refuses or that make no sense, in one sentence."""
        if self.rank < 0:
            raise UserError(f"--rank must be 0 (automatic) or a positive rank, not {self.rank}.")
        if not 0.0 < self.rank_thresh <= 1.0:
            raise UserError(f"--rank-thresh must be in (0, 1], not {self.rank_thresh}.")
        if self.rank_max < 1:
            raise UserError(f"--rank-max must be at least 1, not {self.rank_max}.")
        if self.min_dim < 0:
            raise UserError(f"--min-dim must be 0 or more, not {self.min_dim}.")
        if self.union and self.variant2 is None:
            raise UserError("--union needs a second variant: add --variant2 FILE.")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"--alpha must be in [0, 1], not {self.alpha}.")
        if self.checkpoint and self.checkpoint_full:
            raise UserError("Choose one of --checkpoint and --checkpoint-full, not both.")
        if self.detail and self.checkpoint_full:
            raise UserError(
                "--detail needs a low-rank result to take the residual of and --checkpoint-full has none; "
                "drop one of the two."
            )
        if self.save_dtype not in SAVE_DTYPES:
            raise UserError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, not {self.save_dtype!r}.")
        if self.format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {self.format!r}.")
        if self.svd not in SVD_MODES:
            raise UserError(f"--svd must be one of {', '.join(SVD_MODES)}, not {self.svd!r}.")
        if self.expert not in EXPERTS:
            raise UserError(f"--expert must be high or low (Wan 2.2 A14B's noise experts), not {self.expert!r}.")
        self.validate_budget()
        for path in (self.out, self.detail_out):
            if path is not None and path.suffix.lower() != ".safetensors":
                raise UserError(f"The output {path.name} must end in .safetensors.")

    @property
    def has_budget(self) -> bool:
        return bool(str(self.target_size or "").strip()) or self.target_energy > 0

    def validate_budget(self) -> None:
        if self.budget_objective not in BUDGET_OBJECTIVES:
            raise UserError(
                f"--budget-objective must be one of {', '.join(BUDGET_OBJECTIVES)}, not {self.budget_objective!r}."
            )
        if not 0.0 <= self.target_energy <= 1.0:
            raise UserError(f"--target-energy must be a fraction in (0, 1], e.g. 0.9, not {self.target_energy}.")
        if not self.has_budget:
            return
        from .budget import parse_size

        if str(self.target_size or "").strip():
            parse_size(self.target_size)  # one sentence when it is not a size
            if self.target_energy > 0:
                raise UserError("Choose one of --target-size and --target-energy, not both.")
        wanted = "--target-size" if str(self.target_size or "").strip() else "--target-energy"
        if self.rank > 0:
            raise UserError(
                f"{wanted} chooses every layer's rank itself, so it cannot go with a fixed --rank {self.rank}; "
                "drop one of the two (--rank-max still caps each layer)."
            )
        if self.checkpoint or self.checkpoint_full:
            raise UserError(f"{wanted} sizes a LoRA file; a checkpoint is as large as its base, so drop one of the two.")
        if self.detail:
            raise UserError(
                f"--detail needs each layer's delta again after the ranks are chosen, which {wanted} does not keep; "
                "drop one of the two."
            )

    def as_metadata(self) -> dict[str, str]:
        """The options worth recording in the output's header: file names, never paths."""
        recorded = {}
        for key, value in asdict(self).items():
            if key in ("extra_metadata", "report_json", "out", "detail_out", "verbose", "summary", "overwrite"):
                continue
            if isinstance(value, Path):
                value = value.name
            recorded[key] = value
        return recorded


# -- Wan 2.2 A14B's two experts ------------------------------------------------------------
EXPERTS = ("", "high", "low")


def expert_pair(opts: ExtractOptions, base_low: Path, variant_low: Path) -> tuple[ExtractOptions, ExtractOptions]:
    """One run's options for each Wan 2.2 expert: ``opts`` holds the high-noise pair, the
    low-noise pair comes from ``base_low``/``variant_low``; outputs <out>_high / <out>_low
    (and the --report-json likewise), as Wan users name expert LoRAs (e.g. lightx2v's
    ..._HIGH / ..._LOW files, one per ComfyUI/Neo model loader)."""
    if opts.out is None:
        raise UserError("--base-low/--variant-low write two LoRAs: give --out NAME.safetensors.")
    if opts.variant2 is not None or opts.checkpoint or opts.checkpoint_full:
        raise UserError(
            "--base-low/--variant-low extract one LoRA per expert; drop --variant2, --checkpoint and --checkpoint-full."
        )

    def named(path: Path | None, expert: str) -> Path | None:
        return None if path is None else path.with_name(f"{path.stem}_{expert}{path.suffix}")

    high = replace(opts, expert="high", out=named(opts.out, "high"), report_json=named(opts.report_json, "high"))
    low = replace(opts, base=Path(base_low), variant=Path(variant_low), expert="low")
    low.out, low.report_json = named(opts.out, "low"), named(opts.report_json, "low")
    return high, low


def _segments(text: str) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]
