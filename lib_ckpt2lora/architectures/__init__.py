"""Architecture registry: detection by keys, one module per model family.

Adding a model means adding a module with an ``Architecture`` subclass and listing it
in ``DETECTION_ORDER`` (most specific first); ``Generic`` catches the rest.
"""

from __future__ import annotations

from ..constants import KNOWN_FAMILIES
from ..errors import UserError
from ..reading import TensorInfo
from .anima import Anima
from .base import Architecture, FileView, Group, LoraStyle, RawRef
from .chroma import Chroma
from .flux import Flux
from .flux2 import Flux2
from .generic import Generic
from .lumina2 import Lumina2
from .qwen_image import QwenImage
from .stable_diffusion import SD15, SDXL
from .wan import Wan
from .zimage import ZImage

DETECTION_ORDER: tuple[type[Architecture], ...] = (Lumina2, ZImage, Flux2, Flux, Chroma, QwenImage, Anima, Wan, SDXL, SD15)

__all__ = ["KNOWN_FAMILIES", "Architecture", "FileView", "Group", "LoraStyle", "RawRef", "detect"]


def detect(infos: dict[str, TensorInfo], strict: bool = False, path=None) -> Architecture:
    for cls in DETECTION_ORDER:
        found = cls.detect(infos)
        if found is not None:
            return found
    if strict:
        raise UserError(
            f"{path or 'The file'} is not an {KNOWN_FAMILIES} model; "
            "drop --strict to process it generically."
        )
    return Generic()
