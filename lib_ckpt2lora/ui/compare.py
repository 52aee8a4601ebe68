"""Compare: the txt2img prompt and seed generated twice, variant vs base + LoRA at weight 1.

No gradio here. The host generates (``services.generate``, the WebUI's own processing and
queue); this module decides what to generate and how alike the two images are: the mean
absolute pixel difference and SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
K1 0.01, K2 0.03, on the luminance), in numpy only.
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
import re
from dataclasses import dataclass, field, fields

import numpy as np

from ..errors import UserError
from . import job

INTERRUPTED = "Interrupted: Compare stopped before both images were made."


@dataclass
class Txt2imgSettings:
    """What Compare takes from the txt2img tab (read in the page by ckpt2lora.js)."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 20
    width: int = 512
    height: int = 512
    cfg_scale: float = 7.0
    sampler_name: str = ""  # "" = the WebUI's default sampler
    scheduler: str = ""  # "" = the WebUI's default ("Automatic"); A1111 1.9+, Forge, Neo


def parse_settings(text: str | None) -> Txt2imgSettings:
    """The page's JSON, each value checked; missing or unreadable values take the defaults."""
    try:
        raw = json.loads(text or "{}")
    except ValueError:
        raw = {}
    if not isinstance(raw, dict):
        raw = {}
    settings = Txt2imgSettings()
    for f in fields(Txt2imgSettings):
        value = raw.get(f.name)
        if value is None or value == "":
            continue
        kind = type(getattr(settings, f.name))
        try:
            setattr(settings, f.name, kind(float(value)) if kind in (int, float) else str(value))
        except (TypeError, ValueError):
            pass
    settings.steps = max(1, settings.steps)
    settings.width = max(64, settings.width)
    settings.height = max(64, settings.height)
    return settings


def without_lora_tag(prompt: str, name: str) -> str:
    """The prompt without any ``<lora:NAME...>`` tag for this LoRA (Send to txt2img adds one)."""
    text = re.sub(r"\s*<lora:" + re.escape(name) + r"(:[^>]*)?>", "", prompt or "", flags=re.IGNORECASE)
    return text.strip()


def with_lora_tag(prompt: str, name: str) -> str:
    tag = f"<lora:{name}:1>"
    return f"{prompt} {tag}" if prompt else tag


@dataclass
class Generation:
    """One of the two images: which checkpoint, which prompt."""

    label: str
    checkpoint: str
    prompt: str


def plan_compare(lora_name: str, base: str, variant: str, settings: Txt2imgSettings) -> list[Generation]:
    """The two generations: the variant as it is, and the base with the LoRA at weight 1.

    ``base`` / ``variant`` are the tab's choices at extraction time; a variant from the
    Lora list (``LoRA: name``) is the base with that LoRA."""
    if not lora_name:
        raise UserError("Extract a LoRA first: Compare uses the LoRA just saved.")
    if not base or not variant:
        raise UserError("Compare needs the base and the variant of the last extraction: extract again.")
    prompt = without_lora_tag(settings.prompt, lora_name)
    if job.is_lora_choice(variant):
        source = variant[len(job.LORA_PREFIX) :]
        first = Generation(f"Variant ({source})", base, with_lora_tag(without_lora_tag(prompt, source), source))
    else:
        first = Generation(f"Variant ({job.choice_stem(variant)})", variant, prompt)
    second = Generation(f"Base ({job.choice_stem(base)}) + {lora_name}", base, with_lora_tag(prompt, lora_name))
    return [first, second]


def fixed_seed(seed: int) -> int:
    """-1 (random) becomes one seed, so that both images use the same one."""
    return int(seed) if int(seed) >= 0 else random.randrange(0, 2**32 - 1)


# -- similarity ------------------------------------------------------------------------
def to_array(image) -> np.ndarray:
    """A PIL image or an array -> float64 H x W x 3 in 0..255."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return array[..., :3]


def luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, as most SSIM implementations measure colour images."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _filter_valid(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable correlation with ``window`` along both axes, 'valid' part only."""
    n = len(window)
    rows = sum(window[k] * image[k : image.shape[0] - n + 1 + k, :] for k in range(n))
    return sum(window[k] * rows[:, k : rows.shape[1] - n + 1 + k] for k in range(n))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM of two grey images of the same shape (windows wholly inside the image)."""
    window = gaussian_window()
    if min(a.shape) < len(window):
        raise UserError(f"The images are too small to compare ({a.shape[1]}x{a.shape[0]}).")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, window), _filter_valid(b, window)
    var_a = _filter_valid(a * a, window) - mu_a**2
    var_b = _filter_valid(b * b, window) - mu_b**2
    cov = _filter_valid(a * b, window) - mu_a * mu_b
    ratio = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ratio.mean())


@dataclass
class Similarity:
    mean_abs_diff: float  # mean |a - b| over pixels and RGB channels, 0..255
    ssim: float  # 1 = identical

    def text(self) -> str:
        return f"SSIM {self.ssim:.3f} (1 = identical); mean absolute pixel difference {self.mean_abs_diff:.1f} of 255"


def similarity(first, second) -> Similarity:
    a, b = to_array(first), to_array(second)
    if a.shape != b.shape:
        raise UserError(f"The two images differ in size ({a.shape[1]}x{a.shape[0]} and {b.shape[1]}x{b.shape[0]}).")
    return Similarity(float(np.abs(a - b).mean()), ssim(luminance(a), luminance(b)))


def png_data_url(image) -> str:
    """A PIL image as a PNG data URL (lossless, so what is shown is what was measured)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def images_html(images, labels) -> str:
    """The two images side by side, each under its label."""
    figures = "".join(
        f"<figure class='ckpt2lora-compare-image'><figcaption>{html.escape(label)}</figcaption>"
        f"<img src='{png_data_url(image)}' alt='{html.escape(label)}'></figure>"
        for image, label in zip(images, labels)
    )
    return f"<div class='ckpt2lora-compare-images'>{figures}</div>"


@dataclass
class CompareResult:
    ok: bool
    message: str
    images: list = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    seed: int = -1
    similarity: Similarity | None = None


def run_compare(services, lora_name: str, base: str, variant: str, settings_json: str, should_stop=None) -> CompareResult:
    """Generate both images through ``services.generate`` and measure them; every outcome
    comes back as a CompareResult (failures as one sentence)."""
    try:
        settings = parse_settings(settings_json)
        plan = plan_compare(lora_name, base, variant, settings)
        seed = fixed_seed(settings.seed)
        images = []
        for generation in plan:
            if should_stop is not None and should_stop():
                return CompareResult(False, INTERRUPTED)
            image = services.generate(generation.checkpoint, generation.prompt, settings, seed)
            # Interrupt during sampling: A1111 and Forge Neo stop the sampler but still decode and
            # return the unfinished image (seen in a real Neo: figures shown for a half-sampled
            # image), so an image made while a stop was asked for is not measured.
            if image is None or (should_stop is not None and should_stop()):
                return CompareResult(False, INTERRUPTED)
            images.append(image)
        measured = similarity(images[0], images[1])
    except UserError as error:
        return CompareResult(False, job.tab_text(str(error)))
    except Exception as error:  # a failure in the WebUI's generation: one sentence, console has more
        job.logger.exception("ckpt2lora: Compare failed")
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        detail = f"{type(error).__name__}: {first}" if first else type(error).__name__
        return CompareResult(False, f"Compare failed ({detail}); the console has the details.")
    return CompareResult(True, measured.text(), images, [g.label for g in plan], seed, measured)
