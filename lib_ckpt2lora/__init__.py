"""ckpt2lora: turn the difference between a base model and a variant into a LoRA.

Library use::

    from lib_ckpt2lora import ExtractOptions, extract
    result = extract(ExtractOptions(base="base.safetensors", variant="v.safetensors", out="v_lora.safetensors"))
    print(result.report.summary_text())

Importing this package needs neither gradio nor the WebUI.
"""

from .constants import VERSION
from .errors import Cancelled, UserError
from .options import ExtractOptions


def extract(*args, **kwargs):
    from .extract import extract as _extract

    return _extract(*args, **kwargs)


__all__ = ["VERSION", "Cancelled", "ExtractOptions", "UserError", "extract"]
__version__ = VERSION
