"""ckpt2lora: turn the difference between a base model and a variant into a LoRA.

Library use::

    from lib_ckpt2lora import ExtractOptions, extract
    result = extract(ExtractOptions(base="base.safetensors", variant="v.safetensors", out="v_lora.safetensors"))
    print(result.report.summary_text())

Importing this package needs neither gradio nor the WebUI.
"""

from .constants import VERSION
from .errors import Cancelled, UserError
from .extract import ExtractResult, extract  # binds the name to the function, not the submodule
from .options import ExtractOptions

__all__ = ["VERSION", "Cancelled", "ExtractOptions", "ExtractResult", "UserError", "extract"]
__version__ = VERSION
